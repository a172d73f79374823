"""The MLflow model registry: registered models, versions, aliases and tags; logging a pyfunc model and
fetching a registered one back as a local model folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.errors import PipelineError
from pipeline.tracking.candidate import MODEL_DIR_ARTIFACT
from pipeline.tracking.store import check_tracking_store, mlflow_client, tracking_uri

if TYPE_CHECKING:  # MLflow is imported where it is used: `translate` of a folder never loads it
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

REGISTRY_SCHEME = "models:/"


def is_registry_uri(model: str) -> bool:
    return model.startswith(REGISTRY_SCHEME)


@contextlib.contextmanager
def local_model_dir(model: str) -> Iterator[Path]:
    """A model folder, or a registered version (`models:/name/version`, `models:/name@alias`) downloaded
    into a temporary folder that goes when the block ends: the one way `translate`, batch translation and
    serving get from what the user named to a folder `load_model_dir` reads."""
    if not is_registry_uri(model):
        yield Path(model)
        return
    if model.rstrip("/") == REGISTRY_SCHEME.rstrip("/"):
        raise PipelineError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {model!r}")
    with tempfile.TemporaryDirectory() as tmp:
        yield download_model_dir(model, Path(tmp), MODEL_DIR_ARTIFACT)


def ensure_registered_model(name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client().create_registered_model(name, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def create_model_version(
    name: str, info: ModelInfo, run_id: str, tags: dict[str, str], description: str
) -> ModelVersion:
    return mlflow_client().create_model_version(
        name, source=info.model_uri, run_id=run_id, model_id=info.model_id, tags=tags, description=description
    )


def find_model_version(name: str, tag: str, value: str) -> ModelVersion | None:
    """The version of `name` whose tag `tag` is `value`, if any."""
    for version in mlflow_client().search_model_versions(f"name='{name}'"):
        if version.tags.get(tag) == value:
            return version
    return None


def model_aliases(name: str) -> dict[str, str]:
    """alias -> version number (as a string) of a registered model."""
    return {
        alias: str(number) for alias, number in mlflow_client().get_registered_model(name).aliases.items()
    }


def get_model_version(name: str, version: str) -> ModelVersion:
    return mlflow_client().get_model_version(name, str(version))


def set_alias(name: str, alias: str, version: str) -> None:
    mlflow_client().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    client = mlflow_client()
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


def registry_store_uri() -> str:
    """The store that holds registered models, as MLflow's client picks it: $MLFLOW_REGISTRY_URI, else the
    tracking store."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def download_model_dir(model_uri: str, dst: Path, artifact: str) -> Path:
    """Download a registered pyfunc model into `dst`; returns its artifact `artifact` (the model folder).

    Only files come back (safetensors, JSON): nothing is unpickled, and no model code is run to get them.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri, registry_uri = tracking_uri(), registry_store_uri()
    for store_uri in dict.fromkeys((uri, registry_uri)):
        missing = missing_local_store(store_uri)
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


def missing_local_store(uri: str) -> Path | None:
    """The file or folder of a local store (SQLite, file) that does not exist: MLflow would create it (an
    empty 1 MB database in the project) only to report that the model is not there."""
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
