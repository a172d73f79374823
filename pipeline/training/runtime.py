"""Join the Ray cluster named by RAY_ADDRESS, or start a local instance sized for the job.

Same code on a laptop and on a cluster: only the environment differs. `cluster_address` is the one place
that reads RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import ray

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def cluster_address() -> str | None:
    """The Ray cluster this process joins ($RAY_ADDRESS), or None: it starts a local instance itself."""
    return os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(logical_cpus: float = 0.0) -> Iterator[None]:
    """Ray for the duration of a stage; shut down only if this stage started it (tests share one)."""
    started = connect_ray(logical_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def connect_ray(logical_cpus: float = 0.0) -> bool:
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
    common = {"log_to_driver": True, "configure_logging": True, "logging_level": logging.WARNING}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, **common)
        except ConnectionError as error:
            raise PipelineError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {error}") from None
        return True
    num_cpus = max(os.cpu_count() or 1, math.ceil(logical_cpus))
    logger.info("starting a local Ray instance with %d logical CPUs", num_cpus)
    # The dashboard (127.0.0.1 only) serves the state API that Train V2's placement-group cleaner uses.
    ray.init(num_cpus=num_cpus, **common)
    return True


def cluster_resources() -> dict[str, float]:
    """What the connected Ray instance has in all (CPU, GPU, memory, ...)."""
    return dict(ray.cluster_resources())


def joined_cluster_resources() -> dict[str, float] | None:
    """The resources of a cluster this process joined; None for a local Ray it started (sized to plan)."""
    return cluster_resources() if cluster_address() else None


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
