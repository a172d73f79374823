"""Stage `train`: Ray Train (DDP) on the effective config -> models/, reports/train_history.csv."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pipeline import paths
from pipeline.atomic import atomic_file, write_json
from pipeline.best_params import effective_config
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.data.encoded import load_processed
from pipeline.errors import PipelineError
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint
from pipeline.model_io import save_model_dir
from pipeline.ray_runtime import resolve_storage_path

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    config = effective_config(config)
    processed = load_processed()
    if len(processed.splits["train"].src_ids) == 0 or len(processed.splits["validation"].src_ids) == 0:
        raise PipelineError(f"{paths.PROCESSED_DIR}: the train and validation splits must not be empty")
    run_name = "train-" + fingerprint(
        config.model, config.train, directory_fingerprint(paths.PROCESSED_DIR), code_fingerprint()
    )

    from pipeline import tracking
    from pipeline.ray_runtime import check_fits, ray_session
    from pipeline.training import build_trainer, load_training_state, put_training_data, train_loop_config

    with ray_session(config.train.cpus_per_worker * config.train.num_workers):
        check_fits(config.train.cpus_per_worker, config.train.num_workers, config.train.use_gpu)
        storage_path = resolve_storage_path(config.train.storage_path)
        data = put_training_data(processed)
        mlflow_run = tracking.start_train_run(config, run_name)
        loop_config = train_loop_config(config.model, config.train, data, config.train.epochs, mlflow_run)
        logger.info(
            "Ray Train run %s (storage %s), %d workers", run_name, storage_path, config.train.num_workers
        )
        with tracking.failed_on_error(mlflow_run["run_id"], mlflow_run["tracking_uri"]):
            result = build_trainer(loop_config, config.train, run_name, storage_path).fit()

    best = min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"], default=None)
    if best is None:
        raise PipelineError(f"Ray Train run {run_name} reported no checkpoint")
    best_state = load_training_state(best[0])
    # The latest checkpoint holds the full history; it is often the best one too: read it once then.
    latest_is_best = result.checkpoint is None or result.checkpoint.path == best[0].path
    history = (best_state if latest_is_best else load_training_state(result.checkpoint))["history"]

    from pipeline.model import build_model

    model = build_model(config.model, processed.src_vocab_size, processed.tgt_vocab_size)
    model.load_state_dict(best_state["model"])
    # Defaults for `translate`; evaluate and register apply params.yaml's evaluate section themselves, so
    # changing the beam size never re-runs training.
    decoding = EvaluateConfig().model_dump(include={"beam_size", "length_penalty", "max_len_ratio"})
    save_model_dir(
        paths.MODELS_DIR, model, config.model, processed.src_tokenizer, processed.tgt_tokenizer, decoding
    )
    _write_history(paths.TRAIN_HISTORY, history)
    write_json(
        paths.TRAIN_RUN,
        {
            "mlflow_run_id": mlflow_run["run_id"] if mlflow_run else None,
            "ray_run_name": run_name,
            "best_epoch": best_state["epoch"],
            "best_val_loss": best_state["best_val_loss"],
            "model": config.model.model_dump(),
        },
    )
    tracking.finish_train_run(mlflow_run, best_state["epoch"], paths.TRAIN_HISTORY)
    logger.info(
        "best epoch %d (val_loss %.4f) -> %s", best_state["epoch"], best[1]["val_loss"], paths.MODELS_DIR
    )


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)
