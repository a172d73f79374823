"""Ray Tune over Ray Train (V2): each trial is a function that fits a TorchTrainer.

The trial function builds the same trainer as the train stage (`trainer.build_trainer`), adds
`TuneReportCallback` so rank 0's per-epoch reports reach Tune (and ASHA), and names the Train run after
the trial id so a restarted trial resumes its own checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline.config import PipelineConfig, SearchDimension, TuneConfig
from pipeline.params_file import with_overrides
from pipeline.training.resources import TRIAL_CPUS, TunePlan
from pipeline.training.trainer import EpochLogger, TrainingData, WorkerConfig, build_trainer
from pipeline.training.trial_keys import to_tune_key, trial_overrides

logger = logging.getLogger(__name__)


class TrialLogger(EpochLogger, Protocol):
    def finish(self) -> None: ...


class TrialRunOpener(Protocol):
    """Opens one tracked run per trial (the tracking layer's MLflow child runs; this layer knows only
    the shape). It must pickle: Tune ships it to every trial."""

    def open(self, trial_id: str, run_key: str, config: PipelineConfig) -> TrialLogger: ...


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
class SearchBase:
    """What every trial shares, as typed fields: it crosses into Tune once (`tune.with_parameters`)."""

    config: PipelineConfig
    data: TrainingData
    experiment_name: str
    storage_path: str
    trial_runs: TrialRunOpener | None


def run_trial(trial_config: dict[str, Any], base: SearchBase) -> None:
    """The Tune function trainable: one Ray Train run with this trial's values."""
    effective = with_overrides(base.config, trial_overrides(trial_config))
    trial_id = tune.get_context().get_trial_id()
    train_run_name = f"{base.experiment_name}-{trial_id}"
    trial_logger = base.trial_runs.open(trial_id, train_run_name, effective) if base.trial_runs else None
    loop = WorkerConfig(
        effective.model,
        effective.train,
        base.data,
        base.config.tune.max_epochs,
        trial_logger,
        cpus_per_worker=base.config.runtime.cpus_per_worker,
    )
    # A trial's best checkpoint is only read for its metrics: keep one.
    runtime = base.config.runtime.model_copy(update={"checkpoints_to_keep": 1})
    trainer = build_trainer(
        loop, runtime, train_run_name, base.storage_path, callbacks=[TuneReportCallback()]
    )
    try:
        trainer.fit()
    finally:
        if trial_logger is not None:
            trial_logger.finish()


def build_tuner(
    config: PipelineConfig,
    data: TrainingData,
    plan: TunePlan,
    experiment_name: str,
    storage_path: str,
    trial_runs: TrialRunOpener | None,
) -> tune.Tuner:
    settings: TuneConfig = config.tune
    if settings.search_alg == "optuna":
        # Optuna only for this search: every trial's process imports this module (run_trial).
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=config.train.seed)
    else:
        search_alg = None  # Tune's default: random sampling of the space
    base = SearchBase(config, data, experiment_name, storage_path, trial_runs)
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
