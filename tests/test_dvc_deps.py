"""dvc.yaml against the code: every stage lists exactly the files its command runs, settings that change
no result re-run nothing, and the plots and metrics DVC shows are the intended ones.

The first test reads the source (ast); the others run the real `dvc` in a temporary git repo whose stage
outputs are placeholders recorded with `dvc commit`, so DVC's change detection is checked without
training anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import TrainConfig
from tests.dvc_project import make_dvc_project, run
from tests.helpers import REPO_ROOT, TINY_PARAMS
from tests.import_graph import import_closure, package_files

STAGES = ("prepare", "preprocess", "tune", "train", "evaluate", "register")
CLI = Path("pipeline/__main__.py")
# Files a stage runs by path, not by import: register logs candidate.PYFUNC_FILE as the model ("models from
# code"), and MLflow runs it.
RUN_BY_PATH = {"register": [Path("pipeline/tracking/pyfunc_model.py")]}


def stage_code(stage: str) -> set[Path]:
    """What `python -m pipeline <stage>` runs: the CLI module itself (its other commands' imports are lazy
    and not run), the params file reader it loads the config with and the stage module, with everything
    they import, and the files it runs by path."""
    return {CLI} | import_closure(
        Path(f"pipeline/stages/{stage}.py"),
        Path("pipeline/params_file.py"),
        Path("pipeline/errors.py"),
        *RUN_BY_PATH.get(stage, []),
    )


def listed_code(deps: list[str]) -> set[Path]:
    """The package files a stage's deps cover (a folder dep covers every file in it)."""
    covered: set[Path] = set()
    for dep in deps:
        path = Path(dep)
        if path.suffix == ".py":
            covered.add(path)
        elif path.parts[0] == "pipeline":
            covered.update(file for file in package_files() if path in file.parents)
    return covered


def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_files_run_by_path_are_the_ones_the_code_names() -> None:
    candidate = (REPO_ROOT / "pipeline/tracking/candidate.py").read_text(encoding="utf-8")
    assert 'PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")' in candidate


def test_import_closure_follows_lazy_imports_into_layers() -> None:
    train = stage_code("train")
    # stages/train.py imports the training layer inside run(); the worker is two imports further.
    assert Path("pipeline/training/worker.py") in train and Path("pipeline/network/training_step.py") in train
    assert Path("pipeline/tracking/gate.py") not in train, "the registry's gate does not train"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_code_the_stage_runs(stage: str) -> None:
    deps = dvc_stages()[stage]["deps"]
    runs, listed = stage_code(stage), listed_code(deps)
    assert runs - listed == set(), f"dvc.yaml {stage} misses: {sorted(map(str, runs - listed))}"
    assert listed - runs == set(), (
        f"dvc.yaml {stage} lists code it never runs: {sorted(map(str, listed - runs))}"
    )
    for dep in deps:
        assert (REPO_ROOT / dep).exists() or not dep.startswith("pipeline"), f"{stage}: {dep} does not exist"


# --------------------------------------------------------------------------------------------------------
# Real DVC on placeholder outputs
# --------------------------------------------------------------------------------------------------------

HISTORY = [
    {
        "epoch": e,
        "train_loss": 3 - e,
        "val_loss": 3.2 - e,
        "val_bleu": 10 * e,
        "tokens_per_sec": 5000,
        "replica_divergence": 0,
        "n_workers": 2,
        "n_nodes": 1,
    }
    for e in range(3)
]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_placeholder_outputs(root: Path, trials: list[dict]) -> None:
    """Every stage output, small but in the real shapes (the stages' own writers are tested elsewhere)."""
    for folder in ("data/prepared", "data/processed", "models"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "placeholder.txt").write_text(folder)
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    documents = {
        "prepare_stats.json": {"pairs": {"train": 90}, "dropped_total": 1, "length": {"train": {"src": {}}}},
        "prepare_metrics.json": {"pairs": {"train": 90, "validation": 5, "test": 5}, "dropped_total": 1},
        "best_params.json": {"overrides": {"model.hidden_dim": 48}},
        "train_run.json": {"mlflow_run_id": "abc", "ray_run_name": "train-x"},
        "train_metrics.json": {"model": {"arch": "gru_attention", "hidden_dim": 48}, "best_epoch": 2},
        "metrics.json": {"bleu": 50.0, "chrf": 60.0},
        "registry.json": {"version": 1},
    }
    for name, payload in documents.items():
        (reports / name).write_text(json.dumps(payload))
    (reports / "samples.jsonl").write_text("{}\n")
    write_csv(reports / "train_history.csv", HISTORY)
    if trials:
        write_csv(reports / "tune_trials.csv", trials)
    else:  # what the tune stage writes when the search is off
        (reports / "tune_trials.csv").write_text(
            "trial_id,metric,best_value,epochs_run,stopped_early,status\n"
        )


def status(project: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")


def set_param(project: Path, section: str, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    directory = make_dvc_project(tmp_path, TINY_PARAMS)
    write_placeholder_outputs(directory, [])
    run(["dvc", "commit", "--force", "--quiet"], directory)
    assert status(directory) == {}, "everything recorded: nothing to re-run"
    return directory


@pytest.mark.slow
def test_a_change_to_any_file_a_stage_runs_shows_that_stage_in_dvc_status(project: Path) -> None:
    for path in package_files():
        with (project / path).open("a") as handle:
            handle.write("# changed\n")

    changed = {stage: set() for stage in STAGES}
    for stage, entries in status(project).items():
        for entry in entries:
            changed[stage].update(Path(dep) for dep in entry.get("changed deps", {}))
    for stage in STAGES:
        expected = {Path(dep) for dep in dvc_stages()[stage]["deps"] if dep.startswith("pipeline")}
        assert changed[stage] == expected, stage


def test_the_tune_stage_lists_every_train_setting_a_trial_reads() -> None:
    """A trial trains with every train setting but the epochs (tune.max_epochs) and the averaging (which
    only changes the train stage's final weights): a setting left off would not re-run the search."""
    listed = {
        param.removeprefix("train.")
        for param in dvc_stages()["tune"]["params"]
        if isinstance(param, str) and param.startswith("train.")
    }
    assert listed == set(TrainConfig.model_fields) - {"epochs", "average_last"}
    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    assert set(shipped) == set(TrainConfig.model_fields), "params.yaml names every train setting"


@pytest.mark.slow
def test_runtime_and_tracking_settings_rerun_nothing_but_train_keys_do(project: Path) -> None:
    set_param(project, "runtime", "storage_path", "s3://bucket/seq2seq/ray")
    set_param(project, "runtime", "max_failures", 5)
    set_param(project, "runtime", "checkpoints_to_keep", 1)
    set_param(project, "runtime", "checkpoint_every", "10min")
    set_param(project, "tracking", "experiment", "elsewhere")
    assert status(project) == {}, "where checkpoints go and failures tolerated must not re-run training"

    set_param(project, "train", "epochs", 3)
    assert set(status(project)) == {"train"}
    set_param(project, "preprocess", "vocab_size", 300)
    assert set(status(project)) == {"train", "preprocess"}, "a stage's own keys re-run it, not its inputs'"


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["val_loss", "val_bleu", None])
def test_plots_show_draws_the_four_plots_offline_whatever_the_tune_metric(
    project: Path, metric: str | None
) -> None:
    trials = (
        [
            {
                "trial_id": f"t{i}",
                "model.hidden_dim": 32 * i,
                "metric": metric,
                "best_value": 1.0 + i,
                "epochs_run": 2,
                "stopped_early": False,
                "status": "TERMINATED",
            }
            for i in range(1, 4)
        ]
        if metric
        else []
    )
    write_placeholder_outputs(project, trials)

    result = run(["dvc", "plots", "show", "--json"], project)
    shown = json.loads(result.stdout)
    assert not shown.get("errors") and "could not find" not in result.stderr, result.stderr
    drawn = {name for name, plots in shown["data"].items() if plots}
    assert drawn == (
        {"loss", "throughput", "tune_trials", "validation_bleu"}
        if metric
        else {"loss", "throughput", "validation_bleu"}
    )
    assert sorted(shown["data"]) == ["loss", "throughput", "tune_trials", "validation_bleu"], sorted(
        shown["data"]
    )
    run(["dvc", "plots", "show"], project)
    page = (project / "dvc_plots" / "index.html").read_text()
    assert page.count("vegaEmbed('#") == 4
    assert "<script src=" not in page and "cdn.jsdelivr" not in page, "the page must not need the network"
    assert "vega@5.20.2" in page and "vega-embed@6.18.2" in page, "the libraries are inlined"


@pytest.mark.slow
def test_metrics_show_the_trained_model_and_only_headline_prepare_figures(project: Path) -> None:
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = shown[""]["data"]
    assert set(files) == {
        "reports/prepare_metrics.json",
        "reports/train_metrics.json",
        "reports/metrics.json",
    }
    trained = files["reports/train_metrics.json"]["data"]
    assert trained["model"]["hidden_dim"] == 48 and trained["best_epoch"] == 2
