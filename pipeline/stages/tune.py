"""Stage `tune`: search model sizes and dropout -> reports/best_params.json, reports/tune_trials.csv.

tune_trials.csv has one row per trial: its values, `best_value` (the best `tune.metric` it reported,
named in the `metric` column, so the DVC plot works whatever the metric), epochs run, whether it stopped
early and its status.
"""

from __future__ import annotations

import csv
import logging
import math
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.data.processed import load_processed
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, outputs_together, write_json
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint

logger = logging.getLogger(__name__)

TRIAL_COLUMNS = ("trial_id", "metric", "best_value", "epochs_run", "stopped_early", "status")


def run(config: PipelineConfig) -> None:
    settings = config.tune
    if settings.num_samples == 0:
        _write_passthrough(config)
        return
    if not settings.search_space:
        raise PipelineError(
            "tune.search_space is empty: add dimensions, or set tune.num_samples: 0 to skip tuning"
        )
    processed = load_processed()
    experiment_name = "tune-" + fingerprint(
        config.model, config.train, settings, directory_fingerprint(paths.PROCESSED_DIR), code_fingerprint()
    )

    from pipeline.tracking import lineage, store
    from pipeline.training.resources import SPARE_LOCAL_CPUS, plan_tune
    from pipeline.training.runtime import joined_cluster_resources, ray_session, resolve_storage_path
    from pipeline.training.trainer import put_training_data
    from pipeline.training.tuning import build_tuner, trial_overrides

    plan = plan_tune(config, None)
    with ray_session(
        math.ceil(plan.logical_cpus_needed) + SPARE_LOCAL_CPUS, config.runtime.worker_start_timeout_s
    ):
        cluster = joined_cluster_resources()
        if cluster is not None:
            plan = plan_tune(config, cluster)
        logger.info(
            "Tune plan: %s; %d samples, %d epochs each",
            plan.describe(),
            settings.num_samples,
            settings.max_epochs,
        )
        data = put_training_data(processed, settings.max_examples)
        uri = store.tracking_uri()
        tags = lineage.lineage_tags("tune", config)
        parent_run_id = store.get_or_create_run(
            lineage.experiment_name(config),
            run_key=experiment_name,
            run_name=experiment_name,
            tags=tags,
            params=lineage.config_params(config, ("model", "train", "tune")),
            uri=uri,
        )
        trial_runs = store.TrialRuns(lineage.experiment_name(config), parent_run_id, uri, tags)
        storage_path = resolve_storage_path(config.runtime.storage_path)
        tuner = build_tuner(config, data, plan, experiment_name, storage_path, trial_runs)
        with store.failed_on_error(parent_run_id, uri):
            results = tuner.fit()

    # One row per trial with its best value of the metric over all its epochs (Tune's own summary).
    best_rows = results.get_dataframe(filter_metric=settings.metric, filter_mode=settings.mode)
    # Trials that errored before their first report leave the metric column out (or the frame empty).
    has_values = {"trial_id", settings.metric} <= set(best_rows.columns)
    best_by_trial = (
        dict(zip(best_rows["trial_id"], best_rows[settings.metric], strict=True)) if has_values else {}
    )
    rows = [
        _trial_row(result, trial_overrides(result.config or {}), best_by_trial, config) for result in results
    ]
    if not any(row["status"] != "ERROR" and row["best_value"] is not None for row in rows):
        first_error = next((r.error for r in results if r.error), None)
        if first_error is not None:
            from pipeline.training.resources import worker_resources
            from pipeline.training.runtime import worker_group_start_failure

            asked = f"{config.train.num_workers} workers x {worker_resources(config.train)} per trial"
            failure = worker_group_start_failure(first_error, asked)
            if failure is not None:
                raise failure
        raise PipelineError(
            f"every Tune trial failed; first error: {first_error or 'no trial reported a metric'}"
        )
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    overrides = trial_overrides(best.config)
    best_row = next(row for row in rows if row["trial_id"] == best.metrics["trial_id"])
    payload = {
        "search": settings.search_alg,
        "metric": settings.metric,
        "mode": settings.mode,
        "best_value": best_row["best_value"],
        "best_trial_id": best_row["trial_id"],
        "overrides": overrides,
        "n_trials": len(rows),
        "mlflow_parent_run_id": parent_run_id,
    }
    store.finish_trial_runs(
        lineage.experiment_name(config), parent_run_id, {row["trial_id"]: _mlflow_status(row) for row in rows}
    )
    with outputs_together():
        _write_trials(rows)
        write_json(paths.BEST_PARAMS, payload)
    store.log_metrics(parent_run_id, {f"best_{settings.metric}": payload["best_value"]})
    store.set_tags(parent_run_id, {f"best.{k}": str(v) for k, v in overrides.items()})
    store.log_artifact(parent_run_id, paths.TUNE_TRIALS)
    store.finish_run(parent_run_id)
    logger.info(
        "best trial %s: %s=%.4f with %s",
        best_row["trial_id"],
        settings.metric,
        payload["best_value"],
        overrides,
    )


def _trial_row(
    result: Any, overrides: dict[str, Any], best_by_trial: dict[str, float], config: PipelineConfig
) -> dict[str, Any]:
    """One row of tune_trials.csv: the trial's values, its best metric value, how far it got."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id", result.path.rsplit("/", 1)[-1])
    epochs = int(metrics.get("training_iteration", 0))
    best_value = best_by_trial.get(trial_id)
    return {
        "trial_id": trial_id,
        **overrides,
        "metric": config.tune.metric,
        "best_value": None if best_value is None or math.isnan(best_value) else float(best_value),
        "epochs_run": epochs,
        "stopped_early": result.error is None and epochs < config.tune.max_epochs,
        "status": "ERROR" if result.error else "TERMINATED",
    }


def _mlflow_status(row: dict) -> str:
    if row["status"] == "ERROR":
        return "FAILED"
    return "KILLED" if row["stopped_early"] else "FINISHED"


def _write_trials(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(TRIAL_COLUMNS)
    with atomic_file(paths.TUNE_TRIALS) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_passthrough(config: PipelineConfig) -> None:
    """Search off: train uses params.yaml's model section as it is; the trials table is empty."""
    logger.info("tune.num_samples is 0: no search, params.yaml's model section passes through")
    with outputs_together():
        write_json(paths.BEST_PARAMS, {"search": "off", "overrides": {}, "model": config.model.model_dump()})
        _write_trials([])
