"""Faults at the worst moments, and a rerun that finishes with nothing lost and nothing duplicated.

Here: SIGKILL in register between logging the model version and setting its aliases (real MLflow store),
and SIGTERM in the middle of `dvc repro` (real DVC). The Ray faults live beside the reference run they are
compared with, in test_training_ray.py: a worker SIGKILLed mid-epoch (resumes at the reported batch, ends
bit for bit equal to an uninterrupted run) and the driver SIGKILLed during train (the rerun resumes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TINY_PARAMS, deep_merge
from tests.dvc_project import make_dvc_project, project_env, run
from tests.test_registry import MODEL_NAME, Project, project, workspace  # noqa: F401 - fixtures

KILL_BEFORE_ALIASES = textwrap.dedent(
    """
    import os, signal
    from pipeline.config import load_config
    from pipeline.stages import register

    def die(*args, **kwargs):  # the version is registered and tagged; its aliases are not set yet
        os.kill(os.getpid(), signal.SIGKILL)

    register._apply = die
    register.run(load_config("params.yaml"))
    """
)


def test_register_killed_before_its_aliases_registers_once_on_rerun(project: Project) -> None:  # noqa: F811
    from pipeline.stages import evaluate
    from pipeline.stages import register as register_stage

    shutil.copytree(project.workspace.models["good"], project.root / "models")
    evaluate.run(project.config())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_ALIASES],
        cwd=project.root,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(project.client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert project.aliases() == {}, "killed before the aliases"

    register_stage.run(project.config())

    report = json.loads((project.root / "reports" / "registry.json").read_text())
    assert (report["version"], report["decision"], report["new_version"]) == (1, "promoted", False)
    assert len(project.client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert project.aliases() == {"challenger": 1, "champion": 1}


@pytest.mark.slow
def test_dvc_repro_stopped_in_prepare_finishes_on_rerun_with_nothing_left_over(tmp_path: Path) -> None:
    params = deep_merge(
        TINY_PARAMS, {"data": {"builtin": {"n_pairs": 400_000}}}
    )  # tens of seconds of prepare
    project_dir = make_dvc_project(tmp_path, params)
    repro = subprocess.Popen(
        ["dvc", "repro", "prepare"],
        cwd=project_dir,
        env=project_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((project_dir / "data").glob(".prepared.tmp-*")):
        assert repro.poll() is None and time.monotonic() < deadline, repro.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(repro.pid, signal.SIGTERM)  # what a CI cancel or `timeout` sends: the whole group
    output, _ = repro.communicate(timeout=120)
    assert repro.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    assert not list(project_dir.rglob(".prepared.tmp-*")) and not (project_dir / "data" / "prepared").exists()

    small = deep_merge(TINY_PARAMS, {"data": {"builtin": {"n_pairs": 400}}})
    (project_dir / "params.yaml").write_text(json.dumps(small))  # JSON is YAML: a quicker rerun
    run(["dvc", "repro", "prepare"], project_dir)
    assert json.loads((project_dir / "reports" / "prepare_stats.json").read_text())["pairs"]["train"] > 0
    assert "changed" not in run(["dvc", "status", "prepare"], project_dir).stdout
