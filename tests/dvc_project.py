"""A throw-away git + DVC project holding a copy of this one, for real `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO_ROOT, write_params

PROJECT_FILES = (
    "dvc.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots/offline.html",
    "corpus/README.md",
)


def project_env() -> dict[str, str]:
    """The test interpreter's bin/ first on PATH: dvc.yaml's `python -m pipeline` must find this venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def make_dvc_project(directory: Path, params: dict[str, Any]) -> Path:
    """Copy the code, cluster files and DVC config into `directory`; commit them to a fresh git repo."""
    for folder in ("pipeline", "cluster"):
        shutil.copytree(REPO_ROOT / folder, directory / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, directory / name)
    write_params(directory, params)
    run(["git", "init", "-q"], directory)
    commit_all(directory, "project")
    return directory


def commit_all(directory: Path, message: str) -> None:
    """`git add -A` and a commit in the project at `directory`, under a test identity (an empty one when
    nothing changed: a test run alone finds the project as its fixture left it)."""
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run([*git, "add", "-A"], directory)
    run([*git, "commit", "-qm", message, "--allow-empty"], directory)
