"""The training state and its checkpointer: what a restarted worker group needs to go on where it stopped.

Two verbs, as in torchtitan's checkpointer: `load()` restores the latest reported checkpoint (or starts
fresh), `save(state, metrics)` reports an epoch's metrics to Ray Train with rank 0's checkpoint attached.
A checkpoint holds plain tensors and numbers and is read with `weights_only=True`: never a pickle.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "training_state.pt"


@dataclass
class TrainState:
    """Progress that is not in the model or optimizer: where training is and how it has gone."""

    epoch: int = -1  # the last finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    best_val_loss: float = math.inf
    stale_epochs: int = 0  # epochs since val_loss last improved (early stopping)

    def record(self, metrics: dict[str, Any]) -> None:
        """An epoch's metrics; `val_loss` decides whether it improved."""
        self.epoch = int(metrics["epoch"])
        self.history.append(metrics)
        if metrics["val_loss"] < self.best_val_loss - 1e-4:
            self.best_val_loss, self.stale_epochs = float(metrics["val_loss"]), 0
        else:
            self.stale_epochs += 1


class Checkpointer:
    """Saves the model, optimizer, scheduler and `TrainState` into Ray Train reports, and restores them."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        rank: int,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.rank = model, optimizer, scheduler, rank

    def load(self) -> TrainState:
        """The latest reported checkpoint restored into the components; a fresh state when there is none."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainState()
        saved = read_checkpoint(checkpoint)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
        logger.warning("rank %d: resuming from the checkpoint of epoch %d", self.rank, state.epoch)
        if self.rank == 0:
            print(f"Resuming training from checkpoint at epoch {state.epoch} (next epoch {state.epoch + 1})")
        return state

    def save(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Report `metrics` with a checkpoint from rank 0. Every rank calls it: Ray's report is a barrier."""
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                payload = {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "state": asdict(state),
                }
                torch.save(payload, Path(directory) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """A checkpoint's contents: `model`, `optimizer`, `scheduler` state dicts and `state` (a TrainState's
    fields). weights_only=True: plain tensors and numbers, never an arbitrary pickle."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
