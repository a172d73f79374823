"""MLflow experiments and runs: one parent run per Ray Tune search with a child run per trial, one run per Ray
Train run (the evaluate stage adds its test scores), per-epoch metrics, datasets and system metrics. Runs
are found again by a key tag (the Ray run name, the Tune trial id), so a restarted worker group or driver
logs into the same run instead of creating a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.tracking.lineage import (
    TAG_DESCRIPTION,
    config_params,
    describe_model,
    experiment_name,
    lineage_tags,
)
from pipeline.tracking.store import mlflow_client, project_root, tracking_uri

# MLflow is imported in the functions that call it: an EpochMetricsLogger travels to every Ray Train worker,
# whose process imports this module to unpickle it, and only rank 0 logs.
logger = logging.getLogger(__name__)

TAG_RUN_KEY = "pipeline_run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"
TAG_TRIAL_ID = "tune_trial_id"
# MLflow 3's UI shows an experiment without this tag as a GenAI one (traces, evaluation runs); this kind
# gives the classic runs table, charts and models.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "Runs of seq2seq-pipeline: one parent run per Ray Tune search with a child run per trial, one run per "
    "Ray Train run (the evaluate stage adds its test scores), and the registered model's versions."
)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version, or by hand
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # Beside the default SQLite store, not in whatever directory the process happens to run in.
        artifact_location = (project_root() / "mlartifacts").as_uri()
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, TAG_DESCRIPTION: EXPERIMENT_DESCRIPTION}
    return client.create_experiment(name, artifact_location=artifact_location, tags=tags)


def get_or_create_run(
    experiment: str,
    run_key: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str],
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """The run tagged `run_key` in the experiment, created (with params) if there is none yet."""
    client = mlflow_client(uri)
    experiment_id = ensure_experiment(experiment, uri)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.{TAG_RUN_KEY} = '{run_key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {**tags, TAG_RUN_KEY: run_key}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    mlflow_client(uri).set_terminated(run_id, status=status)


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int | None = None, uri: str | None = None
) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
    mlflow_client(uri).log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    client = mlflow_client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifact(run_id: str, path: Path, uri: str | None = None) -> None:
    mlflow_client(uri).log_artifact(run_id, str(path))


def finish_trial_runs(experiment: str, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Close each trial's child run with its outcome. Tune ends trials by stopping their process (ASHA,
    the end of the search), so a trial cannot always close its own run."""
    client = mlflow_client()
    experiment_id = ensure_experiment(experiment)
    for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
    ):
        status = statuses.get(run.data.tags.get(TAG_TRIAL_ID, ""))
        if status and run.info.status != status:
            client.set_terminated(run.info.run_id, status=status)


@contextlib.contextmanager
def failed_on_error(run_id: str, uri: str | None = None) -> Iterator[None]:
    """Mark the run FAILED if the block raises, instead of leaving it RUNNING forever in the UI."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            finish_run(run_id, status="FAILED", uri=uri)
        raise


# ---------------------------------------------------------------------------------------------------------
# Logging from the training layer (these objects travel to Ray workers and Tune trials)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochMetricsLogger:
    """Rank 0's per-epoch metrics into one run; the URI travels explicitly, not through global state."""

    tracking_uri: str
    run_id: str

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            log_metrics(self.run_id, metrics, step=step, uri=self.tracking_uri)
        except Exception as error:  # tracking must never kill a training run
            logger.warning("could not log metrics to MLflow run %s: %s", self.run_id, error)

    def finish(self) -> None:
        finish_run(self.run_id, uri=self.tracking_uri)


@dataclass(frozen=True)
class TrialRuns:
    """One child run per Tune trial under the search's parent run, found again when a trial restarts."""

    experiment: str
    parent_run_id: str
    tracking_uri: str
    lineage_tags: dict[str, str]

    def open(self, trial_id: str, run_key: str, config: PipelineConfig) -> EpochMetricsLogger:
        run_id = get_or_create_run(
            self.experiment,
            run_key=run_key,
            run_name=f"trial-{trial_id}",
            tags={
                **self.lineage_tags,
                TAG_TRIAL_ID: trial_id,
                TAG_DESCRIPTION: f"Ray Tune trial {trial_id}: {describe_model(config.model.model_dump())}.",
            },
            params={**config_params(config, ("model", "train")), "tune.trial_id": trial_id},
            parent_run_id=self.parent_run_id,
            uri=self.tracking_uri,
        )
        return EpochMetricsLogger(self.tracking_uri, run_id)


def start_search_run(config: PipelineConfig, search_name: str) -> tuple[str, TrialRuns]:
    """The parent run of a Tune search (found again when the search resumes), and the opener of its
    trials' child runs."""
    uri = tracking_uri()
    tags = lineage_tags("tune", config)
    parent_run_id = get_or_create_run(
        experiment_name(config),
        run_key=search_name,
        run_name=search_name,
        tags=tags,
        params=config_params(config, ("model", "train", "tune")),
        uri=uri,
    )
    return parent_run_id, TrialRuns(experiment_name(config), parent_run_id, uri, tags)


def finish_search_run(
    run_id: str, metric: str | None, best_value: float | None, overrides: dict[str, Any], trials_csv: Path
) -> None:
    """The search's outcome on its parent run: the best value, the chosen values as tags, the trials."""
    if metric is not None and best_value is not None:
        log_metrics(run_id, {f"best_{metric}": best_value})
    set_tags(run_id, {f"best.{key}": str(value) for key, value in overrides.items()})
    log_artifact(run_id, trials_csv)
    finish_run(run_id)


def start_train_run(config: PipelineConfig, ray_run_name: str) -> EpochMetricsLogger:
    """One MLflow run per Ray Train run name: a resumed driver logs into the same run."""
    uri = tracking_uri()
    run_id = get_or_create_run(
        experiment_name(config),
        run_key=ray_run_name,
        run_name=ray_run_name,
        tags=lineage_tags("train", config),
        params=config_params(config, ("data", "preprocess", "model", "train")),
        uri=uri,
    )
    logger.info("MLflow run %s at %s", run_id, uri)
    return EpochMetricsLogger(uri, run_id)


SYSTEM_METRICS_INTERVAL_S = 10.0


@contextlib.contextmanager
def system_metrics(run: EpochMetricsLogger) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where pynvml finds one) of this node, sampled into the run's
    system metrics while the block runs: MLflow's "System metrics" panel."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=run.tracking_uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_split_inputs(
    run: EpochMetricsLogger,
    source: str,
    splits: dict[str, tuple[str, int]],
    hub: dict[str, Any] | None = None,
) -> None:
    """The splits a model was trained and scored on as the run's dataset inputs (MLflow's Datasets panel and
    lineage): name, digest (DVC's md5 of data/processed when dvc.lock has it), source, number of pairs.
    A Hub dataset's source is MLflow's own HuggingFaceDatasetSource (path, config_name, revision, split),
    with the version prepare read (`hub`)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "code" if source == "builtin" else "hugging_face" if source.startswith("hf:") else "local"
    inputs = [
        DatasetInput(
            Dataset(
                name=split,
                digest=digest[:36],
                source_type=source_type,
                source=_split_source(source, split, hub),
                profile=json.dumps({"num_rows": rows}),
            ),
            tags=[InputTag("mlflow.data.context", split)],
        )
        for split, (digest, rows) in splits.items()
    ]
    mlflow_client(run.tracking_uri).log_inputs(run.run_id, datasets=inputs)


def _split_source(source: str, split: str, hub: dict[str, Any] | None) -> str:
    if hub is None:
        return json.dumps({"uri": source, "split": split})
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    # `split` is the canonical name; the pipeline's split names are what its runs and tables use.
    return HuggingFaceDatasetSource(
        path=hub["path"], config_name=hub["config_name"], split=split, revision=hub["revision"]
    ).to_json()


def finish_train_run(run: EpochMetricsLogger, best_epoch: int, history_csv: Path) -> None:
    set_tags(run.run_id, {"best_epoch": str(best_epoch)}, uri=run.tracking_uri)
    log_artifact(run.run_id, history_csv, uri=run.tracking_uri)
    run.finish()


def existing_run(run_id: str) -> str | None:
    """`run_id` if this store has that run, else None (reports/train_run.json may come from elsewhere)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client().get_run(run_id).info.run_id
    except MlflowException:
        return None
