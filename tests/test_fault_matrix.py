"""The fault matrix, on a real local Ray (2 workers, gloo DDP), a real MLflow store and real DVC: each fault
at its worst moment, then a rerun that finishes with nothing lost and nothing duplicated.

- a Train worker SIGKILLed mid-epoch: resumes at the reported batch, ends bit for bit as the run that was
  not interrupted;
- the train driver SIGKILLed: the rerun resumes the same Ray run and the same MLflow run;
- `dvc repro` stopped (SIGTERM) in prepare: no temporaries; the rerun completes.
Plus what the reference run shows on its own: DDP replicas stay identical and the loss falls.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dvc_project import make_dvc_project, project_env, run
from tests.helpers import (
    TINY_PARAMS,
    deep_merge,
    joining_ray_env,
    prepare_project,
    working_directory,
)

pytestmark = pytest.mark.slow


# 1,200 target tokens an update (600 on each of the 2 ranks) make 18 updates an epoch on the tiny corpus, so
# a checkpoint every
# 6 steps lands at batches 6 and 12 of each epoch. No more: a report waits until Ray Train's controller
# has taken the previous one, and it takes one per poll (every 2 s). The model is the Transformer (with
# dropout, so every rank's RNG state matters on resume); the GRU models train under Ray in
# test_pipeline_end_to_end, test_multinode and the driver-kill test below.
MID_EPOCH_CHECKPOINTS = {
    "model": {"arch": "transformer", "emb_dim": 32, "n_heads": 4, "ff_dim": 64, "dropout": 0.1},
    # average_last: the epoch weights kept for averaging must survive the restart too.
    "train": {"epochs": 2, "batch_size": 1200, "early_stopping_patience": 50, "lr": 0.002, "average_last": 2},
    "runtime": {"checkpoint_every": 6},
}


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, ray_instance) -> Path:
    """A tiny project after one uninterrupted train stage, with mid-epoch checkpoints (the reference
    that the killed run below must match, so the module trains it only once)."""
    from pipeline.params_file import load_config
    from pipeline.stages import train

    directory = tmp_path_factory.mktemp("train-project")
    prepare_project(directory, MID_EPOCH_CHECKPOINTS)
    with working_directory(directory):
        train.run(load_config("params.yaml"))
    return directory


def test_train_stage_ddp_replicas_stay_identical_and_loss_falls(trained_project: Path) -> None:
    with working_directory(trained_project):
        history = list(csv.DictReader(Path("reports/train_history.csv").read_text().splitlines()))
        run_info = json.loads(Path("reports/train_run.json").read_text())
        train_metrics = json.loads(Path("reports/train_metrics.json").read_text())
        model_files = sorted(p.name for p in Path("models").iterdir())

    assert [int(row["epoch"]) for row in history] == [0, 1], "one row per finished epoch, none mid-epoch"
    assert "mid_epoch" not in history[0] and train_metrics["best_epoch"] in (0, 1)
    assert all(int(row["replica_divergence"]) == 0 for row in history), "replicas differ bit for bit"
    assert all(int(row["n_workers"]) == 2 for row in history)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])
    assert all(float(row["tokens_per_sec"]) > 0 for row in history)
    assert all(float(row["peak_rss_mib"]) > 0 for row in history)
    assert all(int(row["resumed_from_step"]) == -1 for row in history), "nothing was resumed"
    assert "model.safetensors" in model_files and "model_config.json" in model_files
    assert run_info["mlflow_run_id"]


def latest_registered_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of the latest checkpoint Ray Train has registered (its snapshot file), if any: `epoch`,
    and for a mid-epoch checkpoint `mid_epoch` and `step` (the batches of that epoch already done).

    A checkpoint folder appears before the controller registers it; only a registered one is resumed.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return None if latest is None else latest["metrics"]


def _kill_one_train_worker_early_in_epoch_1(
    run_dir: Path, killed: list[dict[str, Any]], deadline: float
) -> None:
    """SIGKILL a Ray Train worker once the latest registered checkpoint is a mid-epoch one of epoch 1 (the
    first of that epoch is early in it: its epoch-end checkpoint cannot register before the kill)."""
    import ray
    from ray.util.state import list_actors

    def wait_for(condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        while time.time() < deadline:
            metrics = latest_registered_checkpoint(run_dir)
            if metrics is not None and condition(metrics):
                return metrics
            time.sleep(0.05)
        return None

    if wait_for(lambda metrics: True) is None:
        return
    # Found now, while the first checkpoint says the workers are up, so the kill itself is immediate.
    # Name this Ray instance explicitly: the state API refuses to guess when several run on the machine.
    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    seen = wait_for(lambda metrics: metrics.get("mid_epoch") == 1 and metrics["epoch"] >= 1)
    if workers and seen is not None:
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed.append(seen)


def test_the_global_batch_gives_the_same_updates_with_one_worker_or_two(
    trained_project: Path, tmp_path: Path
) -> None:
    """train.batch_size is the batch of an update across all workers: with the same seed and data (and no
    dropout, whose masks are drawn per rank), one worker and two train to the same weights."""

    from pipeline.data.processed import load_processed
    from pipeline.params_file import load_config
    from pipeline.training.checkpoint import read_checkpoint
    from pipeline.training.trainer import WorkerConfig, build_trainer, put_training_data

    with working_directory(trained_project):
        config = load_config("params.yaml")
        data = put_training_data(load_processed())
    # GRU + attention: the Transformer's key biases get no gradient (softmax ignores a constant), and Adam
    # turns rounding noise there into full-size steps of either sign.
    model = config.model.model_copy(update={"arch": "gru_attention", "hidden_dim": 48, "dropout": 0.0})
    train = config.train.model_copy(update={"val_bleu_sentences": 0})
    weights = []
    for workers in (1, 2):
        runtime = config.runtime.model_copy(update={"num_workers": workers, "checkpoint_every": None})
        trainer = build_trainer(
            WorkerConfig(model, train, data, 1), runtime, f"workers-{workers}", str(tmp_path)
        )
        weights.append(read_checkpoint(trainer.fit().checkpoint)["model"])
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        difference = float((value - weights[1][key]).abs().max())
        assert difference < 1e-4 * max(1.0, float(value.abs().max())), (key, difference)


def test_killed_worker_resumes_mid_epoch_and_ends_bit_for_bit_as_the_uninterrupted_run(
    trained_project: Path, tmp_path: Path
) -> None:
    """The train stage's run again with its very config, a worker killed inside an epoch: the restarted
    group goes on at the checkpoint's batch with every rank's RNG state and partial sums, so weights and
    losses come out identical to the uninterrupted run's."""
    import ray.train
    import torch

    from pipeline.config import parse_checkpoint_every
    from pipeline.data.processed import load_processed
    from pipeline.params_file import load_config
    from pipeline.training.checkpoint import read_checkpoint
    from pipeline.training.trainer import WorkerConfig, build_trainer, put_training_data

    with working_directory(trained_project):
        config = load_config("params.yaml")
        data = put_training_data(load_processed())
        run_name = json.loads(Path("reports/train_run.json").read_text())["ray_run_name"]
        uninterrupted = ray.train.Result.from_path(Path("runs/ray", run_name).resolve())
    reference = read_checkpoint(uninterrupted.checkpoint)
    assert config.model.dropout > 0, "dropout draws random numbers: the RNG restore must matter"
    loop = WorkerConfig(
        config.model,
        config.train,
        data,
        config.train.epochs,
        checkpoint_every=parse_checkpoint_every(config.runtime.checkpoint_every),
    )
    killed: list[dict[str, Any]] = []
    killer = threading.Thread(
        target=_kill_one_train_worker_early_in_epoch_1,
        args=(tmp_path / "killed", killed, time.time() + 120),
        daemon=True,
    )
    killer.start()
    result = build_trainer(loop, config.runtime, "killed", str(tmp_path)).fit()
    killer.join(timeout=5)

    assert killed, "no Ray Train worker was killed after a mid-epoch checkpoint"
    assert isinstance(killed[0]["val_loss"], float), "Ray's JSON snapshot must keep a number (inf is null)"
    assert result.error is None
    final = read_checkpoint(result.checkpoint)
    history = final["state"]["history"]
    assert [row["epoch"] for row in history] == list(range(config.train.epochs)), "each epoch exactly once"
    first_resumed = next(row for row in history if row["resumed_from_step"] >= 0)
    assert first_resumed["resumed_from_step"] > 0, "it resumes inside the epoch, not at its start"
    assert first_resumed["epoch"] == first_resumed["resumed_from_epoch"] + 1 == killed[0]["epoch"]

    best = result.get_best_checkpoint(metric="val_loss", mode="min")
    best_metrics = next(metrics for kept, metrics in result.best_checkpoints if kept.path == best.path)
    assert "mid_epoch" not in best_metrics, "a mid-epoch checkpoint must never be the best"

    assert reference["model"].keys() == final["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, final["model"][name]), f"{name} differs from the uninterrupted run"
    kept = [final["state"]["best_weights"], reference["state"]["best_weights"]]
    assert len(kept[0]) == len(kept[1]) > 0, "rank 0 keeps the epoch weights to average"
    for resumed_epoch, reference_epoch in zip(*kept, strict=True):
        assert all(torch.equal(resumed_epoch[name], reference_epoch[name]) for name in reference_epoch)
    reference_history = reference["state"]["history"]
    for key in ("train_loss", "val_loss"):
        assert [row[key] for row in history] == [row[key] for row in reference_history], key


def test_rerun_after_driver_killed_resumes_the_same_run_and_mlflow_run(tmp_path: Path) -> None:
    """SIGKILL the `python -m pipeline train` driver mid-run, run the stage again: it resumes."""
    import subprocess
    import sys

    import ray
    from mlflow.tracking import MlflowClient

    # 3 epochs: killed after the first checkpoint, the rerun has epochs left to resume into.
    epochs = 3
    prepare_project(tmp_path, {"train": {"epochs": epochs, "early_stopping_patience": 50}})
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # this module's Ray: the driver only joins it
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "pipeline", "train"]
    driver = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    runs_root = tmp_path / "runs/ray"
    deadline, checkpointed = time.time() + 300, False  # generous: the machine may be busy with other tests
    while time.time() < deadline and driver.poll() is None and not checkpointed:
        run_dirs = list(runs_root.glob("train-*")) if runs_root.is_dir() else []
        checkpointed = bool(run_dirs) and latest_registered_checkpoint(run_dirs[0]) is not None
        time.sleep(0.1)
    assert driver.poll() is None, "the driver ended before it could be killed"
    assert checkpointed, "Ray Train registered no checkpoint before the deadline"
    driver.kill()
    driver.wait(timeout=30)
    assert not (tmp_path / "models").exists()

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-5000:]
    assert "Resuming training from checkpoint at epoch" in output, output[-5000:]
    with working_directory(tmp_path):
        history = list(csv.DictReader(Path("reports/train_history.csv").read_text().splitlines()))
        run_info = json.loads(Path("reports/train_run.json").read_text())
    assert [int(row["epoch"]) for row in history] == list(range(epochs))
    assert max(int(row["resumed_from_epoch"]) for row in history) >= 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seq2seq-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [run_info["mlflow_run_id"]], "one MLflow run, not two"


@pytest.mark.slow
def test_dvc_repro_stopped_in_prepare_finishes_on_rerun_with_nothing_left_over(tmp_path: Path) -> None:
    params = deep_merge(
        TINY_PARAMS, {"data": {"builtin": {"n_pairs": 400_000}}}
    )  # tens of seconds of prepare
    project_dir = make_dvc_project(tmp_path, params)
    repro = subprocess.Popen(
        ["dvc", "repro", "prepare"],
        cwd=project_dir,
        env=project_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((project_dir / "data").glob(".prepared.tmp-*")):
        assert repro.poll() is None and time.monotonic() < deadline, repro.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(repro.pid, signal.SIGTERM)  # what a CI cancel or `timeout` sends: the whole group
    output, _ = repro.communicate(timeout=120)
    assert repro.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    assert not list(project_dir.rglob(".prepared.tmp-*")) and not (project_dir / "data" / "prepared").exists()

    small = deep_merge(TINY_PARAMS, {"data": {"builtin": {"n_pairs": 400}}})
    (project_dir / "params.yaml").write_text(json.dumps(small))  # JSON is YAML: a quicker rerun
    run(["dvc", "repro", "prepare"], project_dir)
    assert json.loads((project_dir / "reports" / "prepare_stats.json").read_text())["pairs"]["train"] > 0
    assert "changed" not in run(["dvc", "status", "prepare"], project_dir).stdout


def test_a_worker_group_that_cannot_get_its_cpus_fails_the_stage_in_bounded_time(
    tmp_path: Path, ray_instance: None
) -> None:
    """Another run holds every CPU: Ray would retry the worker group forever (`max allowed: inf`); the
    stage fails after runtime.worker_start_timeout_s with one message naming what it asked for."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    prepare_project(tmp_path, {"runtime": {"worker_start_timeout_s": 5}, "train": {"epochs": 1}})
    holder = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])  # "another run" holds them all
    ray.get(holder.ready(), timeout=60)
    env = joining_ray_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "train"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        remove_placement_group(holder)
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "did not start within runtime.worker_start_timeout_s" in error[0], done.stderr[
        -3000:
    ]
    assert "asked for 2 workers x {'CPU': 1.0}" in error[0] and "free now" in error[0]
    assert time.monotonic() - started < 240, "bounded: seconds after the timeout, not retries forever"
