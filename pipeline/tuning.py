"""Ray Tune over Ray Train (V2): each trial is a function that fits a TorchTrainer.

The trial function builds the same trainer as the train stage (`training.build_trainer`), adds
`TuneReportCallback` so rank 0's per-epoch reports reach Tune (and ASHA), and names the Train run after
the trial id so a restarted trial resumes its own checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from pipeline.config import PipelineConfig, SearchDimension, TuneConfig, with_overrides
from pipeline.training import TrainingData, build_trainer, train_loop_config

logger = logging.getLogger(__name__)

# Tune flattens nested config keys with "/", and some searchers dislike dots: "model.emb_dim" travels
# as "model__emb_dim".
_KEY_SEPARATOR = "__"
# A trial's own process only waits on its trainer; it needs a scheduling slot, not a core.
TRIAL_CPUS = 0.5


def to_tune_key(dotted: str) -> str:
    return dotted.replace(".", _KEY_SEPARATOR)


def to_dotted_key(tune_key: str) -> str:
    return tune_key.replace(_KEY_SEPARATOR, ".")


def search_space(dimensions: dict[str, SearchDimension]) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for dotted, dimension in dimensions.items():
        if dimension.choice is not None:
            domain = tune.choice(dimension.choice)
        elif dimension.uniform is not None:
            domain = tune.uniform(*dimension.uniform)
        elif dimension.loguniform is not None:
            domain = tune.loguniform(*dimension.loguniform)
        else:
            low, high = dimension.randint
            domain = tune.randint(low, high + 1)  # params.yaml bounds are inclusive, Tune's upper is not
        space[to_tune_key(dotted)] = domain
    return space


@dataclass(frozen=True)
class ResourcePlan:
    cpus_per_trial: float
    concurrent_trials: int
    logical_cpus_needed: float

    def describe(self) -> str:
        return (
            f"{self.concurrent_trials} concurrent trial(s) of {self.cpus_per_trial:g} CPUs "
            f"({TRIAL_CPUS:g} for the trial + its Train workers)"
        )


def plan_resources(config: PipelineConfig, cluster: dict[str, float] | None) -> ResourcePlan:
    """What one trial needs against what the cluster has, decided before anything starts.

    cluster=None means a local Ray we start ourselves, sized to the plan. Train workers always get
    `train.cpus_per_worker` (their torch thread count follows it), so on a 2-core laptop one trial at a
    time runs, with both cores busy training. A cluster we join (its `ray.cluster_resources()`) may
    grow through its autoscaler, so a trial that does not fit yet is a warning there, not an error.
    """
    workers = config.train.num_workers
    per_trial = TRIAL_CPUS + workers * config.train.cpus_per_worker
    wanted = config.tune.max_concurrent_trials
    if cluster is None:
        cores = os.cpu_count() or 1
        # Running more trials than the cores can feed only slows each of them down.
        fits = max(1, math.floor(cores / (per_trial - TRIAL_CPUS)))
        if fits < wanted:
            logger.warning(
                "tune.max_concurrent_trials=%d but %d cores fit %d trial(s) of %d workers: "
                "running %d at a time",
                wanted,
                cores,
                fits,
                workers,
                fits,
            )
        concurrent = min(wanted, fits)
        return ResourcePlan(per_trial, concurrent, concurrent * per_trial)
    fits = math.floor(cluster.get("CPU", 0.0) / per_trial + 1e-9)
    if config.train.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / workers + 1e-9))
    if fits < 1:
        logger.warning(
            "one Tune trial needs %g CPUs (%g for the trial + train.num_workers=%d x "
            "train.cpus_per_worker=%g)%s but the Ray cluster has %g CPUs and %g GPUs now: waiting for its "
            "autoscaler. If it has none, stop and lower train.num_workers or train.cpus_per_worker.",
            per_trial,
            TRIAL_CPUS,
            workers,
            config.train.cpus_per_worker,
            f" and {workers} GPUs" if config.train.use_gpu else "",
            cluster.get("CPU", 0.0),
            cluster.get("GPU", 0.0),
        )
    concurrent = max(1, min(wanted, fits))
    return ResourcePlan(per_trial, concurrent, concurrent * per_trial)


def trial_overrides(trial_config: dict[str, Any]) -> dict[str, Any]:
    return {to_dotted_key(key): value for key, value in trial_config.items()}


def run_trial(trial_config: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune function trainable: one Ray Train run with this trial's model/lr values."""
    from ray.tune.integration.ray_train import TuneReportCallback

    config: PipelineConfig = base["config"]
    effective = with_overrides(config, trial_overrides(trial_config))
    trial_id = tune.get_context().get_trial_id()
    train_run_name = f"{base['experiment_name']}-{trial_id}"
    mlflow = None
    if base.get("parent_run_id"):
        from pipeline import tracking

        run_id = tracking.get_or_create_run(
            config.tracking.experiment,
            run_key=train_run_name,
            run_name=f"trial-{trial_id}",
            tags={**base["lineage_tags"], "tune_trial_id": trial_id},
            params={**tracking.config_params(effective, ("model", "train")), "tune.trial_id": trial_id},
            parent_run_id=base["parent_run_id"],
            uri=base["tracking_uri"],
        )
        mlflow = {"tracking_uri": base["tracking_uri"], "run_id": run_id}
    trial_train = effective.train.model_copy(update={"checkpoints_to_keep": 1})
    loop_config = train_loop_config(
        effective.model, trial_train, base["data"], config.tune.max_epochs, mlflow
    )
    trainer = build_trainer(
        loop_config, trial_train, train_run_name, base["storage_path"], callbacks=[TuneReportCallback()]
    )
    try:
        trainer.fit()
    finally:
        if mlflow:
            from pipeline import tracking

            tracking.finish_run(mlflow["run_id"], uri=mlflow["tracking_uri"])


def build_tuner(
    config: PipelineConfig,
    data: TrainingData,
    plan: ResourcePlan,
    experiment_name: str,
    storage_path: str,
    mlflow_parent: dict[str, Any] | None,
) -> tune.Tuner:
    settings: TuneConfig = config.tune
    from ray.tune.schedulers import ASHAScheduler

    if settings.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=config.train.seed)
    else:
        search_alg = None  # Tune's default: random sampling of the space
    base = {
        "config": config,
        "data": data,
        "experiment_name": experiment_name,
        "storage_path": storage_path,
        **(mlflow_parent or {}),
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base), {"CPU": TRIAL_CPUS})
    experiment_path = f"{storage_path.rstrip('/')}/{experiment_name}"
    if tune.Tuner.can_restore(experiment_path):
        # Same inputs as an earlier search (the name hashes them): finish it rather than start over. A
        # finished search returns its results at once; its trials keep their MLflow runs.
        logger.info("resuming the Tune experiment at %s", experiment_path)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=search_space(settings.search_space),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            num_samples=settings.num_samples,
            max_concurrent_trials=plan.concurrent_trials,
            search_alg=search_alg,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=settings.max_epochs,
                grace_period=min(settings.grace_period, settings.max_epochs),
                reduction_factor=settings.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name=experiment_name, storage_path=storage_path, verbose=1),
    )


def cluster_resources_if_remote() -> dict[str, float] | None:
    """None for a local Ray this process starts; the resources of a cluster it joins."""
    if os.environ.get("RAY_ADDRESS"):
        return dict(ray.cluster_resources())
    return None
