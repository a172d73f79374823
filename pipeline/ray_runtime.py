"""Join the Ray cluster named by RAY_ADDRESS, or start a local instance sized for the job.

Same code on a laptop and on a cluster: only the environment differs.
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
    lets a Tune trial (1 CPU) and its Train workers be placed together on a 2-core laptop, which the
    exact count does not (the worker group never starts).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
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


def check_fits(cpus_per_worker: float, num_workers: int, use_gpu: bool) -> None:
    """Refuse a job the cluster can never place, instead of letting Ray wait forever.

    On a cluster with an autoscaler the resources may appear later; then this only warns.
    """
    total = ray.cluster_resources()
    need_cpu = cpus_per_worker * num_workers
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    problems = []
    if need_cpu > have_cpu + 1e-9:
        problems.append(
            f"needs {need_cpu:g} CPUs (train.num_workers={num_workers} x train.cpus_per_worker="
            f"{cpus_per_worker:g}), the cluster has {have_cpu:g}"
        )
    if use_gpu and num_workers > have_gpu:
        problems.append(
            f"train.use_gpu is true: needs {num_workers} GPUs (one per worker), the cluster has {have_gpu:g}"
        )
    if not problems:
        return
    message = "the Ray cluster cannot run this job: " + "; ".join(problems)
    if os.environ.get("RAY_ADDRESS"):
        logger.warning("%s (waiting in case an autoscaler adds nodes)", message)
        return
    raise PipelineError(message)


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
            "train.storage_path=%s is a local path on a %d-node cluster: use shared storage "
            "(s3://..., gs://..., or an NFS path mounted on every node)",
            value,
            alive_nodes,
        )
    return str(Path(value).resolve())
