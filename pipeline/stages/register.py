"""Stage `register`: models/ -> a registered model version, the champion gate, reports/registry.json.

The logic (idempotency, the gate, re-scoring, tags) lives in `pipeline.registry`; see its docstring.
"""

from __future__ import annotations

import logging

from pipeline import paths
from pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    from pipeline.registry import register_model  # mlflow and torch only once the stage runs

    report = register_model(config)
    logger.info(
        "%s version %s: %s (%s); aliases %s -> %s",
        report["model_name"],
        report["version"],
        report["decision"],
        report["reason"],
        ", ".join(report["aliases"]) or "none",
        paths.REGISTRY_REPORT,
    )
