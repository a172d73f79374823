"""What travels with a Ray job: the runtime env file (cluster/runtime_env.yaml or --runtime-env), the
project directory as its `working_dir` minus what must never leave this machine, and the settings of this
shell the stages need on the cluster. Everything is checked here, so mistakes fail before the upload.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pathspec import PathSpec  # Ray's own matcher for `excludes` (Ray depends on it)

from pipeline.errors import PipelineError
from pipeline.params_file import read_yaml_mapping
from pipeline.tracking.lineage import GIT_COMMIT_ENV, GIT_DIRTY_ENV, USER_ENV, read_git_state, user

DEFAULT_RUNTIME_ENV = Path("cluster/runtime_env.yaml")

# Files that hold credentials by convention (gitignore-style, as Ray matches `excludes`), at any depth.
SECRET_EXCLUDES = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".git-credentials",
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".docker/config.json",
    ".kube/",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.keystore",
    "*.jks",
    "credentials",
    "credentials.json",
    "*credentials*.json",
    "service-account*.json",
    "secrets/",
    ".secrets/",
    "secrets.*",
    "*.secret",
    "token",
    ".token",
    "*.token",
    "*_token",
    "*_token.txt",
    "token.txt",
    "token.json",
    ".huggingface/",
    ".cache/huggingface/token",
)
# Never uploaded, whatever the runtime env file says: history, local environments, local credentials.
# Ray itself also leaves out what .gitignore (and .rayignore) files ignore.
ALWAYS_EXCLUDE = ("/.git", ".venv", "/.dvc/config.local", "/.dvc/cache", *SECRET_EXCLUDES)
_NOT_WALKED = {".git", ".venv", ".dvc"}

# Settings the stages need on the cluster, passed on when set in this shell. Some are secrets: they go to
# the cluster inside the job's runtime env (never into a file), where anyone who can read the cluster's
# job list (the dashboard, `ray job list`) can see them. AWS access keys are deliberately absent: the
# nodes should reach S3 with their own IAM role; name them in PIPELINE_SUBMIT_ENV to send them anyway.
PASSTHROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "PIPELINE_SET",  # params.yaml overrides applied by cluster/run_pipeline.sh
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
EXTRA_ENV_NAMES = "PIPELINE_SUBMIT_ENV"  # comma-separated names of further variables to pass


def build_runtime_env(
    runtime_env_path: Path | None,
    project_root: Path,
    environ: Mapping[str, str],
    given: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The runtime env file (or `given`, from --runtime-env-json), plus the working dir, this shell's
    settings and the mandatory excludes.

    Returns the runtime env and the names of the variables taken from `environ` (values stay out of logs).
    """
    runtime_env = (
        check_runtime_env(given, "--runtime-env-json")
        if given is not None
        else (load_runtime_env_file(runtime_env_path))
    )
    runtime_env.setdefault("working_dir", str(project_root))

    excludes = list(runtime_env.get("excludes") or [])
    excludes += [pattern for pattern in ALWAYS_EXCLUDE if pattern not in excludes]
    runtime_env["excludes"] = excludes

    env_vars = dict(runtime_env.get("env_vars") or {})
    extra = [name.strip() for name in environ.get(EXTRA_ENV_NAMES, "").split(",") if name.strip()]
    missing = [name for name in extra if not environ.get(name)]
    if missing:
        raise PipelineError(f"{EXTRA_ENV_NAMES} names {', '.join(missing)}, which this shell does not set")
    passed = [name for name in dict.fromkeys((*PASSTHROUGH_ENV, *extra)) if environ.get(name)]
    env_vars.update({name: environ[name] for name in passed})
    git = read_git_state(project_root)
    if git:
        env_vars.setdefault(GIT_COMMIT_ENV, git.commit)
        env_vars.setdefault(GIT_DIRTY_ENV, git.dirty_flag)
    env_vars.setdefault(USER_ENV, user())
    runtime_env["env_vars"] = env_vars
    return runtime_env, passed


def excluded_secrets(project_root: Path) -> list[tuple[str, str]]:
    """(path, pattern) for each file of the project that a secret pattern keeps out of the upload: what
    `submit` reports, so a user sees what stayed behind and why."""
    specs = [(pattern, PathSpec.from_lines("gitwildmatch", [pattern])) for pattern in SECRET_EXCLUDES]
    found = []
    for directory, folders, files in os.walk(project_root):
        folders[:] = sorted(name for name in folders if name not in _NOT_WALKED)
        for name in sorted(files):
            relative = (Path(directory) / name).relative_to(project_root).as_posix()
            pattern = next((pattern for pattern, spec in specs if spec.match_file(relative)), None)
            if pattern is not None:
                found.append((relative, pattern))
    return found


def load_runtime_env_file(path: Path | None) -> dict[str, Any]:
    """`path`, else cluster/runtime_env.yaml if present; checked so mistakes fail here, not on the cluster."""
    if path is None:
        if not DEFAULT_RUNTIME_ENV.is_file():
            return {}
        path = DEFAULT_RUNTIME_ENV
    # Read as params.yaml is: a syntax error is one line naming the file and line, not PyYAML's excerpt.
    return check_runtime_env(read_yaml_mapping(path, "runtime env file", allow_empty=True), str(path))


def check_runtime_env(loaded: Any, source: str) -> dict[str, Any]:
    """A runtime env from a file or --runtime-env-json, checked so mistakes fail here, not on the cluster."""
    if not isinstance(loaded, dict):
        raise PipelineError(f"{source} must be a mapping of runtime env keys (env_vars, excludes, ...)")
    working_dir = loaded.get("working_dir")
    if working_dir is not None and not isinstance(working_dir, str):
        raise PipelineError(
            f"{source}: working_dir must be a string (a local folder or a URI such as s3://...),"
            f" got {working_dir!r}"
        )
    env_vars = loaded.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise PipelineError(f"{source}: env_vars must be a mapping of names to strings")
    for name, value in env_vars.items():
        if not isinstance(value, str):
            raise PipelineError(f'{source}: env_vars.{name} must be a string; quote it ({name}: "{value}")')
    excludes = loaded.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(pattern, str) for pattern in excludes):
        raise PipelineError(f"{source}: excludes must be a list of gitignore-style patterns")
    return loaded


def tracking_warnings(env_vars: Mapping[str, str]) -> list[str]:
    """The job logs to MLflow on the cluster; a store local to the job's copy of the project is lost."""
    uri = env_vars.get("MLFLOW_TRACKING_URI")
    if not uri:
        return [
            "MLFLOW_TRACKING_URI is not set: the job will log to an SQLite store inside its temporary copy "
            "of the project on the cluster, and the registered model goes when Ray evicts it. Set it to "
            "your tracking server (http://...)."
        ]
    if urlparse(uri).scheme in ("", "file", "sqlite"):
        return [
            f"MLFLOW_TRACKING_URI={uri} is a local store: the job writes it on the cluster's node, which "
            "only works when the cluster runs on this machine. Use a tracking server (http://...) otherwise."
        ]
    return []
