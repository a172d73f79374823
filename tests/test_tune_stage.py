"""The tune stage: a real Optuna + ASHA search over real Ray Train runs, tracked in a real MLflow store, run
beside a second search as two pipelines on one machine would."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict
from pipeline.training.resources import plan_tune
from tests.helpers import REPO_ROOT, prepare_project, working_directory

SEARCH = {
    "num_samples": 2,  # ASHA compares the two at epoch 1; each trial costs a worker group's start
    "max_epochs": 2,
    "max_examples": 600,
    "grace_period": 1,
    "reduction_factor": 2,
    "search_space": {  # merged over params.yaml's space, so every default dimension is named here
        "model.emb_dim": {"choice": [16, 24]},
        "model.hidden_dim": {"choice": [32, 48]},
        "model.n_layers": {"randint": [1, 2]},
        "model.dropout": {"uniform": [0.0, 0.3]},
    },
}


# A second search, run beside SEARCH's: the smallest there is, one trial. It overlaps SEARCH's first trial,
# whose placement-group cleaner then finds two local Ray instances (the hang below showed in the trial after).
SMALL_SEARCH = {
    "num_samples": 1,
    "max_epochs": 1,
    "max_examples": 300,
    "search_space": {
        "model.emb_dim": {"choice": [16]},
        "model.hidden_dim": {"choice": [24, 32]},
        "model.n_layers": {"randint": [1, 2]},
        "model.dropout": {"uniform": [0.0, 0.1]},
    },
}
# Far above the couple of minutes two searches take side by side on 2 cores; far below "forever".
BOTH_DONE_WITHIN_S = 900


def _tune_side_by_side(projects: list[Path]) -> None:
    """`python -m pipeline tune` in each project at once, each starting its own local Ray; both must end.
    Before each Ray process knew its own instance, Train's placement-group cleaner found two and failed, and
    the next trial's worker group waited forever (`Error count: N (max allowed: inf)` every 60 s, at 0 %
    CPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):  # local Ray, local store
        env.pop(name, None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "tune"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(project / "tune.log").open("w"),
        )
        for project in projects
    ]
    deadline = time.monotonic() + BOTH_DONE_WITHIN_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(
            "two tune stages side by side did not finish: " + (projects[0] / "tune.log").read_text()[-3000:]
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for project, process in zip(projects, processes, strict=True):
        assert process.returncode == 0, (project / "tune.log").read_text()[-3000:]


@pytest.mark.slow
def test_two_searches_side_by_side_on_two_cores_track_trials_under_one_parent_and_pick_the_best(
    tmp_path: Path,
) -> None:
    """Two tune stages started together on this 2-core machine, each with its own Ray and resource plan:
    both finish (neither hangs on the other's Ray), and the first one's search is checked in full."""
    from mlflow.tracking import MlflowClient

    projects = [tmp_path / "search", tmp_path / "beside"]
    # The search beside is one trial of one worker: it only has to overlap SEARCH's first trial.
    for project, search, workers in zip(projects, (SEARCH, SMALL_SEARCH), (2, 1), strict=True):
        project.mkdir()
        runtime = {"worker_start_timeout_s": 240, "num_workers": workers}
        prepare_project(project, {"tune": search, "train": {"val_bleu_sentences": 0}, "runtime": runtime})
    _tune_side_by_side(projects)

    assert json.loads((projects[1] / "reports" / "best_params.json").read_text())["n_trials"] == 1
    with working_directory(projects[0]):
        best = json.loads(Path("reports/best_params.json").read_text())
        trials = list(csv.DictReader(Path("reports/tune_trials.csv").read_text().splitlines()))
        client = MlflowClient(tracking_uri=f"sqlite:///{projects[0] / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("seq2seq-pipeline")
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{best['mlflow_parent_run_id']}'",
        )
        best_per_child = {
            run.data.tags["tune_trial_id"]: min(
                m.value for m in client.get_metric_history(run.info.run_id, "val_loss")
            )
            for run in children
        }
        parent_description = client.get_run(best["mlflow_parent_run_id"]).data.tags["mlflow.note.content"]
        descriptions = {
            run.data.tags["tune_trial_id"]: run.data.tags["mlflow.note.content"] for run in children
        }

    n_trials = SEARCH["num_samples"]
    assert best["n_trials"] == n_trials
    assert len(trials) == len(children) == n_trials, "one MLflow child run per trial, no duplicates"
    assert all(run.info.status in ("FINISHED", "KILLED") for run in children), "no trial run left RUNNING"
    assert {row["trial_id"] for row in trials} == set(best_per_child)
    assert all(1 <= int(row["epochs_run"]) <= 2 for row in trials)
    winner = min(best_per_child, key=best_per_child.get)
    assert best["best_trial_id"] == winner
    assert best["best_value"] == pytest.approx(best_per_child[winner])
    winner_row = next(row for row in trials if row["trial_id"] == winner)
    assert best["overrides"]["model.hidden_dim"] == int(winner_row["model.hidden_dim"])
    assert set(best["overrides"]) == set(SEARCH["search_space"])
    # The run pages' Description: the search names its keys, each trial the sizes it drew.
    assert f"{n_trials} trials" in parent_description and all(
        f"`{key}`" in parent_description for key in SEARCH["search_space"]
    )
    for row in trials:
        described = descriptions[row["trial_id"]]
        assert described.startswith(f"Ray Tune trial {row['trial_id']}: ")
        assert f"hidden {row['model.hidden_dim']}," in described


def test_num_samples_zero_passes_the_model_section_through(tmp_path: Path) -> None:
    from pipeline.params_file import load_config
    from pipeline.stages import tune
    from pipeline.training.best_params import effective_config
    from tests.helpers import write_params

    write_params(tmp_path, {"tune": {"num_samples": 0}, "model": {"hidden_dim": 40}})
    with working_directory(tmp_path):
        config = load_config("params.yaml")
        tune.run(config)  # no Ray, no data needed
        assert json.loads(Path("reports/best_params.json").read_text())["overrides"] == {}
        assert effective_config(config).model == config.model


def test_no_search_imports_neither_ray_nor_mlflow(tmp_path: Path) -> None:
    """`tune.num_samples: 0` costs a `dvc repro` about a second, not the seconds Ray, torch and MLflow take
    to import: the stage as `python -m pipeline tune` runs it, in a process of its own."""
    from tests.helpers import write_params

    write_params(tmp_path, {"tune": {"num_samples": 0}})
    probe = (
        "import sys; from pipeline.__main__ import main; code = main(['tune']); "
        "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules)); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert (tmp_path / "reports" / "best_params.json").is_file()


def test_best_params_override_params_yaml_for_train(tmp_path: Path) -> None:
    from pipeline.params_file import load_config
    from pipeline.training.best_params import effective_config
    from tests.helpers import write_params

    write_params(tmp_path, {"model": {"hidden_dim": 40, "emb_dim": 16}})
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/best_params.json").write_text(json.dumps({"overrides": {"model.hidden_dim": 64}}))
    with working_directory(tmp_path):
        model = effective_config(load_config("params.yaml")).model
    assert (model.hidden_dim, model.emb_dim) == (64, 16)


def test_resource_plan_on_a_cluster_counts_cpus_and_gpus_per_trial(caplog: pytest.LogCaptureFixture) -> None:
    config = config_from_dict(
        {"runtime": {"num_workers": 2, "cpus_per_worker": 1}, "tune": {"max_concurrent_trials": 4}}
    )
    assert plan_tune(config, {"CPU": 6.0}).concurrent_trials == 2
    gpu_config = config_from_dict(
        {"runtime": {"num_workers": 2, "use_gpu": True}, "tune": {"max_concurrent_trials": 4}}
    )
    assert plan_tune(gpu_config, {"CPU": 64.0, "GPU": 4.0}).concurrent_trials == 2
    # Too small for one trial now: an autoscaler may add nodes, so it warns (naming the keys) and waits.
    assert plan_tune(config, {"CPU": 2.0}).concurrent_trials == 1
    assert "runtime.num_workers=2" in caplog.text


def test_local_resource_plan_runs_no_more_trials_than_the_cores_feed() -> None:
    config = config_from_dict(
        {"runtime": {"num_workers": 2, "cpus_per_worker": 1}, "tune": {"max_concurrent_trials": 4}}
    )
    local = plan_tune(config, None)
    assert 1 <= local.concurrent_trials <= max(1, (os.cpu_count() or 1) // 2)
    assert local.logical_cpus_needed == local.concurrent_trials * 2.5


def test_search_space_refuses_untunable_key() -> None:
    with pytest.raises(PipelineError, match="tune.search_space"):
        config_from_dict({"tune": {"search_space": {"train.epochs": {"choice": [1, 2]}}}})


def test_an_http_ray_address_in_the_shell_is_one_message_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cluster docs' `export RAY_API_SERVER_ADDRESS=...` was once `export RAY_ADDRESS=http://...`: a
    stage run in that shell got ray.init's ValueError traceback."""
    from pipeline.__main__ import main

    prepare_project(tmp_path, {"tune": SEARCH})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert main(["tune"]) == 2
    error = capsys.readouterr().err
    assert (
        error.count("\n") == 1 and "RAY_ADDRESS=http://127.0.0.1:8265 is a jobs (dashboard) address" in error
    )
    assert "RAY_API_SERVER_ADDRESS" in error and not (tmp_path / "reports" / "best_params.json").exists()
