"""How a stage finds its Ray: its own local instance unless RAY_ADDRESS names a cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

START_AND_COUNT_CPUS = """
import ray
from pipeline.training.ray_session import ray_session
with ray_session(logical_cpus=3):
    print(int(ray.cluster_resources()["CPU"]))
"""


@pytest.mark.slow
def test_a_local_stage_starts_its_own_ray_where_ray_start_ran_before() -> None:
    """`ray start` leaves its cluster's address in Ray's temporary folder, and a plain `ray.init()` joins
    that cluster (refusing the CPU count there with a ValueError): a stage without RAY_ADDRESS must start
    its own instance all the same, as when tests or another pipeline run beside a cluster."""
    # Short: Ray's socket paths under its temporary folder must stay within the 107-byte AF_UNIX limit.
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # what `ray start` leaves behind
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(RAY_TMPDIR=str(temp), PYTHONPATH=str(REPO_ROOT))
        done = subprocess.run(
            [sys.executable, "-c", START_AND_COUNT_CPUS],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == max(os.cpu_count() or 1, 3)


def test_while_ray_starts_the_programs_sigterm_handler_stays_and_rays_is_not_set() -> None:
    """ray.init sets its SIGTERM handler (sys.exit wherever the signal lands, even in logging's after-fork
    callback, where Python drops the exception and the stop is lost) through one function of Ray's:
    while the program's handler is kept, that call sets nothing, and afterwards it works again."""
    import signal

    from ray._private import utils as ray_utils

    from pipeline.training.ray_session import _program_stop_handler_kept

    def programs_handler(_signum: int, _frame: object) -> None:
        raise AssertionError("not called here")

    def rays_handler(signum: int, _frame: object) -> None:
        sys.exit(signum)

    before = signal.signal(signal.SIGTERM, programs_handler)
    try:
        with _program_stop_handler_kept():
            ray_utils.set_sigterm_handler(rays_handler)  # what ray.init does first
            assert signal.getsignal(signal.SIGTERM) is programs_handler
        assert signal.getsignal(signal.SIGTERM) is programs_handler
        ray_utils.set_sigterm_handler(rays_handler)
        assert signal.getsignal(signal.SIGTERM) is rays_handler, "Ray's own function is back"
    finally:
        signal.signal(signal.SIGTERM, before)
