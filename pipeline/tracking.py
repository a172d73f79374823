"""MLflow runs: where they are stored, what they are tagged with, and how they are found again.

Tracking URI: $MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the project root (the model
registry needs a database), with artifacts in `mlartifacts/` beside it. Runs are found again by a key
tag (the Ray run name, the Tune trial id), so a restarted worker group or driver logs into the same run
instead of creating a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # the translator pulls in torch; tracking is imported where torch is not needed
    from pipeline.translator import Translator

logger = logging.getLogger(__name__)

TAG_GIT_COMMIT = "git_commit"
TAG_DATA_HASH = "dvc_data_processed_md5"
TAG_STAGE = "pipeline_stage"
TAG_RUN_KEY = "pipeline_run_key"
PARENT_RUN_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(name: str, uri: str | None = None) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # Beside the default SQLite store, not in whatever directory the process happens to run in.
        artifact_location = (Path("mlartifacts").resolve()).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def read_git_commit(project_root: Path = Path(".")) -> str | None:
    """`<sha>` or `<sha>-dirty`; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        # --no-optional-locks: only read the index, even when git would like to refresh it.
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    sha = commit.stdout.strip()
    return f"{sha}-dirty" if dirty else sha


def git_commit() -> str:
    """The commit the code came from; a Ray job's uploaded copy has no .git, so `submit` passes it."""
    return os.environ.get("PIPELINE_GIT_COMMIT") or read_git_commit() or "unknown"


def processed_data_hash() -> str:
    """The md5 DVC recorded for data/processed in dvc.lock: ties a run to the exact encoded data."""
    if not paths.DVC_LOCK.is_file():
        return "unknown"
    lock = yaml.safe_load(paths.DVC_LOCK.read_text(encoding="utf-8")) or {}
    for out in lock.get("stages", {}).get("preprocess", {}).get("outs", []):
        if Path(out.get("path", "")) == paths.PROCESSED_DIR:
            return str(out.get("md5", "unknown"))
    return "unknown"


def lineage_tags(stage: str) -> dict[str, str]:
    return {TAG_GIT_COMMIT: git_commit(), TAG_DATA_HASH: processed_data_hash(), TAG_STAGE: stage}


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"model": {"emb_dim": 8}} -> {"model.emb_dim": 8}: MLflow params are flat strings."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: value}


def config_params(config: PipelineConfig, sections: tuple[str, ...]) -> dict[str, str]:
    dumped = config.model_dump(mode="json", by_alias=True)
    params = {}
    for section in sections:
        params.update(flatten(section, dumped[section]))
    return {key: str(value)[:6000] for key, value in params.items()}


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
        status = statuses.get(run.data.tags.get("tune_trial_id", ""))
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


class EpochMetricsLogger:
    """Used by rank 0 inside a Ray Train worker: the URI travels explicitly, not through global state."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            log_metrics(self.run_id, metrics, step=step, uri=self.tracking_uri)
        except Exception as error:  # tracking must never kill a training run
            logger.warning("could not log metrics to MLflow run %s: %s", self.run_id, error)


def start_train_run(config: PipelineConfig, ray_run_name: str) -> dict[str, str]:
    """One MLflow run per Ray Train run name: a resumed driver logs into the same run."""
    uri = tracking_uri()
    run_id = get_or_create_run(
        config.tracking.experiment,
        run_key=ray_run_name,
        run_name=ray_run_name,
        tags=lineage_tags("train"),
        params=config_params(config, ("data", "preprocess", "model", "train")),
        uri=uri,
    )
    logger.info("MLflow run %s at %s", run_id, uri)
    return {"tracking_uri": uri, "run_id": run_id}


def finish_train_run(mlflow_run: dict[str, str], best_epoch: int, history_csv: Path) -> None:
    set_tags(mlflow_run["run_id"], {"best_epoch": str(best_epoch)}, uri=mlflow_run["tracking_uri"])
    log_artifact(mlflow_run["run_id"], history_csv, uri=mlflow_run["tracking_uri"])
    finish_run(mlflow_run["run_id"], uri=mlflow_run["tracking_uri"])


# Registered models back as model folders (pipeline.registry logs and registers them).


def download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a registered pyfunc model into `dst`; returns its copy of the model folder (models/ files).

    Only files come back (safetensors, JSON): nothing is unpickled, and no model code is run to get them.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from pipeline.pyfunc_model import MODEL_DIR_ARTIFACT

    uri = tracking_uri()
    try:
        local = Path(
            download_artifacts(
                artifact_uri=model_uri,
                dst_path=str(dst),
                tracking_uri=uri,
                registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri,
            )
        )
    except MlflowException as error:
        raise PipelineError(f"cannot fetch {model_uri} from {uri}: {error.message}") from None
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    relative = artifacts.get(MODEL_DIR_ARTIFACT, {}).get("path")
    if not relative:
        raise PipelineError(
            f"{model_uri} has no '{MODEL_DIR_ARTIFACT}' artifact: not a model logged by the register stage"
        )
    return local / relative


def load_translator_from_registry(model_uri: str) -> Translator:
    """`models:/name@alias` or `models:/name/version` -> a Translator from that version's model folder."""
    import tempfile

    from pipeline.model_io import load_model_dir
    from pipeline.translator import Translator

    if not model_uri.startswith("models:/") or model_uri.rstrip("/") == "models:":
        raise PipelineError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}")
    with tempfile.TemporaryDirectory() as tmp:
        # load_model_dir reads every file into memory, so the download can go once it returns.
        loaded = load_model_dir(download_model_dir(model_uri, Path(tmp)))
    return Translator(loaded)
