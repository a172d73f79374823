"""reports/best_params.json: the tune stage's choice, which train applies over params.yaml. This module is
the file's one reader and writer."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.files import read_json_object, write_json
from pipeline.params_file import with_overrides

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestParams:
    """What the search chose (`overrides`, dotted keys) and how: the trial, its value of `metric`, and the
    MLflow parent run of the search. With the search off, no overrides and the model passed through."""

    search: str  # optuna | random | off
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    mode: str | None = None
    best_value: float | None = None
    best_trial_id: str | None = None
    n_trials: int | None = None
    mlflow_parent_run_id: str | None = None
    model: dict[str, Any] | None = None  # the search off: params.yaml's model section as it went through


def write_best_params(best: BestParams) -> None:
    write_json(paths.BEST_PARAMS, {key: value for key, value in asdict(best).items() if value is not None})


def read_best_params() -> BestParams | None:
    """The tune stage's result; None when there is none (train then uses params.yaml as it is)."""
    if not paths.BEST_PARAMS.is_file():
        return None
    payload = read_json_object(paths.BEST_PARAMS, "re-run `dvc repro tune`")
    if not isinstance(payload.get("overrides"), dict):
        raise PipelineError(
            f"{paths.BEST_PARAMS} is not a tune result (no 'overrides'); re-run `dvc repro tune`"
        )
    known = BestParams.__dataclass_fields__
    return BestParams(**{"search": "unknown", **{k: v for k, v in payload.items() if k in known}})


def effective_config(config: PipelineConfig) -> PipelineConfig:
    """params.yaml overridden by the best trial's values (e.g. model.hidden_dim)."""
    best = read_best_params()
    if best is None:
        logger.info("%s not found: training with params.yaml as it is", paths.BEST_PARAMS)
        return config
    if best.overrides:
        logger.info("applying the tuned values %s", best.overrides)
    return with_overrides(config, best.overrides, str(paths.BEST_PARAMS))
