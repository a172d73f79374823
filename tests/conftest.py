"""Shared fixtures: one real local Ray instance and one real Ray head per test module, one torch thread
for tiny models. The helpers they use are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Two pytest-xdist workers share 2 cores, and most slow tests start more processes (stages, Ray workers,
# servers), each of which would take one intra-op thread per core: more busy threads than cores, which
# spin against each other. One thread per process, here and in every process the tests start, unless the
# shell sets another count. (Set before anything imports torch, which reads it once.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ray Train's controller polls its workers every 2 s, and a worker's report waits until the controller has
# taken the one before it: a tiny run that reports several times an epoch, and every run's end, wait on the
# poll. Polled 4 times a second, the fault matrix took 132 s against 174 s (one run of each).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# With every worker group, Ray Train starts a preemption watcher: an actor (a Python process importing Ray
# Train, about 1.5 CPU-seconds) that restarts the group when the cluster drains one of its nodes. No test
# drains a node (the cluster in a box kills its host outright), and the slow lane starts about 16 groups.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# A new Ray instance starts an idle worker process per logical CPU when its first driver connects, for tasks
# to come. Ray Train's actors do not take them (they ask for another runtime environment), so in a stage or
# module that only trains they start and stay idle: in the Tune test, 4 of them, 2.5 CPU-seconds.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# The tests start hundreds of Python processes (stages, Ray workers and actors, servers), and each one that
# finds no byte-code for a module compiles it again: torch, Ray and MLflow cost a process about 5 CPU-seconds
# more than with byte-code. Where writing it is off (PYTHONDONTWRITEBYTECODE, and a venv that pip installed
# with --no-compile, as the README's test command does, has none), it is turned back on for this process and
# every process it starts: the first to import a module writes its byte-code, and every later one reads it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from pipeline.progress import QUIET_ENV  # noqa: E402  (after the thread count and byte-code settings)
from tests.helpers import torch_threads  # noqa: E402

# `python -m pipeline -q ...` sets PIPELINE_QUIET in its own process, for the Ray processes it starts. A test
# that calls the CLI's main() in-process would leave it set for the rest of the session: every later
# subprocess (a `dvc repro` whose epoch lines a test reads) would then run quiet.
SESSION_QUIET = os.environ.get(QUIET_ENV)


# With `-n 2 --dist loadfile --no-loadscope-reorder`, pytest-xdist hands whole files to its workers in
# collection order, the next file to the first worker that is free. The slow lane's longest files first
# (longest-processing-time-first scheduling), so that no worker starts a long file while the others have
# nothing left to do. The order follows the durations that `--durations` prints; the other files keep theirs.
LONGEST_FILES_FIRST = (
    "test_pipeline_end_to_end.py",
    "test_cluster_box.py",
    "test_fault_matrix.py",
    "test_ray_data.py",
    "test_stop_signals_ray.py",
    "test_tune_stage.py",
    "test_multinode.py",
    "test_registry.py",
    "test_submit_job.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    place = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))  # stable: a file keeps its order


@pytest.fixture(autouse=True)
def quiet_flag_as_the_session_began() -> Iterator[None]:
    yield
    if SESSION_QUIET is None:
        os.environ.pop(QUIET_ENV, None)
    else:
        os.environ[QUIET_ENV] = SESSION_QUIET


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One real local Ray per module (start-up costs ~10 s). 4 logical CPUs on 2 cores: see ray_runtime."""
    from pipeline.training.ray_session import ray_session

    # The pipeline's own start: this instance's dashboard pinned for every process of the job, so a test
    # module never mistakes another local Ray (a pipeline run beside the tests) for its own.
    with ray_session(logical_cpus=4):
        yield


@pytest.fixture(scope="module")
def ray_head():
    """A real `ray start --head` with token authentication, for job submission (tests/ray_head.py)."""
    from tests.ray_head import started_ray_head

    try:
        with started_ray_head() as head:
            yield head
    except FileNotFoundError as error:
        pytest.skip(str(error))
