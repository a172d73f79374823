"""Ray Train on a real local Ray instance: 2 workers, gloo DDP, checkpoints, a killed worker."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import prepare_project, working_directory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_instance) -> Path:
    directory = tmp_path_factory.mktemp("train-project")
    prepare_project(directory, {"train": {"epochs": 3}})
    return directory


def test_train_stage_ddp_replicas_stay_identical_and_loss_falls(project: Path) -> None:
    from pipeline.config import load_config
    from pipeline.stages import train

    with working_directory(project):
        train.run(load_config("params.yaml"))
        history = list(csv.DictReader(Path("reports/train_history.csv").read_text().splitlines()))
        run_info = json.loads(Path("reports/train_run.json").read_text())
        model_files = sorted(p.name for p in Path("models").iterdir())

    assert [int(row["epoch"]) for row in history] == [0, 1, 2]
    assert all(int(row["replica_divergence"]) == 0 for row in history), "replicas differ bit for bit"
    assert all(int(row["n_workers"]) == 2 for row in history)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])
    assert all(float(row["tokens_per_sec"]) > 0 for row in history)
    assert "model.safetensors" in model_files and "model_config.json" in model_files
    assert run_info["mlflow_run_id"]


def registered_checkpoint_epoch(run_dir: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train has registered (its snapshot file), if any.

    A checkpoint folder appears before the controller registers it; only a registered one is resumed.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return None if latest is None else int(latest["metrics"]["epoch"])


def _kill_one_train_worker_after_a_registered_checkpoint(
    run_dir: Path, killed: list[int], deadline: float
) -> None:
    from ray.util.state import list_actors

    while time.time() < deadline and registered_checkpoint_epoch(run_dir) is None:
        time.sleep(0.1)
    import ray

    # Name this Ray instance explicitly: the state API refuses to guess when several run on the machine.
    workers = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    if workers:
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed.append(workers[-1].pid)


def test_killed_worker_resumes_from_latest_checkpoint_not_epoch_zero(project: Path, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.data.processed import load_processed
    from pipeline.training.state import read_checkpoint
    from pipeline.training.trainer import build_trainer, put_training_data, train_loop_config

    with working_directory(project):
        config = load_config("params.yaml")
        processed = load_processed()
    data = put_training_data(processed)
    train_config = config.train.model_copy(update={"early_stopping_patience": 50})
    runtime = config.runtime.model_copy(update={"max_failures": 2})
    epochs = 8
    trainer = build_trainer(
        train_loop_config(config.model, train_config, data, epochs),
        train_config,
        runtime,
        "kill-test",
        str(tmp_path),
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_one_train_worker_after_a_registered_checkpoint,
        args=(tmp_path / "kill-test", killed, time.time() + 120),
        daemon=True,
    )
    killer.start()
    result = trainer.fit()
    killer.join(timeout=5)

    assert killed, "no Ray Train worker was found to kill"
    assert result.error is None
    history = read_checkpoint(result.checkpoint)["state"]["history"]
    epochs_seen = [row["epoch"] for row in history]
    assert epochs_seen == list(range(epochs)), "each epoch must appear once: no restart from epoch 0"
    resumed = [row["resumed_from_epoch"] for row in history if row["resumed_from_epoch"] >= 0]
    assert resumed, "after the kill the worker group must resume from a checkpoint"
    first_resumed = next(row for row in history if row["resumed_from_epoch"] >= 0)
    assert first_resumed["epoch"] == first_resumed["resumed_from_epoch"] + 1, "it continues where it stopped"


def test_rerun_after_driver_killed_resumes_the_same_run_and_mlflow_run(tmp_path: Path) -> None:
    """SIGKILL the `python -m pipeline train` driver mid-run, run the stage again: it resumes."""
    import subprocess
    import sys

    import ray
    from mlflow.tracking import MlflowClient

    prepare_project(tmp_path, {"train": {"epochs": 6, "early_stopping_patience": 50}})
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
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        run_dirs = list(runs_root.glob("train-*")) if runs_root.is_dir() else []
        if run_dirs and registered_checkpoint_epoch(run_dirs[0]) is not None:
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the driver ended before it could be killed"
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
    assert [int(row["epoch"]) for row in history] == list(range(6))
    assert max(int(row["resumed_from_epoch"]) for row in history) >= 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seq2seq-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [run_info["mlflow_run_id"]], "one MLflow run, not two"
