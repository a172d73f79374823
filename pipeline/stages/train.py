"""Stage `train`: Ray Train (DDP) on the effective config (params.yaml + the tune stage's choice).

Writes models/ (from the best checkpoint by validation loss), reports/train_history.csv (one row per
epoch), reports/train_metrics.json (the trained model's config and its best epoch: what `dvc exp show`
lists) and reports/train_run.json (the Ray and MLflow run names later stages log to).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pipeline import paths
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.data.processed import load_processed
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, outputs_together, write_json
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint
from pipeline.training.best_params import effective_config

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    config = effective_config(config)
    processed = load_processed()
    if processed.pairs("train") == 0 or processed.pairs("validation") == 0:
        raise PipelineError(f"{paths.PROCESSED_DIR}: the train and validation splits must not be empty")
    run_name = "train-" + fingerprint(
        config.model, config.train, directory_fingerprint(paths.PROCESSED_DIR), code_fingerprint()
    )

    from pipeline.network.model import build_model, count_parameters
    from pipeline.network.model_files import save_model_dir
    from pipeline.tracking import lineage, store
    from pipeline.training.resources import check_training_fits, training_cpus, worker_resources
    from pipeline.training.runtime import (
        cluster_address,
        cluster_resources,
        ray_session,
        resolve_storage_path,
        worker_group_start_failure,
    )
    from pipeline.training.state import read_checkpoint
    from pipeline.training.trainer import build_trainer, put_training_data, train_loop_config

    with ray_session(training_cpus(config.train), config.runtime.worker_start_timeout_s):
        check_training_fits(config.train, cluster_resources(), joined=cluster_address() is not None)
        storage_path = resolve_storage_path(config.runtime.storage_path)
        data = put_training_data(processed)
        mlflow_run = store.start_train_run(config, run_name)
        data_md5 = lineage.processed_data_hash()
        store.log_split_inputs(
            mlflow_run,
            config.data.source,
            {
                split: (
                    data_md5 if data_md5 != "unknown" else directory_fingerprint(processed.split_dir(split)),
                    processed.pairs(split),
                )
                for split in ("train", "validation", "test")
            },
            hub=processed.meta.get("hub"),
        )
        loop_config = train_loop_config(
            config.model,
            config.train,
            data,
            config.train.epochs,
            mlflow_run,
            checkpoint_every=config.runtime.checkpoint_interval(),
        )
        logger.info(
            "Ray Train run %s (storage %s), %d workers", run_name, storage_path, config.train.num_workers
        )
        with store.failed_on_error(mlflow_run.run_id, mlflow_run.tracking_uri):
            trainer = build_trainer(loop_config, config.train, config.runtime, run_name, storage_path)
            try:
                with store.system_metrics(mlflow_run):
                    result = trainer.fit()
            except Exception as error:
                asked = f"{config.train.num_workers} workers x {worker_resources(config.train)}"
                failure = worker_group_start_failure(error, asked)
                if failure is None:
                    raise
                raise failure from None

    best_checkpoint = result.get_best_checkpoint(metric="val_loss", mode="min")
    if best_checkpoint is None:
        raise PipelineError(f"Ray Train run {run_name} reported no checkpoint")
    best = read_checkpoint(best_checkpoint)
    # The latest checkpoint holds the whole history; it is often the best one too: read it once then.
    latest_is_best = result.checkpoint is None or result.checkpoint.path == best_checkpoint.path
    history = (best if latest_is_best else read_checkpoint(result.checkpoint))["state"]["history"]
    best_epoch, best_val_loss = best["state"]["epoch"], best["state"]["best_val_loss"]

    model = build_model(config.model, processed.src_vocab_size, processed.tgt_vocab_size)
    model.load_state_dict(best["model"])
    # Defaults for `translate`; evaluate and register apply params.yaml's evaluate section themselves, so
    # changing the beam size never re-runs training.
    with outputs_together():  # the model and its reports: all new, or all as they were
        save_model_dir(
            paths.MODELS_DIR,
            model,
            config.model,
            processed.src_tokenizer,
            processed.tgt_tokenizer,
            EvaluateConfig().decoding(),
        )
        _write_history(paths.TRAIN_HISTORY, history)
        write_json(
            paths.TRAIN_METRICS,
            {
                "model": config.model.model_dump(mode="json"),
                "parameters": count_parameters(model),
                "best_epoch": best_epoch,
                "best_val_loss": round(best_val_loss, 4),
                "epochs_run": len(history),
            },
        )
        write_json(paths.TRAIN_RUN, {"mlflow_run_id": mlflow_run.run_id, "ray_run_name": run_name})
    store.finish_train_run(mlflow_run, best_epoch, paths.TRAIN_HISTORY)
    logger.info("best epoch %d (val_loss %.4f) -> %s", best_epoch, best_val_loss, paths.MODELS_DIR)


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)
