"""Stage `tune`: search model sizes and dropout -> reports/best_params.json, reports/tune_trials.csv.

tune_trials.csv has one row per trial: its values, `best_value` (the best `tune.metric` it reported,
named in the `metric` column, so the DVC plot works whatever the metric), epochs run, whether it stopped
early and its status (`pipeline.training.tune_results`). With `tune.num_samples: 0` the stage writes
params.yaml's model section through without importing Ray or MLflow, in about a second.
"""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig, check_init_from_pinned
from pipeline.errors import PipelineError
from pipeline.files import outputs_together
from pipeline.training import tune_results
from pipeline.training.best_params import BestParams, write_best_params

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    _check_continued_training(config)
    if config.tune.num_samples == 0:
        _write_passthrough(config)
        return
    # Ray Tune, Ray Train, torch and MLflow take seconds to import: only a search needs them.
    from pipeline.stages.tune_search import run_search

    run_search(config)


def _check_continued_training(config: PipelineConfig) -> None:
    """A continued run trains the parent's fixed architecture (`train.init_from`): a search over model keys
    cannot apply to it, so a search is refused rather than run for nothing."""
    check_init_from_pinned(config.train)
    if config.train.init_from is not None and config.tune.num_samples > 0:
        raise PipelineError(
            f"tune.num_samples is {config.tune.num_samples} with train.init_from set: set tune.num_samples: 0"
            " to continue training with params.yaml's learning rate, or clear train.init_from"
        )


def _write_passthrough(config: PipelineConfig) -> None:
    """Search off: train uses params.yaml's model section as it is; the trials table is empty."""
    logger.info("tune.num_samples is 0: no search, params.yaml's model section passes through")
    with outputs_together():
        write_best_params(BestParams(search="off", model=config.model.model_dump()))
        tune_results.write_trials([])
