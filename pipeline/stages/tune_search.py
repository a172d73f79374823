"""The tune stage's search: Optuna + ASHA over Ray Train runs, each trial an MLflow child run of one
search run -> reports/best_params.json, reports/tune_trials.csv (`pipeline.training.tune_results`)."""

from __future__ import annotations

import logging
import math
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.data.processed import ProcessedData, load_processed
from pipeline.errors import PipelineError
from pipeline.files import outputs_together
from pipeline.fingerprint import code_fingerprint, directory_fingerprint, fingerprint
from pipeline.tracking import lineage, runs, store
from pipeline.training import tune_results
from pipeline.training.best_params import write_best_params
from pipeline.training.ray_session import (
    check_storage_path,
    joined_cluster_resources,
    ray_session,
    resolve_storage_path,
    worker_group_start_failure,
)
from pipeline.training.resources import SPARE_LOCAL_CPUS, check_local_cores, plan_tune, worker_resources
from pipeline.training.trainer import put_training_data
from pipeline.training.tuning import build_tuner

logger = logging.getLogger(__name__)


def run_search(config: PipelineConfig) -> None:
    """Search `tune.search_space` (`tune.num_samples` > 0) and write the best trial's values."""
    if not config.tune.search_space:
        raise PipelineError(
            "tune.search_space is empty: add dimensions, or set tune.num_samples: 0 to skip tuning"
        )

    check_local_cores(config.runtime)
    processed = load_processed()
    # Where the search goes, checked before Ray starts: bounded waits instead of minutes of retries.
    check_storage_path(config.runtime.storage_path)
    store.check_tracking_store()
    experiment_name = "tune-" + fingerprint(
        config.model,
        config.train,
        config.tune,
        directory_fingerprint(paths.PROCESSED_DIR),
        code_fingerprint(),
    )

    results, parent_run_id = _search(config, processed, experiment_name)
    rows = tune_results.trial_rows(results, config)
    error = tune_results.first_trial_error(results, rows)
    if error is not None:
        raise _worker_group_failure(config, error) or tune_results.every_trial_failed(error)
    best = tune_results.best_params(results, rows, config, parent_run_id)
    statuses = {row["trial_id"]: tune_results.mlflow_status(row) for row in rows}
    runs.finish_trial_runs(lineage.experiment_name(config), parent_run_id, statuses)
    with outputs_together():
        tune_results.write_trials(rows)
        write_best_params(best)
    runs.finish_search_run(parent_run_id, best.metric, best.best_value, best.overrides, paths.TUNE_TRIALS)
    logger.info(
        "best trial %s: %s=%.4f with %s", best.best_trial_id, best.metric, best.best_value, best.overrides
    )


def _search(config: PipelineConfig, processed: ProcessedData, experiment_name: str) -> tuple[Any, str]:
    """The Ray Tune search, each trial a Ray Train run; returns Tune's results and the MLflow parent run."""
    plan = plan_tune(config, None)
    cpus = math.ceil(plan.logical_cpus_needed) + SPARE_LOCAL_CPUS
    with ray_session(cpus, config.runtime.worker_start_timeout_s):
        cluster = joined_cluster_resources()
        if cluster is not None:
            plan = plan_tune(config, cluster)
        settings = config.tune
        logger.info(
            "Tune plan: %s; %d samples, %d epochs each",
            plan.describe(),
            settings.num_samples,
            settings.max_epochs,
        )
        data = put_training_data(processed, settings.max_examples)
        parent_run_id, trial_runs = runs.start_search_run(config, experiment_name)
        storage_path = resolve_storage_path(config.runtime.storage_path)
        tuner = build_tuner(config, data, plan, experiment_name, storage_path, trial_runs)
        with runs.failed_on_error(parent_run_id, store.tracking_uri()):
            return tuner.fit(), parent_run_id


def _worker_group_failure(config: PipelineConfig, error: BaseException | str) -> PipelineError | None:
    """A trial whose workers never started: the message that names the resources asked for and free."""
    if isinstance(error, str):
        return None
    asked = f"{config.runtime.num_workers} workers x {worker_resources(config.runtime)} per trial"
    return worker_group_start_failure(error, asked)
