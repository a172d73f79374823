"""Stage `tune`: search model sizes and dropout -> reports/best_params.json, reports/tune_trials.csv."""

from __future__ import annotations

import csv
import logging
import math

from pipeline import paths
from pipeline.atomic import atomic_file, write_json
from pipeline.config import PipelineConfig
from pipeline.data.encoded import load_processed
from pipeline.errors import PipelineError
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint

logger = logging.getLogger(__name__)


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

    from pipeline import tracking
    from pipeline.ray_runtime import ray_session, resolve_storage_path
    from pipeline.training import put_training_data
    from pipeline.tuning import build_tuner, cluster_resources_if_remote, plan_resources, to_dotted_key

    plan = plan_resources(config, None)
    # One spare logical CPU: with an exact fit the Train worker group was seen never to start.
    with ray_session(math.ceil(plan.logical_cpus_needed) + 1):
        cluster = cluster_resources_if_remote()
        if cluster is not None:
            plan = plan_resources(config, cluster)
        logger.info(
            "Tune plan: %s; %d samples, %d epochs each",
            plan.describe(),
            settings.num_samples,
            settings.max_epochs,
        )
        data = put_training_data(processed, settings.max_examples)
        uri = tracking.tracking_uri()
        lineage = tracking.lineage_tags("tune")
        parent_run_id = tracking.get_or_create_run(
            config.tracking.experiment,
            run_key=experiment_name,
            run_name=experiment_name,
            tags=lineage,
            params=tracking.config_params(config, ("model", "train", "tune")),
            uri=uri,
        )
        tuner = build_tuner(
            config,
            data,
            plan,
            experiment_name,
            resolve_storage_path(config.train.storage_path),
            {"parent_run_id": parent_run_id, "tracking_uri": uri, "lineage_tags": lineage},
        )
        with tracking.failed_on_error(parent_run_id, uri):
            results = tuner.fit()

    rows = []
    for result in results:
        history = result.metrics_dataframe
        metric_values = history[settings.metric] if history is not None and settings.metric in history else []
        best_value = (min if settings.mode == "min" else max)(metric_values) if len(metric_values) else None
        epochs = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        rows.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id", result.path.rsplit("/", 1)[-1]),
                **{to_dotted_key(k): v for k, v in (result.config or {}).items()},
                f"best_{settings.metric}": best_value,
                "epochs_run": epochs,
                "stopped_early": result.error is None and epochs < settings.max_epochs,
                "status": "ERROR" if result.error else "TERMINATED",
            }
        )
    if not any(row["status"] != "ERROR" and row[f"best_{settings.metric}"] is not None for row in rows):
        first_error = next((r.error for r in results if r.error), "no trial reported a metric")
        raise PipelineError(f"every Tune trial failed; first error: {first_error}")
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    overrides = {to_dotted_key(k): v for k, v in best.config.items()}
    best_row = next(row for row in rows if row["trial_id"] == best.metrics["trial_id"])
    payload = {
        "search": settings.search_alg,
        "metric": settings.metric,
        "mode": settings.mode,
        "best_value": best_row[f"best_{settings.metric}"],
        "best_trial_id": best_row["trial_id"],
        "overrides": overrides,
        "n_trials": len(rows),
        "mlflow_parent_run_id": parent_run_id,
    }
    tracking.finish_trial_runs(
        config.tracking.experiment, parent_run_id, {row["trial_id"]: _mlflow_status(row) for row in rows}
    )
    _write_trials(rows)
    write_json(paths.BEST_PARAMS, payload)
    tracking.log_metrics(parent_run_id, {f"best_{settings.metric}": payload["best_value"]})
    tracking.set_tags(parent_run_id, {f"best.{k}": str(v) for k, v in overrides.items()})
    tracking.log_artifact(parent_run_id, paths.TUNE_TRIALS)
    tracking.finish_run(parent_run_id)
    logger.info(
        "best trial %s: %s=%.4f with %s",
        best_row["trial_id"],
        settings.metric,
        payload["best_value"],
        overrides,
    )


def _mlflow_status(row: dict) -> str:
    if row["status"] == "ERROR":
        return "FAILED"
    return "KILLED" if row["stopped_early"] else "FINISHED"


def _write_trials(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_file(paths.TUNE_TRIALS) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_passthrough(config: PipelineConfig) -> None:
    """Search off: train uses params.yaml's model section as it is."""
    logger.info("tune.num_samples is 0: no search, params.yaml's model section passes through")
    write_json(paths.BEST_PARAMS, {"search": "off", "overrides": {}, "model": config.model.model_dump()})
    with atomic_file(paths.TUNE_TRIALS) as handle:
        handle.write("trial_id\n")
