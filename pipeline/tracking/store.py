"""Where MLflow's store is and whether it answers: the tracking URI, the check a stage makes before its
work, and the one client factory. Runs are in runs.py, the model registry in registry.py; the rest of the
pipeline calls those, never MLflow's client itself.

Tracking URI: $MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the project root (the model
registry needs a database; $DVC_ROOT when DVC runs the project in a temporary copy), with artifacts in
`mlartifacts/` beside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse, urlsplit

from pipeline.errors import PipelineError

# MLflow and SQLAlchemy are imported in the functions that use them: `translate` of a model folder imports
# this module (through registry.py) and never checks or opens a store.


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


def shown_uri(uri: str) -> str:
    """`uri` without its password, for messages."""
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
            f"{variable}={shown_uri(uri)}: its database driver {module} is not installed here:"
            f" pip install '{package}'{other}"
        ) from None
    except (ArgumentError, NoSuchModuleError) as error:
        raise PipelineError(
            f"{variable}={shown_uri(uri)} is not a database URI that SQLAlchemy can use: {error}"
        ) from None


def _check_tracking_server(variable: str, uri: str, timeout_s: float) -> None:
    """One request to the server's health endpoint, no retries: any answer will do (it is there)."""
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
            reason = text.replace(uri, shown_uri(uri)).splitlines()[0]
        raise PipelineError(
            f"{variable}={shown_uri(uri)}: the MLflow tracking server cannot be reached ({reason}): start it,"
            " or fix the address"
        ) from None


def mlflow_client(uri: str | None = None):
    """MLflow's client on `uri`, else on this project's store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())
