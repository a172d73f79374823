"""A stage that runs on Ray stopped by SIGTERM or Ctrl-C ends as the local stages do: exit 128+signal, one
line, no traceback or native stack dump, its temporaries removed and the previous outputs kept. Ray installs
its own handlers (ray.init for SIGTERM, Ray Train's fit for SIGINT); the stage's must stay in charge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, TINY_PARAMS, deep_merge, pipeline_command, prepare_project, write_params

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
ENV.pop("RAY_ADDRESS", None)  # a local Ray of the stage's own


def _start(directory: Path, stage: str) -> subprocess.Popen:
    return subprocess.Popen(
        pipeline_command(stage),
        cwd=directory,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop_when(process: subprocess.Popen, ready: Callable[[], bool], stop: signal.Signals) -> str:
    """Send `stop` once `ready()` holds; the process's stderr. The process is killed if it outlives this."""
    try:
        deadline = time.monotonic() + 360  # a loaded 2-core machine takes minutes
        while not ready():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the stage never got to the point to stop it at"
            time.sleep(0.1)
        process.send_signal(stop)
        try:
            return process.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"still running 120 s after {stop.name}:\n" + process.communicate()[1][-6000:])
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _assert_stopped(process: subprocess.Popen, stderr: str, stop: signal.Signals) -> None:
    assert process.returncode == 128 + stop, stderr[-3000:]
    assert f"stopped by {stop.name}: outputs of the interrupted step were not replaced" in stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr and "*** SIG" not in stderr


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_train_ends_with_one_line_and_writes_nothing(tmp_path: Path, stop: signal.Signals) -> None:
    prepare_project(tmp_path)
    write_params(tmp_path, deep_merge(TINY_PARAMS, {"train": {"epochs": 200}}))  # far from done when stopped
    process = _start(tmp_path, "train")

    # Inside Ray Train's fit: the first checkpoint of the run is written.
    stderr = _stop_when(process, lambda: any((tmp_path / "runs" / "ray").glob("train-*/checkpoint_*")), stop)

    _assert_stopped(process, stderr, stop)
    assert not (tmp_path / "models").exists()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "prepare_metrics.json",
        "prepare_stats.json",
    ]
    assert _temporaries(tmp_path) == []


def test_a_stopped_prepare_on_ray_removes_its_temporaries_and_keeps_the_previous_output(
    tmp_path: Path,
) -> None:
    write_params(tmp_path, {"data": {"builtin": {"n_pairs": 300}}})
    assert _start(tmp_path, "prepare").wait(timeout=120) == 0
    before = (tmp_path / "data" / "prepared" / "corpus.json").read_text()
    write_params(tmp_path, {"data": {"engine": "ray", "builtin": {"n_pairs": 400_000}}})
    process = _start(tmp_path, "prepare")

    # Ray is up (its session folder names this process) and the temporary output is being written.
    def working() -> bool:
        return bool(list((tmp_path / "data").glob(".prepared.tmp-*"))) and any(
            Path("/tmp/ray").glob(f"session_*_{process.pid}")
        )

    stderr = _stop_when(process, working, signal.SIGTERM)

    _assert_stopped(process, stderr, signal.SIGTERM)
    assert _temporaries(tmp_path) == []
    assert (tmp_path / "data" / "prepared" / "corpus.json").read_text() == before
    assert json.loads(before)
