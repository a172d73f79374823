"""Join the Ray cluster named by RAY_ADDRESS, or start a local instance sized for the job.

Same code on a laptop and on a cluster: only the environment differs. `cluster_address` is the one place
that reads RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import ray
from ray._private import utils as ray_utils  # where ray.init sets its SIGTERM handler

from pipeline.errors import PipelineError
from pipeline.progress import QUIET_ENV, quiet

logger = logging.getLogger(__name__)


def cluster_address() -> str | None:
    """The Ray cluster this process joins ($RAY_ADDRESS), or None: it starts a local instance itself."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.split("://", 1)[0].lower() in ("http", "https"):
        # What `export RAY_ADDRESS=http://127.0.0.1:8265` (for `ray job ...`) does to a stage in that shell.
        raise PipelineError(
            f"RAY_ADDRESS={address} is a jobs (dashboard) address, not a cluster one: for the jobs API set"
            " RAY_API_SERVER_ADDRESS instead, and unset RAY_ADDRESS to run this stage on a local Ray (or give"
            " the cluster's GCS address, host:6379)"
        )
    return address


# Read by Ray Train's controller (an actor): how long a worker group may take to get its resources.
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Read by Ray's state API client wherever it runs; unset, it looks for "the" local Ray and fails (and Train's
# placement-group cleaner with it) when another pipeline on the machine runs one too.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def ray_session(logical_cpus: float = 0.0, worker_start_timeout_s: float | None = None) -> Iterator[None]:
    """Ray for the duration of a stage; shut down only if this stage started it (tests share one)."""
    started = connect_ray(logical_cpus, worker_start_timeout_s)
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C, or the CLI's stop signals (its Stopped is one)
        if started:
            _stop_forwarding_ray_process_output()
        raise
    finally:
        if started:
            ray.shutdown()


def _stop_forwarding_ray_process_output() -> None:
    """Stopped, the stage ends with one line; what Ray's actors print while they are torn down (Train's
    controller: a traceback when the actor it asks for resources is already gone) would follow it to the
    user's terminal. Ray forwards its processes' output through a dispatcher that `ray.shutdown` also
    empties; the lines its de-duplicator still holds are dropped with it. (Ray internals: if they are
    renamed, the stop still works and only the muting is lost, which tests/test_stop_signals_ray.py shows.)"""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._private.ray_logging import (
            global_worker_stdstream_dispatcher,
            stderr_deduplicator,
            stdout_deduplicator,
        )

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        stdout_deduplicator.flush()
        stderr_deduplicator.flush()


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect_ray(logical_cpus: float = 0.0, worker_start_timeout_s: float | None = None) -> bool:
    """Connect unless connected; True if this call started or joined Ray. Locally, advertise at least
    `logical_cpus` CPUs.

    Ray does not enforce CPU counts; they are scheduling tokens. Advertising a few more than the cores
    lets a Tune trial and its Train workers be placed together on a 2-core laptop, which the exact count
    does not (the worker group never starts).
    """
    if ray.is_initialized():
        return False
    address = cluster_address()
    # Train V2's driver-side logs are what users read; keep Ray's own start-up chatter out.
    common: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": logging.WARNING}
    env_vars = {}
    if worker_start_timeout_s is not None:
        env_vars[WORKER_START_TIMEOUT_ENV] = str(worker_start_timeout_s)
    if quiet():
        env_vars[QUIET_ENV] = "1"
    if address:
        env_vars["RAY_ADDRESS"] = address  # the state API in every process of the job asks this cluster
    else:
        # Our own instance's dashboard, on a port chosen here so every process of this job (the job's
        # runtime env reaches them all) asks this instance, never another pipeline's on the same machine.
        port = _free_local_port()
        env_vars[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        common.update(dashboard_host="127.0.0.1", dashboard_port=port)
    if env_vars:
        common["runtime_env"] = {"env_vars": env_vars}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        try:
            with _program_stop_handler_kept():
                ray.init(address=address, **common)
        except ConnectionError as error:
            raise PipelineError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {error}") from None
        return True
    num_cpus = max(os.cpu_count() or 1, math.ceil(logical_cpus))
    logger.info("starting a local Ray instance with %d logical CPUs", num_cpus)
    # The dashboard (127.0.0.1 only) serves the state API that Train V2's placement-group cleaner uses.
    with _program_stop_handler_kept():
        # "local": a new instance even when `ray start` ran on this machine. Without it ray.init joins the
        # cluster named in /tmp/ray/ray_current_cluster (and refuses num_cpus there with a ValueError).
        ray.init(address="local", num_cpus=num_cpus, **common)
    return True


@contextlib.contextmanager
def _program_stop_handler_kept() -> Iterator[None]:
    """`ray.init` replaces the SIGTERM handler twice: in Python with one that calls sys.exit, then natively
    in its core worker with one that prints a native stack dump and aborts (exit 134). A handler the
    program set (the CLI's, which stops the stage with one line and its temporaries removed) stays in
    charge: Ray's Python one is not set (it raises SystemExit wherever the signal lands, even in logging's
    after-fork callback, ray.init starting processes, where Python prints "Exception ignored" and drops
    it: the stop was lost and logging's lock left held), and the native one is replaced again afterwards.
    If Ray sets its Python handler some other way, its SystemExit (status 15, or 1) is handed to the
    program's handler, as the signal would have been."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    ray_sets_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if callable(previous) and ray_sets_handler is not None:
        ray_utils.set_sigterm_handler = _handler_kept
    try:
        yield
    except SystemExit:
        if not callable(previous):
            raise
        previous(signal.SIGTERM, None)
        raise
    finally:
        if ray_sets_handler is not None:
            ray_utils.set_sigterm_handler = ray_sets_handler
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _handler_kept(_ray_handler: object) -> None:
    """What ray.init's call to set its SIGTERM handler does while the program's is kept: nothing."""


def worker_group_start_failure(error: BaseException, asked: str) -> PipelineError | None:
    """One message for a Train worker group that never got its resources (None for any other failure)."""
    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # Ray raises a ControllerError whose text says so; the original WorkerGroupStartupTimeoutError may
    # not travel with it from the controller actor.
    if not any(
        "WorkerGroupStartupTimeout" in type(e).__name__ or "worker group startup timed out" in str(e).lower()
        for e in chain
    ):
        return None
    message = (
        f"the Ray Train worker group did not start within runtime.worker_start_timeout_s: asked for {asked}"
    )
    if ray.is_initialized():
        available = {key: value for key, value in ray.available_resources().items() if key in ("CPU", "GPU")}
        total = {key: value for key, value in ray.cluster_resources().items() if key in ("CPU", "GPU")}
        message += f"; the Ray instance has {total} in all, {available} free now (another run holding them?)"
    return PipelineError(message)


def cluster_resources() -> dict[str, float]:
    """What the connected Ray instance has in all (CPU, GPU, memory, ...)."""
    return dict(ray.cluster_resources())


def joined_cluster_resources() -> dict[str, float] | None:
    """The resources of a cluster this process joined; None for a local Ray it started (sized to plan)."""
    return cluster_resources() if cluster_address() else None


# How long the check before Ray starts waits for a storage_path in an object store to answer. pyarrow's
# clients retry for minutes (against an unreachable gs:// bucket, the stage waited over 7 minutes silently).
STORAGE_CHECK_TIMEOUT_S = 30.0
# Opens the storage path as Ray Train does (pyarrow.fs.FileSystem.from_uri) and reads its entry. In a child
# process: a client stuck in its retries would otherwise hold this one's exit for as long as they last.
_STORAGE_PROBE = """
import sys
import pyarrow.fs
try:
    filesystem, path = pyarrow.fs.FileSystem.from_uri(sys.argv[1])
    filesystem.get_file_info(path)
except Exception as error:
    print(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    sys.exit(1)
"""


def check_storage_path(value: str, timeout_s: float = STORAGE_CHECK_TIMEOUT_S) -> None:
    """A runtime.storage_path that is a URI (s3://, gs://, ...), opened and read once before Ray starts: an
    unknown scheme, missing credentials or an unreachable endpoint is one line, within `timeout_s`."""
    if "://" not in value:
        return  # a local folder: created by Ray Train
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _STORAGE_PROBE, value], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise PipelineError(
            f"runtime.storage_path {value}: no answer within {timeout_s:g} s: check the address, the network"
            " and the credentials"
        ) from None
    if probe.returncode != 0:
        reason = probe.stdout.strip() or (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise PipelineError(f"runtime.storage_path {value} cannot be used: {reason}")


def resolve_storage_path(value: str) -> str:
    """Ray wants a URI or an absolute path; params.yaml may give one relative to the project.

    On a multi-node cluster a local path is each node's own disk: checkpoints written by workers would
    be out of the driver's reach, so say so (an NFS mount on every node is fine, hence no error).
    """
    if "://" in value:
        return value
    alive_nodes = sum(node["Alive"] for node in ray.nodes()) if ray.is_initialized() else 1
    if alive_nodes > 1:
        logger.warning(
            "runtime.storage_path=%s is a local path on a %d-node cluster: use shared storage "
            "(s3://..., gs://..., or an NFS path mounted on every node)",
            value,
            alive_nodes,
        )
    return str(Path(value).resolve())
