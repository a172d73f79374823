"""Stage `train`: Ray Train (DDP) on the effective config (params.yaml + the tune stage's choice).

Writes models/ (from the best checkpoint by validation loss), reports/train_history.csv (one row per
epoch), reports/train_metrics.json (the trained model's config and its best epoch: what `dvc exp show`
lists) and reports/train_run.json (the Ray and MLflow run names later stages log to).

With `train.init_from` (continued training) the network is the parent's, checked against params.yaml's
model section and data/processed's tokenizers before Ray starts, and every worker starts from its weights;
the optimizer, learning rate schedule and early stopping start fresh. A run resumed from a checkpoint in
`runtime.storage_path` resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import EvaluateConfig, PipelineConfig, check_init_from_pinned, parse_checkpoint_every
from pipeline.data.processed import ProcessedData, load_processed
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, outputs_together, write_json
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint
from pipeline.network.model import build_model, count_parameters
from pipeline.network.model_files import save_model_dir
from pipeline.tracking import lineage, runs, store
from pipeline.tracking.parent import parent_model_dir
from pipeline.tracking.runs import EpochMetricsLogger
from pipeline.tracking.train_run import TrainRun, write_train_run
from pipeline.training.best_params import effective_config
from pipeline.training.checkpoint import averaged_best_weights, read_checkpoint
from pipeline.training.parent import (
    ParentModel,
    check_architecture,
    check_processed_tokenizers,
    continued_model_config,
    read_parent,
)
from pipeline.training.ray_session import (
    check_storage_path,
    cluster_address,
    cluster_resources,
    ray_session,
    resolve_storage_path,
    worker_group_start_failure,
)
from pipeline.training.resources import (
    check_local_cores,
    check_training_fits,
    training_cpus,
    worker_resources,
)
from pipeline.training.trainer import WorkerConfig, build_trainer, put_init_weights, put_training_data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedRun:
    """What a finished Ray Train run left: the best checkpoint's weights and epoch, the whole history."""

    weights: dict[str, Any]
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, Any]]
    worker_addresses: list[list[str]]  # each start of the worker group: its ranks' node addresses


def run(config: PipelineConfig) -> None:
    check_init_from_pinned(config.train)
    config = effective_config(config)
    check_local_cores(config.runtime)
    processed = load_processed()
    if processed.pairs("train") == 0 or processed.pairs("validation") == 0:
        raise PipelineError(f"{paths.PROCESSED_DIR}: the train and validation splits must not be empty")
    parent = _parent(config, processed)
    if parent is not None:
        config = config.model_copy(update={"model": continued_model_config(parent, config.model)})

    # Where the run goes, checked before Ray starts: bounded waits instead of minutes of retries.
    check_storage_path(config.runtime.storage_path)
    store.check_tracking_store()
    # The parent's weights are part of what the run computes: another parent is another run.
    run_name = "train-" + fingerprint(
        config.model,
        config.train,
        directory_fingerprint(paths.PROCESSED_DIR),
        code_fingerprint(),
        *([parent.weights_sha256] if parent is not None else []),
    )
    trained, run_logger = _fit(config, processed, run_name, parent)
    with outputs_together():  # the model and its reports: all new, or all as they were
        _write_outputs(config, processed, trained, run_logger.run_id, run_name, parent)
    runs.finish_train_run(run_logger, trained.best_epoch, paths.TRAIN_HISTORY)
    logger.info(
        "best epoch %d (val_loss %.4f) -> %s", trained.best_epoch, trained.best_val_loss, paths.MODELS_DIR
    )


def _parent(config: PipelineConfig, processed: ProcessedData) -> ParentModel | None:
    """The model `train.init_from` names, checked against params.yaml's model section and data/processed;
    None when training from scratch."""
    init_from = config.train.init_from
    if init_from is None:
        return None
    with parent_model_dir(init_from) as folder:
        parent = read_parent(folder, init_from)
    check_architecture(parent, config.model)
    check_processed_tokenizers(parent, processed, paths.PROCESSED_DIR)
    logger.info(
        "continuing from %s (weights sha256 %s): the optimizer, learning rate schedule and early"
        " stopping start fresh",
        init_from,
        parent.weights_sha256[:12],
    )
    return parent


def _fit(
    config: PipelineConfig, processed: ProcessedData, run_name: str, parent: ParentModel | None
) -> tuple[TrainedRun, EpochMetricsLogger]:
    """The Ray Train run (resumed when `run_name` ran before in `runtime.storage_path`), in MLflow."""
    with ray_session(training_cpus(config.runtime), config.runtime.worker_start_timeout_s):
        check_training_fits(config.runtime, cluster_resources(), joined=cluster_address() is not None)
        storage_path = resolve_storage_path(config.runtime.storage_path)
        data = put_training_data(processed)
        init_weights = put_init_weights(parent.weights) if parent is not None else None
        run_logger = runs.start_train_run(config, run_name)
        if parent is not None:
            tags = lineage.parent_run_tags(_parent_entry(parent))
            runs.set_tags(run_logger.run_id, tags, run_logger.tracking_uri)
        _log_data_inputs(run_logger, config, processed)
        loop = WorkerConfig(
            config.model,
            config.train,
            data,
            config.train.epochs,
            run_logger,
            checkpoint_every=parse_checkpoint_every(config.runtime.checkpoint_every),
            cpus_per_worker=config.runtime.cpus_per_worker,
            init_weights=init_weights,
        )
        logger.info(
            "Ray Train run %s (storage %s), %d workers", run_name, storage_path, config.runtime.num_workers
        )
        with runs.failed_on_error(run_logger.run_id, run_logger.tracking_uri):
            trainer = build_trainer(loop, config.runtime, run_name, storage_path)
            with runs.system_metrics(run_logger), _start_failure_named(config):
                result = trainer.fit()
    return _trained_run(result, run_name, config.train.average_last), run_logger


def _log_data_inputs(
    run_logger: EpochMetricsLogger, config: PipelineConfig, processed: ProcessedData
) -> None:
    """The splits as the run's MLflow dataset inputs, digested by DVC's md5 of data/processed when dvc.lock
    has it (else by their own content)."""
    data_md5 = lineage.processed_data_hash()
    splits = {
        split: (
            data_md5 if data_md5 != "unknown" else directory_fingerprint(processed.split_dir(split)),
            processed.pairs(split),
        )
        for split in ("train", "validation", "test")
    }
    runs.log_split_inputs(run_logger, config.data.source, splits, hub=processed.meta.get("hub"))


@contextlib.contextmanager
def _start_failure_named(config: PipelineConfig) -> Iterator[None]:
    """A worker group that could not start becomes one message naming the resources asked for and free."""
    try:
        yield
    except Exception as error:
        asked = f"{config.runtime.num_workers} workers x {worker_resources(config.runtime)}"
        failure = worker_group_start_failure(error, asked)
        if failure is None:
            raise
        raise failure from None


def _trained_run(result: Any, run_name: str, average_last: int) -> TrainedRun:
    """The best checkpoint's weights by validation loss; with `train.average_last` N over 1, the mean of
    the N epoch-end weights ending at the best epoch (kept in the latest checkpoint, which holds the run)."""
    best_checkpoint = result.get_best_checkpoint(metric="val_loss", mode="min")
    if best_checkpoint is None:
        raise PipelineError(f"Ray Train run {run_name} reported no checkpoint")
    best = read_checkpoint(best_checkpoint)
    # The latest checkpoint holds the whole history; it is often the best one too: read it once then.
    latest_is_best = result.checkpoint is None or result.checkpoint.path == best_checkpoint.path
    latest = best if latest_is_best else read_checkpoint(result.checkpoint)
    history = latest["state"]["history"]
    averaged = averaged_best_weights(latest["state"]) if average_last > 1 else None
    weights = best["model"] if averaged is None else averaged
    if averaged is not None:
        kept = len(latest["state"]["best_weights"])
        logger.info("averaging the weights of %d epochs ending at the best one", kept)
    addresses = latest["state"].get("worker_addresses") or []
    return TrainedRun(weights, best["state"]["epoch"], best["state"]["best_val_loss"], history, addresses)


def _parent_entry(parent: ParentModel) -> dict[str, str | None]:
    return lineage.parent_entry(parent.source, parent.weights_sha256)


def _write_outputs(
    config: PipelineConfig,
    processed: ProcessedData,
    trained: TrainedRun,
    mlflow_run_id: str,
    run_name: str,
    parent: ParentModel | None,
) -> None:
    model = build_model(config.model, processed.src_vocab_size, processed.tgt_vocab_size)
    model.load_state_dict(trained.weights)
    # Defaults for `translate`; evaluate and register apply params.yaml's evaluate section themselves, so
    # changing the beam size never re-runs training.
    decoding = EvaluateConfig().decoding()
    save_model_dir(
        paths.MODELS_DIR, model, config.model, processed.src_tokenizer, processed.tgt_tokenizer, decoding
    )
    _write_history(paths.TRAIN_HISTORY, trained.history)
    write_json(
        paths.TRAIN_METRICS,
        {
            "model": config.model.model_dump(mode="json"),
            "parameters": count_parameters(model),
            "best_epoch": trained.best_epoch,
            "best_val_loss": round(trained.best_val_loss, 4),
            "epochs_run": len(trained.history),
            # The model it continued from (`train.init_from`), for `dvc metrics show` and the register stage.
            **({"init_from": _parent_entry(parent)} if parent is not None else {}),
        },
    )
    write_train_run(TrainRun(mlflow_run_id, run_name, trained.worker_addresses))


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)
