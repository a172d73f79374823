"""reports/best_params.json: the tune stage's choice, which train applies over params.yaml."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig, with_overrides
from pipeline.errors import PipelineError
from pipeline.files import read_json_object

logger = logging.getLogger(__name__)


def read_overrides() -> dict[str, Any]:
    if not paths.BEST_PARAMS.is_file():
        logger.info("%s not found: training with params.yaml as it is", paths.BEST_PARAMS)
        return {}
    overrides = read_json_object(paths.BEST_PARAMS, "re-run `dvc repro tune`").get("overrides")
    if not isinstance(overrides, dict):
        raise PipelineError(
            f"{paths.BEST_PARAMS} is not a tune result (no 'overrides'); re-run `dvc repro tune`"
        )
    return overrides


def effective_config(config: PipelineConfig) -> PipelineConfig:
    """params.yaml overridden by the best trial's values (e.g. model.hidden_dim)."""
    overrides = read_overrides()
    if overrides:
        logger.info("applying the tuned values %s", overrides)
    return with_overrides(config, overrides)
