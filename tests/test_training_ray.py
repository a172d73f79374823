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
    assert all(float(row["replica_divergence"]) == 0.0 for row in history)
    assert all(int(row["n_workers"]) == 2 for row in history)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])
    assert all(float(row["tokens_per_sec"]) > 0 for row in history)
    assert "model.safetensors" in model_files and "model_config.json" in model_files
    assert run_info["mlflow_run_id"]


def _kill_one_train_worker_after_two_checkpoints(run_dir: Path, killed: list[int], deadline: float) -> None:
    """A checkpoint folder appears before Ray has registered it; once the second appears, the first is."""
    from ray.util.state import list_actors

    while time.time() < deadline:
        if run_dir.is_dir() and sum(p.name.startswith("checkpoint") for p in run_dir.iterdir()) >= 2:
            break
        time.sleep(0.2)
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
    from pipeline.data.batching import EncodedSplit
    from pipeline.data.encoded import load_processed
    from pipeline.training import build_trainer, load_training_state, put_training_data, train_loop_config

    with working_directory(project):
        config = load_config("params.yaml")
        processed = load_processed()
    data = put_training_data(
        EncodedSplit.from_lists(processed.splits["train"].src_ids, processed.splits["train"].tgt_ids),
        EncodedSplit.from_lists(
            processed.splits["validation"].src_ids, processed.splits["validation"].tgt_ids
        ),
        processed.meta["src_vocab_size"],
        processed.meta["tgt_vocab_size"],
        processed.tgt_tokenizer,
    )
    train_config = config.train.model_copy(update={"max_failures": 2, "early_stopping_patience": 50})
    epochs = 8
    trainer = build_trainer(
        train_loop_config(config.model, train_config, data, epochs), train_config, "kill-test", str(tmp_path)
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_one_train_worker_after_two_checkpoints,
        args=(tmp_path / "kill-test", killed, time.time() + 120),
        daemon=True,
    )
    killer.start()
    result = trainer.fit()
    killer.join(timeout=5)

    assert killed, "no Ray Train worker was found to kill"
    assert result.error is None
    history = load_training_state(result.checkpoint)["history"]
    epochs_seen = [row["epoch"] for row in history]
    assert epochs_seen == list(range(epochs)), "each epoch must appear once: no restart from epoch 0"
    resumed = [row["resumed_from_epoch"] for row in history if row["resumed_from_epoch"] >= 0]
    assert resumed, "after the kill the worker group must resume from a checkpoint"
    assert min(resumed) >= 0 and history[-1]["resumed_from_epoch"] >= 0
