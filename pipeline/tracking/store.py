"""Every call to MLflow, in one module: experiments and runs, per-epoch and per-trial logging, the model
registry, and logging or fetching a pyfunc model. The rest of the pipeline calls these functions, never
MLflow's client itself.

Tracking URI: $MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the project root (the model
registry needs a database; $DVC_ROOT when DVC runs the project in a temporary copy), with artifacts in
`mlartifacts/` beside it. Runs are found again by a key
tag (the Ray run name, the Tune trial id), so a restarted worker group or driver logs into the same run
instead of creating a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.tracking.lineage import (
    TAG_DESCRIPTION,
    config_params,
    describe_model,
    experiment_name,
    lineage_tags,
)

if TYPE_CHECKING:  # MLflow and torch are imported where they are used: stages import this module cheaply
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo


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


# ---------------------------------------------------------------------------------------------------------
# Experiments and runs
# ---------------------------------------------------------------------------------------------------------


def project_root() -> Path:
    """Where the default store lives: $DVC_ROOT, which `dvc exp run --temp` and `dvc queue` set to the
    project while they run it in a temporary copy (a store there would be deleted with the copy), else the
    working directory (`dvc repro` and `python -m pipeline` run in the project root)."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


# How long the check before a stage's work waits for a tracking server (MLflow's own client retries an
# unreachable one for minutes, printing a warning each time).
TRACKING_CHECK_TIMEOUT_S = 10.0
# The pip package of each database driver SQLAlchemy imports, where it is not the module's name.
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
}


def check_tracking_store(timeout_s: float = TRACKING_CHECK_TIMEOUT_S) -> None:
    """The stores a stage logs to ($MLFLOW_TRACKING_URI, $MLFLOW_REGISTRY_URI), checked before its work:
    a database store's driver is installed, a tracking server answers within `timeout_s`. A PipelineError
    naming the variable and the fix otherwise."""
    from urllib.parse import urlparse

    from mlflow.store.db.db_types import DATABASE_ENGINES

    stores = {"MLFLOW_TRACKING_URI": tracking_uri()}
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        stores["MLFLOW_REGISTRY_URI"] = os.environ["MLFLOW_REGISTRY_URI"]
    for variable, uri in stores.items():
        scheme = urlparse(uri).scheme.lower()
        if scheme.split("+")[0] in DATABASE_ENGINES:
            _check_database_driver(variable, uri)
        elif scheme in ("http", "https"):
            _check_tracking_server(variable, uri, timeout_s)


def _shown(uri: str) -> str:
    """`uri` without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _check_database_driver(variable: str, uri: str) -> None:
    """The Python driver of a database store imports (MLflow would fail with a bare ModuleNotFoundError)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ModuleNotFoundError as error:
        module = error.name or str(error)
        package = _DRIVER_PACKAGES.get(module, module)
        other = ", or name an installed driver (postgresql+psycopg2://...)" if "psycopg" in module else ""
        raise PipelineError(
            f"{variable}={_shown(uri)}: its database driver {module} is not installed here:"
            f" pip install '{package}'{other}"
        ) from None
    except (ArgumentError, NoSuchModuleError) as error:
        raise PipelineError(
            f"{variable}={_shown(uri)} is not a database URI that SQLAlchemy can use: {error}"
        ) from None


def _check_tracking_server(variable: str, uri: str, timeout_s: float) -> None:
    """One request to the server's health endpoint, no retries: any answer will do (it is there)."""
    import re

    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(
            get_default_host_creds(uri),
            "/health",
            "GET",
            max_retries=0,
            timeout=timeout_s,
            raise_on_status=False,
        )
    except MlflowException as error:
        text = str(error)
        found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
        if found:
            reason = found[1].strip()
        elif "timed out" in text.lower() or "timeout" in text.lower():
            reason = f"no answer within {timeout_s:g} s"
        else:
            reason = text.replace(uri, _shown(uri)).splitlines()[0]
        raise PipelineError(
            f"{variable}={_shown(uri)}: the MLflow tracking server cannot be reached ({reason}): start it,"
            " or fix the address"
        ) from None


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(name: str, uri: str | None = None) -> str:
    client = _client(uri)
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
    client = _client(uri)
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
    _client(uri).set_terminated(run_id, status=status)


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int | None = None, uri: str | None = None
) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
    _client(uri).log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifact(run_id: str, path: Path, uri: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path))


def finish_trial_runs(experiment: str, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Close each trial's child run with its outcome. Tune ends trials by stopping their process (ASHA,
    the end of the search), so a trial cannot always close its own run."""
    client = _client()
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
    _client(run.tracking_uri).log_inputs(run.run_id, datasets=inputs)


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


# ---------------------------------------------------------------------------------------------------------
# The model registry
# ---------------------------------------------------------------------------------------------------------


def existing_run(run_id: str) -> str | None:
    """`run_id` if this store has that run, else None (reports/train_run.json may come from elsewhere)."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_run(run_id).info.run_id
    except MlflowException:
        return None


def ensure_registered_model(name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        _client().create_registered_model(name, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def create_model_version(
    name: str, info: ModelInfo, run_id: str, tags: dict[str, str], description: str
) -> ModelVersion:
    return _client().create_model_version(
        name, source=info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags, description=description
    )


def find_model_version(name: str, tag: str, value: str) -> ModelVersion | None:
    """The version of `name` whose tag `tag` is `value`, if any."""
    for version in _client().search_model_versions(f"name='{name}'"):
        if version.tags.get(tag) == value:
            return version
    return None


def model_aliases(name: str) -> dict[str, str]:
    """alias -> version number (as a string) of a registered model."""
    return {alias: str(number) for alias, number in _client().get_registered_model(name).aliases.items()}


def get_model_version(name: str, version: str) -> ModelVersion:
    return _client().get_model_version(name, str(version))


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def model_signature(default_beam_size: int, beam_size_param: str) -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # Unnamed string columns: a plain JSON list ({"inputs": [...]}) then maps onto the input without a
    # column name, and a one-column DataFrame (dataframe_split/records, CSV) works whatever its name.
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(beam_size_param, "long", default_beam_size)]),
    )


@contextlib.contextmanager
def _fluent_tracking_uri() -> Iterator[None]:
    """Point MLflow's global URI (all `log_model` knows) at our store for a while, then restore it.

    Setting it also exports MLFLOW_TRACKING_URI, which `ensure_experiment` reads to decide where new
    experiments keep their artifacts, so the variable must not outlive the call either.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri())
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both the global and the variable


def log_pyfunc_model(run_id: str, name: str, **log_model_kwargs: Any) -> ModelInfo:
    """`mlflow.pyfunc.log_model(name=..., **log_model_kwargs)` into the run `run_id`."""
    import mlflow

    with _fluent_tracking_uri(), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(name=name, **log_model_kwargs)


def download_model_dir(model_uri: str, dst: Path, artifact: str) -> Path:
    """Download a registered pyfunc model into `dst`; returns its artifact `artifact` (the model folder).

    Only files come back (safetensors, JSON): nothing is unpickled, and no model code is run to get them.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri = tracking_uri()
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    for store_uri in dict.fromkeys((uri, registry_uri)):
        missing = _missing_local_store(store_uri)
        if missing is not None:
            raise PipelineError(
                f"cannot fetch {model_uri}: there is no MLflow store at {missing} (run the register stage"
                " first, or set MLFLOW_TRACKING_URI to the store that holds the model)"
            )
    check_tracking_store()
    try:
        local = Path(
            download_artifacts(
                artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri, registry_uri=registry_uri
            )
        )
    except MlflowException as error:
        raise PipelineError(f"cannot fetch {model_uri} from {uri}: {error.message}") from None
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    relative = artifacts.get(artifact, {}).get("path")
    if not relative:
        raise PipelineError(
            f"{model_uri} has no '{artifact}' artifact: not a model logged by the register stage"
        )
    return local / relative


def _missing_local_store(uri: str) -> Path | None:
    """The file or folder of a local store (SQLite, file) that does not exist: MLflow would create it (an
    empty 1 MB database in the project) only to report that the model is not there."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        location = uri.removeprefix("sqlite:///")  # sqlite:///relative.db, sqlite:////absolute.db
        if not location or location.startswith(":memory:"):
            return None
    elif scheme == "file":
        location = urlparse(uri).path
    elif scheme == "":
        location = uri
    else:
        return None
    path = Path(location.split("?")[0])
    return None if path.exists() else path
