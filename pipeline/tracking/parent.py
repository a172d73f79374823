"""Where `train.init_from` points: a model folder, or a registered version in this project's MLflow store
(the store other commands use: $MLFLOW_TRACKING_URI, else mlflow.db). Every failure is one line naming
the key, the value and the store, raised before preprocess or train does any work.

An alias (`models:/<name>@champion`) is resolved by `set-params` alone, which writes the version it
names into params.yaml: params.yaml is a DVC param dependency, so dvc.lock records the pinned version and
the same params always mean the same parent. A stage refuses an alias (`config.check_init_from_pinned`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import REGISTRY_PREFIX, registry_ref
from pipeline.errors import PipelineError
from pipeline.network.model_files import check_model_dir
from pipeline.tracking import registry, store
from pipeline.tracking.candidate import MODEL_DIR_ARTIFACT

KEY = "train.init_from"


def resolve_version(value: str) -> str:
    """The version number `value` (`models:/<name>/<version>` or `models:/<name>@<alias>`) names in the
    store; one error naming train.init_from, the value and the store when the model, version or alias is
    not there."""
    from mlflow.exceptions import MlflowException

    ref = registry_ref(value)
    uri = registry.registry_store_uri()
    missing = registry.missing_local_store(uri)
    if missing is not None:
        raise PipelineError(
            f"{KEY} {value!r}: there is no MLflow store at {missing} (set MLFLOW_TRACKING_URI to the store"
            " that holds the model)"
        )
    store.check_tracking_store()
    client = store.mlflow_client()
    what = f"alias @{ref.alias}" if ref.alias is not None else f"version {ref.version}"
    try:
        if ref.alias is not None:
            version = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            version = client.get_model_version(ref.name, str(ref.version))
    except MlflowException as error:
        reason = str(error.message).splitlines()[0] if error.message else error.error_code
        raise PipelineError(
            f"{KEY} {value!r}: the MLflow store {store.shown_uri(uri)} has no {what} of registered model"
            f" {ref.name!r} ({reason})"
        ) from None
    return str(version.version)


def check_folder(folder: str | Path, value: str) -> Path:
    """`folder` (what `value` names) as a model folder, checked as translate checks one (files, settings,
    tokenizers)."""
    try:
        check_model_dir(folder)
    except PipelineError as error:
        raise PipelineError(f"{KEY} {value!r} is not a usable model folder: {error}") from None
    return Path(folder)


@contextlib.contextmanager
def parent_model_dir(value: str) -> Iterator[Path]:
    """The parent's model folder: `value` itself, or the registered version downloaded into a temporary
    folder that goes when the block ends."""
    if not value.startswith(REGISTRY_PREFIX):
        yield check_folder(value, value)
        return
    name = registry_ref(value).name
    version = resolve_version(value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download_model_dir(f"models:/{name}/{version}", Path(tmp), MODEL_DIR_ARTIFACT)
        yield check_folder(folder, value)


@dataclass(frozen=True)
class PinnedAlias:
    alias_uri: str  # models:/<name>@<alias>, as asked for
    version: str
    pinned_uri: str  # models:/<name>/<version>, what params.yaml gets

    def line(self) -> str:
        return f"{KEY}: {self.alias_uri} is version {self.version}; params.yaml pins {self.pinned_uri}"


def pin_init_from(value: str | None) -> PinnedAlias | None:
    """set-params' check of a train.init_from it is asked to write: the folder or version must exist, and an
    alias is resolved to the version it names now (returned, for params.yaml)."""
    if value is None:
        return None
    if not value.startswith(REGISTRY_PREFIX):
        check_folder(value, value)
        return None
    ref = registry_ref(value)
    version = resolve_version(value)
    if ref.alias is None:
        return None
    return PinnedAlias(value, version, f"{REGISTRY_PREFIX}{ref.name}/{version}")
