"""reports/best_params.json: the tune stage's choice, which train applies over params.yaml."""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig, with_overrides
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def read_overrides() -> dict[str, Any]:
    if not paths.BEST_PARAMS.is_file():
        logger.info("%s not found: training with params.yaml as it is", paths.BEST_PARAMS)
        return {}
    try:
        overrides = json.loads(paths.BEST_PARAMS.read_text(encoding="utf-8"))["overrides"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{paths.BEST_PARAMS} is not a tune result ({error}); re-run `dvc repro tune`"
        ) from None
    return overrides


def effective_config(config: PipelineConfig) -> PipelineConfig:
    """params.yaml overridden by the best trial's values (e.g. model.hidden_dim)."""
    overrides = read_overrides()
    if overrides:
        logger.info("applying the tuned values %s", overrides)
    return with_overrides(config, overrides)
