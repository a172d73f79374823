"""What a finished Ray Tune search amounts to: one row per trial (reports/tune_trials.csv) and the best
trial's values (reports/best_params.json, through `best_params`)."""

from __future__ import annotations

import csv
import math
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_file
from pipeline.training.best_params import BestParams
from pipeline.training.trial_keys import trial_overrides

TRIAL_COLUMNS = ("trial_id", "metric", "best_value", "epochs_run", "stopped_early", "status")


def trial_rows(results: Any, config: PipelineConfig) -> list[dict[str, Any]]:
    """One row per trial: its values, the best `tune.metric` it reported (Tune's own summary, over all its
    epochs), epochs run, whether it stopped early and its status."""
    settings = config.tune
    best_rows = results.get_dataframe(filter_metric=settings.metric, filter_mode=settings.mode)
    # Trials that errored before their first report leave the metric column out (or the frame empty).
    has_values = {"trial_id", settings.metric} <= set(best_rows.columns)
    best_by_trial = (
        dict(zip(best_rows["trial_id"], best_rows[settings.metric], strict=True)) if has_values else {}
    )
    return [_trial_row(result, best_by_trial, config) for result in results]


def _trial_row(result: Any, best_by_trial: dict[str, float], config: PipelineConfig) -> dict[str, Any]:
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id", result.path.rsplit("/", 1)[-1])
    epochs = int(metrics.get("training_iteration", 0))
    best_value = best_by_trial.get(trial_id)
    return {
        "trial_id": trial_id,
        **trial_overrides(result.config or {}),
        "metric": config.tune.metric,
        "best_value": None if best_value is None or math.isnan(best_value) else float(best_value),
        "epochs_run": epochs,
        "stopped_early": result.error is None and epochs < config.tune.max_epochs,
        "status": "ERROR" if result.error else "TERMINATED",
    }


def first_trial_error(results: Any, rows: list[dict[str, Any]]) -> BaseException | str | None:
    """None when some trial reported a value; else the first trial's error (or why there is none)."""
    if any(row["status"] != "ERROR" and row["best_value"] is not None for row in rows):
        return None
    return next((result.error for result in results if result.error), "no trial reported a metric")


def best_params(
    results: Any, rows: list[dict[str, Any]], config: PipelineConfig, parent_run_id: str
) -> BestParams:
    settings = config.tune
    best = results.get_best_result(settings.metric, settings.mode, scope="all")
    best_row = next(row for row in rows if row["trial_id"] == best.metrics["trial_id"])
    return BestParams(
        search=settings.search_alg,
        overrides=trial_overrides(best.config),
        metric=settings.metric,
        mode=settings.mode,
        best_value=best_row["best_value"],
        best_trial_id=best_row["trial_id"],
        n_trials=len(rows),
        mlflow_parent_run_id=parent_run_id,
    )


def mlflow_status(row: dict[str, Any]) -> str:
    """A trial's MLflow run status: stopped by ASHA is KILLED, an error FAILED."""
    if row["status"] == "ERROR":
        return "FAILED"
    return "KILLED" if row["stopped_early"] else "FINISHED"


def write_trials(rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(TRIAL_COLUMNS)
    with atomic_file(paths.TUNE_TRIALS) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def every_trial_failed(error: BaseException | str) -> PipelineError:
    return PipelineError(f"every Tune trial failed; first error: {error}")
