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
