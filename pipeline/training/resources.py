"""What a train run or a Tune search asks of Ray, decided before anything starts, in one place.

A Train worker takes `runtime.cpus_per_worker` CPUs (its torch thread count follows it) and, with
`runtime.use_gpu`, one GPU. A Tune trial's own process only waits on its trainer, so it takes
`TRIAL_CPUS` = 0.5 CPU: a scheduling slot, not a core. A local Ray this process starts is sized to the
plan; a cluster it joins may grow through its autoscaler, so a job that does not fit yet is a warning
there, and an error only locally.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray

from pipeline.config import PipelineConfig, RuntimeConfig
from pipeline.errors import PipelineError
from pipeline.training.ray_session import cluster_address

logger = logging.getLogger(__name__)

TRIAL_CPUS = 0.5
# Advertised beyond the plan on a local Ray: with an exact fit the Train worker group was seen never to start.
SPARE_LOCAL_CPUS = 1


def worker_resources(runtime: RuntimeConfig) -> dict[str, float]:
    """Each Train worker's Ray resources."""
    return {"CPU": runtime.cpus_per_worker, **({"GPU": 1.0} if runtime.use_gpu else {})}


def training_cpus(runtime: RuntimeConfig) -> float:
    """CPUs one train run's workers take together."""
    return runtime.num_workers * runtime.cpus_per_worker


def _shortfall(runtime: RuntimeConfig, extra_cpus: float, cluster: dict[str, float]) -> list[str]:
    need_cpu = extra_cpus + training_cpus(runtime)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    problems = []
    if need_cpu > have_cpu + 1e-9:
        trial = f"{extra_cpus:g} for the Tune trial + " if extra_cpus else ""
        problems.append(
            f"needs {need_cpu:g} CPUs ({trial}runtime.num_workers={runtime.num_workers} x "
            f"runtime.cpus_per_worker={runtime.cpus_per_worker:g}), the cluster has {have_cpu:g}"
        )
    if runtime.use_gpu and runtime.num_workers > have_gpu + 1e-9:
        problems.append(
            f"runtime.use_gpu is true: needs {runtime.num_workers} GPUs (one per worker), the cluster has "
            f"{have_gpu:g}"
        )
    return problems


def check_local_cores(runtime: RuntimeConfig) -> None:
    """Refuse, before Ray starts, workers that need more CPUs than this machine has, when the stage would
    start a local Ray: that instance advertises what the plan asks (its CPUs are scheduling tokens), so 50
    workers on 2 cores would all start and crawl. A cluster ($RAY_ADDRESS) may grow through its autoscaler
    (`check_training_fits` warns and waits there); a Ray already running in this process is checked by
    what it has."""
    cores = os.cpu_count() or 1
    if cluster_address() is not None or ray.is_initialized() or training_cpus(runtime) <= cores + 1e-9:
        return
    raise PipelineError(
        f"runtime.num_workers x runtime.cpus_per_worker = {runtime.num_workers} x {runtime.cpus_per_worker:g}"
        f" = {training_cpus(runtime):g} CPUs, but this machine has {cores} and no Ray cluster is set"
        " (RAY_ADDRESS): lower them, or set RAY_ADDRESS to run on a cluster"
    )


def check_training_fits(runtime: RuntimeConfig, cluster: dict[str, float], joined: bool) -> None:
    """Refuse a train run the cluster can never place, instead of letting Ray wait forever.

    `joined`: a cluster this process joined (an autoscaler may still add nodes: warn and wait).
    """
    problems = _shortfall(runtime, 0.0, cluster)
    if not problems:
        return
    message = "the Ray cluster cannot run this job: " + "; ".join(problems)
    if joined:
        logger.warning("%s (waiting in case an autoscaler adds nodes)", message)
        return
    raise PipelineError(message)


@dataclass(frozen=True)
class TunePlan:
    cpus_per_trial: float
    concurrent_trials: int

    @property
    def logical_cpus_needed(self) -> float:
        return self.concurrent_trials * self.cpus_per_trial

    def describe(self) -> str:
        return (
            f"{self.concurrent_trials} concurrent trial(s) of {self.cpus_per_trial:g} CPUs "
            f"({TRIAL_CPUS:g} for the trial + its Train workers)"
        )


def plan_tune(config: PipelineConfig, cluster: dict[str, float] | None) -> TunePlan:
    """How many trials run at once. cluster=None: a local Ray this process starts, sized to the plan, and
    on a 2-core laptop one trial at a time, with both cores busy training."""
    runtime = config.runtime
    per_trial = TRIAL_CPUS + training_cpus(runtime)
    wanted = config.tune.max_concurrent_trials
    if cluster is None:
        cores = os.cpu_count() or 1
        # Running more trials than the cores can feed only slows each of them down.
        fits = max(1, math.floor(cores / training_cpus(runtime)))
        if fits < wanted:
            logger.warning(
                "tune.max_concurrent_trials=%d but %d cores fit %d trial(s) of %d workers: running %d at "
                "a time",
                wanted,
                cores,
                fits,
                runtime.num_workers,
                fits,
            )
        return TunePlan(per_trial, min(wanted, fits))
    fits = math.floor(cluster.get("CPU", 0.0) / per_trial + 1e-9)
    if runtime.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / runtime.num_workers + 1e-9))
    if fits < 1:
        logger.warning(
            "one Tune trial cannot fit the Ray cluster now: %s. Waiting for its autoscaler; if it has none, "
            "stop and lower runtime.num_workers or runtime.cpus_per_worker.",
            "; ".join(_shortfall(runtime, TRIAL_CPUS, cluster)),
        )
    return TunePlan(per_trial, max(1, min(wanted, fits)))
