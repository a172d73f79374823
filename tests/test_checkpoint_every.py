"""`runtime.checkpoint_every`: what params.yaml accepts, and when a mid-epoch checkpoint falls due."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from pipeline.config import CheckpointInterval, parse_checkpoint_every
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict
from pipeline.training.worker import MidEpochSchedule


@pytest.mark.parametrize(
    ("value", "interval"),
    [
        (None, None),
        (500, CheckpointInterval(steps=500)),
        ("10min", CheckpointInterval(seconds=600.0)),
        ("2.5min", CheckpointInterval(seconds=150.0)),
        ("10m", CheckpointInterval(seconds=600.0)),
    ],
)
def test_checkpoint_every_takes_null_steps_or_minutes(value, interval) -> None:
    runtime = config_from_dict({"runtime": {"checkpoint_every": value}}).runtime
    assert runtime.checkpoint_every == value, "params keep the value as written"
    assert parse_checkpoint_every(runtime.checkpoint_every) == interval


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "10", "0min", "10h", "ten min", [5]])
def test_a_bad_checkpoint_every_is_refused_naming_the_key(value) -> None:
    with pytest.raises(PipelineError, match=r"runtime\.checkpoint_every: .*'10min'.* \(got "):
        config_from_dict({"runtime": {"checkpoint_every": value}})


def test_default_params_checkpoint_at_epoch_ends_only() -> None:
    assert parse_checkpoint_every(config_from_dict({}).runtime.checkpoint_every) is None


def test_step_schedule_is_due_every_n_optimizer_steps() -> None:
    schedule = MidEpochSchedule(CheckpointInterval(steps=3), rank=0, device=torch.device("cpu"))
    assert [step for step in range(1, 10) if schedule.due(step)] == [3, 6, 9]
    assert not MidEpochSchedule(None, rank=0, device=torch.device("cpu")).due(3)


def test_minute_schedule_follows_the_clock_from_the_last_checkpoint() -> None:
    schedule = MidEpochSchedule(CheckpointInterval(seconds=0.05), rank=0, device=torch.device("cpu"))
    assert not schedule.due(1)
    time.sleep(0.06)
    assert schedule.due(2)
    schedule.restart()
    assert not schedule.due(3)


def _decide_on_two_clocks(rank: int, directory: str) -> None:
    """One rank of a real gloo group: rank 1's clock says due first, then rank 0's."""
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2)
    schedule = MidEpochSchedule(CheckpointInterval(seconds=60.0), rank, torch.device("cpu"))
    if rank == 1:
        schedule.last_checkpoint -= 3600
    decisions = [schedule.due(1)]
    if rank == 0:
        schedule.last_checkpoint -= 3600
    decisions.append(schedule.due(2))
    dist.destroy_process_group()
    Path(directory, f"rank{rank}.json").write_text(json.dumps(decisions))


@pytest.mark.slow  # two spawned processes importing torch and Ray: seconds
def test_minute_schedule_follows_rank_0_clock_on_every_rank(tmp_path: Path) -> None:
    """`ray.train.report` is a barrier: ranks whose clocks disagree must still decide alike."""
    torch.multiprocessing.spawn(_decide_on_two_clocks, args=(str(tmp_path),), nprocs=2)
    decisions = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert decisions == [[False, True], [False, True]]
