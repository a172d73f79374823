"""The training state and its checkpointer: what a restarted worker group needs to go on where it stopped.

Two verbs, as in torchtitan's checkpointer: `load()` restores the latest reported checkpoint (or starts
fresh), `save(state, metrics)` reports metrics to Ray Train with rank 0's checkpoint attached, at an epoch
end or inside an epoch. A checkpoint holds every rank's position in the epoch in progress, its partial
sums and its RNG state, so a restarted group trains on exactly as the lost one would have.
A checkpoint holds plain tensors and numbers and is read with `weights_only=True`: never a pickle.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "training_state.pt"
# The `val_loss` a mid-epoch report carries, so that Ray ranks its checkpoint below every epoch's (and the
# train stage never picks it as the best). Not inf: Ray writes inf as null in its JSON snapshot, and after
# a driver restart the null breaks its ranking.
MID_EPOCH_VAL_LOSS = sys.float_info.max


@dataclass
class EpochProgress:
    """One rank's way through the epoch in progress: what it needs to go on mid-epoch and still report the
    same epoch metrics. Ranks differ (their own batches and timings), so each saves its own."""

    batches_done: int = 0  # global batches (updates) of the epoch already trained: the same on every rank
    loss_sum: float = 0.0  # the label-smoothed loss training minimises, summed over this rank's tokens
    nll_sum: float = 0.0  # plain cross-entropy of the same logits
    token_count: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainState:
    """Progress that is not in the model or optimizer: where training is and how it has gone."""

    epoch: int = -1  # the last finished epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    best_val_loss: float = math.inf
    stale_epochs: int = 0  # epochs since val_loss last improved (early stopping)
    # This rank's progress in epoch `epoch + 1`; a checkpoint keeps it per rank (under "ranks").
    progress: EpochProgress = field(default_factory=EpochProgress)
    # With `train.average_last` N over 1, on rank 0 only: the weights at the end of the last N epochs, and
    # the N ending at the best epoch (what the model becomes), oldest first. CPU copies.
    recent_weights: list[dict[str, torch.Tensor]] = field(default_factory=list)
    best_weights: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # The node address of every rank, in rank order, once per start of the worker group (a restart after a
    # lost worker adds a row): where the run trained, as Ray placed it.
    worker_addresses: list[list[str]] = field(default_factory=list)

    def keep_weights(self, model: torch.nn.Module, count: int) -> None:
        """This epoch's weights among the last `count`, after `record` of its metrics: when the epoch is the
        best so far, the last `count` become the ones to average."""
        weights = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        self.recent_weights = [*self.recent_weights, weights][-count:]
        if self.stale_epochs == 0:
            self.best_weights = list(self.recent_weights)

    def shared_fields(self) -> dict[str, Any]:
        """What a checkpoint keeps of this state (`progress` is per rank). Not `asdict`: it would deep-copy
        every kept set of weights at every save."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}

    def record(self, metrics: dict[str, Any]) -> None:
        """An epoch's metrics; `val_loss` decides whether it improved. The next epoch starts afresh."""
        self.epoch = int(metrics["epoch"])
        self.history.append(metrics)
        if metrics["val_loss"] < self.best_val_loss - 1e-4:
            self.best_val_loss, self.stale_epochs = float(metrics["val_loss"]), 0
        else:
            self.stale_epochs += 1
        self.progress = EpochProgress()


def averaged_best_weights(saved_state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The mean of the epoch-end weights kept for `train.average_last` (those ending at the best epoch),
    from a checkpoint's `state`; None when none were kept."""
    kept = saved_state.get("best_weights") or []
    return average_weights(kept) if kept else None


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several checkpoints' weights (fairseq's and OpenNMT's checkpoint averaging):
    a smoother point than any one of them. Integer buffers come from the last."""
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            averaged[key] = torch.stack([state[key].double() for state in states]).mean(0).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged


def gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (just `[value]` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch RNG state that dropout (and scheduled sampling) draw from on `device`."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves the model, optimizer, scheduler, loss scaler, `TrainState` and every rank's progress and RNG
    state into Ray Train reports, and restores them."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.rank, self.world_size, self.device = rank, world_size, device
        self.resumed = False  # whether load() restored a checkpoint

    def load(self) -> TrainState:
        """The latest reported checkpoint restored into the components; a fresh state when there is none."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainState()
        state = self.restore(read_checkpoint(checkpoint))
        position = f"epoch {state.epoch + 1}, batch {state.progress.batches_done}"
        logger.warning(
            "rank %d: resuming from the checkpoint of epoch %d (next: %s)", self.rank, state.epoch, position
        )
        if self.rank == 0:
            print(f"Resuming training from checkpoint at epoch {state.epoch} (next: {position})")
        return state

    def restore(self, saved: dict[str, Any]) -> TrainState:
        """A checkpoint's contents (`read_checkpoint`) into the components; the state to go on from."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):  # fp16: the loss scale and its growth count, as the lost run had them
            self.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["state"])
        if self.rank != 0:  # only rank 0 keeps epoch weights for averaging
            state.recent_weights, state.best_weights = [], []
        self._restore_this_rank(state, saved.get("ranks", []))
        self.resumed = True
        return state

    def payload(self, state: TrainState, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """What rank 0 saves: the components' state dicts, the shared state and every rank's `ranks` entry."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # fp16's loss scale: empty when not fp16
            "state": state.shared_fields(),
            "ranks": ranks,
        }

    def _restore_this_rank(self, state: TrainState, ranks: list[dict[str, Any]]) -> None:
        """This rank's own position, partial sums and RNG state. A rank's batches and RNG stream belong to
        a world size: with another one, the epoch in progress restarts at its first batch."""
        if len(ranks) == self.world_size:
            state.progress = EpochProgress(**ranks[self.rank]["progress"])
            set_rng_state(ranks[self.rank]["rng"], self.device)
            return
        batches_done = max((saved["progress"]["batches_done"] for saved in ranks), default=0)
        if batches_done and self.rank == 0:
            logger.warning(
                "the checkpoint was saved by %d workers inside epoch %d (batch %d), this run has %d: that "
                "epoch restarts from its first batch (weights, optimizer and schedule are kept)",
                len(ranks),
                state.epoch + 1,
                batches_done,
                self.world_size,
            )

    def save(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Report `metrics` with a checkpoint from rank 0. Every rank calls it: it gathers every rank's
        progress and RNG state, and Ray's report is a barrier."""
        ranks = gather_objects({"progress": asdict(state.progress), "rng": rng_state(self.device)})
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                torch.save(self.payload(state, ranks), Path(directory) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """A checkpoint's contents: `model`, `optimizer`, `scheduler`, `scaler` state dicts, `state` (a
    TrainState's fields but `progress`) and `ranks` (per rank: `progress`, an EpochProgress's fields, and
    `rng`, its torch RNG states). weights_only=True: plain tensors and numbers, never an arbitrary pickle."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
