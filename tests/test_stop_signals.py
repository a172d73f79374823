"""A stage stopped by SIGTERM or Ctrl-C ends cleanly (exit 128+signal, one line, no traceback), removes
its temporaries and keeps the previous output; a later run removes what a killed run left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, pipeline_command, write_params

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def prepare(directory: Path, n_pairs: int) -> subprocess.Popen:
    write_params(directory, {"data": {"builtin": {"n_pairs": n_pairs}}})
    return subprocess.Popen(
        pipeline_command("prepare"),
        cwd=directory,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def temporaries(directory: Path) -> list[Path]:
    return sorted((directory / "data").glob(".prepared.*")) + sorted((directory / "reports").glob(".*tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_prepare_removes_its_temporaries_and_keeps_the_previous_output(
    tmp_path: Path, stop: signal.Signals
) -> None:
    assert prepare(tmp_path, 300).wait(timeout=120) == 0
    before = (tmp_path / "data" / "prepared" / "corpus.json").read_text()

    process = prepare(tmp_path, 400_000)  # tens of seconds of work
    deadline = time.monotonic() + 60
    while not list((tmp_path / "data").glob(".prepared.tmp-*")):  # stop it in the middle of its work
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + stop, stderr
    assert "Traceback" not in stderr and f"stopped by {stop.name}" in stderr
    assert temporaries(tmp_path) == []
    assert (tmp_path / "data" / "prepared" / "corpus.json").read_text() == before
    assert json.loads(before)  # still the complete previous output


@pytest.mark.slow
def test_a_later_run_removes_a_killed_runs_temporaries_but_not_a_live_ones(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "data" / f".prepared.tmp-{host}-{dead.pid}-abc123"
    live = tmp_path / "data" / f".prepared.tmp-{host}-{os.getpid()}-def456"  # a run in progress
    for folder in (stale, live):
        (folder / "train.arrow").parent.mkdir(parents=True)
        (folder / "train.arrow").write_bytes(b"partial")

    assert prepare(tmp_path, 300).wait(timeout=120) == 0

    assert not stale.exists() and live.exists()


def _a_frame_inside_logging():
    """A real frame whose code is logging's file, as the interpreter hands a signal handler when the signal
    arrives while logging runs (say at the start of `logging._releaseLock`, the module lock still held)."""
    import logging

    scope: dict = {"sys": sys}
    exec(compile("def frame():\n    return sys._getframe()\n", logging.__file__, "exec"), scope)
    return scope["frame"]()


def test_a_stop_signal_inside_logging_is_handled_again_shortly_instead_of_raised_there() -> None:
    from pipeline.__main__ import Stopped, _raise_stopped

    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: received.append(signum))
    try:
        _raise_stopped(signal.SIGUSR1, _a_frame_inside_logging())  # no exception here
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGUSR1], "the signal is sent again"
        with pytest.raises(Stopped):
            _raise_stopped(signal.SIGUSR1, sys._getframe())  # anywhere else: raised at once
    finally:
        signal.signal(signal.SIGUSR1, previous)
