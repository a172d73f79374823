"""reports/train_run.json: the train stage's record of the runs behind models/, the MLflow run that
evaluate and register log into and the Ray Train run that trained it. This module is the file's one reader
and writer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.files import read_json_object, write_json


@dataclass(frozen=True)
class TrainRun:
    mlflow_run_id: str
    ray_run_name: str
    # Per start of the Ray Train worker group, its ranks' node addresses (informative: not checked on read).
    worker_addresses: list[list[str]] = field(default_factory=list)


def write_train_run(run: TrainRun) -> None:
    write_json(paths.TRAIN_RUN, asdict(run))


def read_train_run() -> TrainRun | None:
    """The record; None when models/ was not made by the train stage (no reports/train_run.json)."""
    if not paths.TRAIN_RUN.is_file():
        return None
    payload = read_json_object(paths.TRAIN_RUN, "re-run `dvc repro train`")
    fields = {key: payload.get(key) for key in ("mlflow_run_id", "ray_run_name")}
    if not all(isinstance(value, str) and value for value in fields.values()):
        raise PipelineError(
            f"{paths.TRAIN_RUN}: expected the strings {', '.join(fields)}; re-run `dvc repro train`"
        )
    addresses = payload.get("worker_addresses")
    return TrainRun(**fields, worker_addresses=addresses if isinstance(addresses, list) else [])
