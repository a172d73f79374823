"""The function every Ray Train worker runs: DDP training with per-epoch validation, report and checkpoint.

It only calls components: the network layer's `UpdateStep` and scoring, the `Checkpointer` (checkpoint.py) for
restore and save, and an injected epoch logger (MLflow, from the tracking layer) on rank 0. Every rank
reports every epoch, and at every mid-epoch checkpoint (`checkpoint_every`), because `ray.train.report` is
a barrier.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from pipeline.config import CheckpointInterval, TrainConfig
from pipeline.network.batching import micro_batches, target_tokens, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq, build_model
from pipeline.network.scoring import greedy_bleu, teacher_forced_loss
from pipeline.network.training_step import UpdateStep, build_optimizer, compiled, epoch_batches
from pipeline.progress import epoch_line, quiet
from pipeline.training.checkpoint import (
    MID_EPOCH_VAL_LOSS,
    Checkpointer,
    EpochProgress,
    TrainState,
    gather_objects,
)

logger = logging.getLogger("pipeline.progress")
if TYPE_CHECKING:
    from pipeline.training.trainer import EpochLogger, WorkerConfig

VAL_BATCH_TOKENS = 8000


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's random draws after the weights are built (rank 0 keeps `train.seed`)."""
    return seed + 1_000_003 * rank


def seeded_model(
    loop: WorkerConfig, rank: int, init_weights: dict[str, torch.Tensor] | None = None
) -> Seq2Seq:
    """The model built from `train.seed` (the same initial weights on every rank), then the torch RNG seeded
    for this rank: dropout and scheduled sampling draw per rank (with one seed, every rank masks alike).
    With `init_weights` (a continued run's parent, `train.init_from`) those replace the seeded ones, on
    every rank alike; a checkpoint restored later still replaces them in turn."""
    torch.manual_seed(loop.train.seed)
    model = build_model(loop.model, loop.data.src_vocab_size, loop.data.tgt_vocab_size)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    torch.manual_seed(rank_seed(loop.train.seed, rank))
    return model


def fetch_init_weights(loop: WorkerConfig) -> dict[str, torch.Tensor] | None:
    """The parent's weights from the object store (put there once by the driver), or None from scratch."""
    return None if loop.init_weights is None else ray.get(loop.init_weights)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _replica_divergence(model: torch.nn.Module) -> int:
    """How many ranks hold weights that differ (bit for bit) from the others': 0 when DDP works."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return len(set(gather_objects(digest.hexdigest()))) - 1


def _count_nodes() -> int:
    """How many Ray nodes the worker group spans (a multi-node run should say more than 1)."""
    return len(set(gather_objects(ray.get_runtime_context().get_node_id())))


def _peak_rss_mib() -> float:
    """The largest peak resident memory of any rank's process (Linux reports ru_maxrss in KiB)."""
    return max(gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _validation_loss(model: torch.nn.Module, split: EncodedSplit, rank: int, world: int, device) -> float:
    """Plain (unsmoothed) cross-entropy per target token over the whole validation split, all ranks.

    `model` is the bare module, not the DDP wrapper: ranks see different numbers of batches here, and a
    wrapper's forward may synchronise.
    """
    batches = token_budget_batches(split, VAL_BATCH_TOKENS, seed=None)[rank::world]
    total, tokens = teacher_forced_loss(model, split, batches, device)
    total, tokens = _all_reduce_sum([total, tokens], device)
    return total / max(tokens, 1.0)


def _add_progress(progress: EpochProgress, losses: torch.Tensor, clock: float) -> float:
    """Read the loss sums kept on the device into the epoch's progress (the one wait for the device) and
    zero them; count the time since `clock` as training time. Returns now: the new clock."""
    smoothed, nll = losses.tolist()
    progress.loss_sum += smoothed
    progress.nll_sum += nll
    losses.zero_()
    now = time.perf_counter()
    progress.train_seconds += now - clock
    return now


class MidEpochSchedule:
    """When a mid-epoch checkpoint is due: every N optimizer steps, or once the minutes have passed since
    the last checkpoint. `ray.train.report` is a barrier, so all ranks must agree: step counts agree by
    construction; for minutes, rank 0's clock decides and its answer is all-reduced at every step (one
    number: cheap next to a training step). Every rank must then call `due` equally often."""

    def __init__(self, checkpoint_every: CheckpointInterval | None, rank: int, device: torch.device) -> None:
        self.checkpoint_every, self.rank, self.device = checkpoint_every, rank, device
        self.last_checkpoint = time.monotonic()

    def due(self, optimizer_steps: int) -> bool:
        if self.checkpoint_every is None:
            return False
        steps, seconds = self.checkpoint_every
        if steps is not None:
            return optimizer_steps % steps == 0
        rank0_due = self.rank == 0 and time.monotonic() - self.last_checkpoint >= seconds
        return _all_reduce_sum([float(rank0_due)], self.device)[0] > 0

    def restart(self) -> None:
        """A checkpoint was just saved (mid-epoch or at an epoch end): the minutes count from now."""
        self.last_checkpoint = time.monotonic()


def _mid_epoch_metrics(epoch: int, progress: EpochProgress, optimizer_steps: int) -> dict[str, Any]:
    """A mid-epoch report: where training is, and a val_loss that never makes its checkpoint the best."""
    return {
        "epoch": epoch,
        "step": progress.batches_done,
        "optimizer_steps": optimizer_steps,
        "mid_epoch": 1,
        "val_loss": MID_EPOCH_VAL_LOSS,
    }


LOOP_KEY = "loop"  # the one key of the dict Ray Train hands every worker: a `trainer.WorkerConfig`


@dataclass
class Worker:
    """One rank's set-up: its place in the group, its data, the DDP model with optimizer and schedule, the
    checkpointer and the state it restored, and the figures that stay fixed for the whole run."""

    rank: int
    world: int
    device: torch.device
    train_split: EncodedSplit
    validation_split: EncodedSplit
    tgt_tokenizer: Tokenizer
    validation_references: tuple[str, ...]
    model: torch.nn.Module  # the DDP wrapper: training steps go through it
    bare_model: Seq2Seq  # the module inside: validation, decoding and checkpoints
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: UpdateStep  # one optimizer update: step(micro_batches, target_tokens) -> the two losses
    checkpointer: Checkpointer
    state: TrainState
    checkpoint_schedule: MidEpochSchedule  # when a mid-epoch checkpoint is due (`scheduler`: the lr)
    fixed_metrics: dict[str, Any]  # resumed_from_*, n_nodes, object_store_readers
    epoch_logger: EpochLogger | None  # rank 0 only

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (restored with the scheduler, which counts one per step)."""
        return self.scheduler.last_epoch


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `ray.train.report` call of every rank at INFO (the whole metrics dict and the
    checkpoint path, twice an epoch on 2 workers); the epoch line of rank 0 says what a user reads. Its
    logger is named by the module's file path."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin is not None:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def set_up_worker(loop: WorkerConfig) -> Worker:
    _quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config, data = loop.train, loop.data
    # One intra-op thread per CPU the worker was given: more threads than cores only thrash.
    torch.set_num_threads(max(1, int(loop.cpus_per_worker)))
    train_split, device = data.train.open(), ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(seeded_model(loop, rank, fetch_init_weights(loop)))
    bare_model: Seq2Seq = model.module if hasattr(model, "module") else model
    steps_per_epoch = len(epoch_batches(train_split, config, 0))
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch * loop.epochs, device)
    step = UpdateStep(compiled(model, config, device), optimizer, scheduler, config, device, world)
    checkpointer = Checkpointer(bare_model, optimizer, scheduler, step.scaler, rank, world, device)
    state = checkpointer.load()
    state.worker_addresses.append(gather_objects(ray.util.get_node_ip_address()))
    fixed_metrics = {
        "resumed_from_epoch": state.epoch,
        "resumed_from_step": state.progress.batches_done if checkpointer.resumed else -1,
        "n_workers": world,
        "n_nodes": _count_nodes(),
        # Workers away from the driver's node read the object-store replica; the rest map the files.
        "object_store_readers": int(_all_reduce_sum([float(data.train.from_object_store())], device)[0]),
    }
    return Worker(
        rank=rank,
        world=world,
        device=device,
        train_split=train_split,
        validation_split=data.validation.open(),
        tgt_tokenizer=Tokenizer.from_str(data.tgt_tokenizer_json),
        validation_references=data.validation_references,
        model=model,
        bare_model=bare_model,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        checkpointer=checkpointer,
        state=state,
        checkpoint_schedule=MidEpochSchedule(loop.checkpoint_every, rank, device),
        fixed_metrics=fixed_metrics,
        epoch_logger=loop.epoch_logger if rank == 0 else None,
    )


def train_worker(loop_config: dict[str, WorkerConfig]) -> None:
    """Runs on every Ray Train worker: set up, restore, then train epoch by epoch until done or stale."""
    loop = loop_config[LOOP_KEY]
    worker = set_up_worker(loop)
    state, patience = worker.state, loop.train.early_stopping_patience
    run_started = time.perf_counter()
    for epochs_this_run, epoch in enumerate(range(state.epoch + 1, loop.epochs), 1):
        if state.stale_epochs >= patience:
            break  # restored after early stopping had already triggered
        _train_epoch(worker, loop.train, epoch)
        metrics = _end_of_epoch_metrics(worker, loop.train, epoch)
        state.record(metrics)
        if loop.train.average_last > 1 and worker.rank == 0:
            state.keep_weights(worker.bare_model, loop.train.average_last)
        if worker.rank == 0 and not quiet():  # Train V2 prints no reported metrics: the stage's heartbeat
            line = epoch_line(metrics, loop.epochs, time.perf_counter() - run_started, epochs_this_run)
            _heartbeat(line)
        if worker.epoch_logger is not None:
            worker.epoch_logger.log(metrics, step=epoch)
        worker.checkpointer.save(state, metrics)
        worker.checkpoint_schedule.restart()
        if state.stale_epochs >= patience:
            if worker.rank == 0:
                logger.info(
                    "Early stopping after epoch %d: no val_loss improvement for %d epochs",
                    epoch,
                    state.stale_epochs,
                )
            break


def _heartbeat(line: str) -> None:
    """One line on the worker's stderr, which Ray forwards to the driver's console. Not print(): Train V2
    patches print() to log *and* echo, which showed every line twice; and not a log record, which depends
    on how Ray Train set up the worker's logging (a run was seen where no record reached the console)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _train_epoch(worker: Worker, config: TrainConfig, epoch: int) -> None:
    """The epoch's updates from where the restored state left off: batch -> this rank's micro-batches ->
    one optimizer step, and a mid-epoch checkpoint when one is due."""
    batches = epoch_batches(worker.train_split, config, epoch)
    progress = worker.state.progress  # restored inside this epoch, or its start
    losses = torch.zeros(2, device=worker.device)  # (smoothed, plain) sums, read at checkpoints only
    clock = time.perf_counter()  # training time: checkpoints and restarts do not count
    for batch in batches[progress.batches_done :]:
        shares = micro_batches(
            worker.train_split, batch, worker.rank, worker.world, config.accumulate, config.pad_multiple
        )
        smoothed, nll = worker.step(shares, target_tokens(worker.train_split, batch))
        losses += torch.stack((smoothed, nll))
        progress.token_count += sum(share.n_target_tokens for share in shares)
        progress.batches_done += 1
        # At the epoch's last batch the epoch-end checkpoint follows anyway.
        if progress.batches_done < len(batches) and worker.checkpoint_schedule.due(worker.optimizer_steps):
            _add_progress(progress, losses, clock)
            metrics = _mid_epoch_metrics(epoch, progress, worker.optimizer_steps)
            worker.checkpointer.save(worker.state, metrics)
            worker.checkpoint_schedule.restart()
            clock = time.perf_counter()
    _add_progress(progress, losses, clock)


def _end_of_epoch_metrics(worker: Worker, config: TrainConfig, epoch: int) -> dict[str, Any]:
    """Validation over all ranks, greedy BLEU on rank 0, and the epoch's figures: what every rank reports."""
    progress, device = worker.state.progress, worker.device
    validation_started = time.perf_counter()
    loss_sum, nll_sum, token_count = _all_reduce_sum(
        [progress.loss_sum, progress.nll_sum, progress.token_count], device
    )
    val_loss = _validation_loss(worker.bare_model, worker.validation_split, worker.rank, worker.world, device)
    bleu = (
        greedy_bleu(
            worker.bare_model,
            worker.validation_split,
            worker.tgt_tokenizer,
            device,
            worker.validation_references[: config.val_bleu_sentences],
        )
        if worker.rank == 0 and config.val_bleu_sentences
        else 0.0
    )
    metrics = {
        "epoch": epoch,
        # Plain cross-entropy, as val_loss is: the smoothed objective would sit about a nat above it.
        "train_loss": nll_sum / max(token_count, 1.0),
        "train_loss_smoothed": loss_sum / max(token_count, 1.0),
        "val_loss": val_loss,
        "val_bleu": bleu,
        "tokens_per_sec": token_count / max(progress.train_seconds, 1e-9),
        "epoch_seconds": progress.train_seconds + time.perf_counter() - validation_started,
        "lr": worker.scheduler.get_last_lr()[0],
        "resumed_from_epoch": worker.fixed_metrics["resumed_from_epoch"],
        "resumed_from_step": worker.fixed_metrics["resumed_from_step"],
        "replica_divergence": _replica_divergence(worker.bare_model),
        "n_workers": worker.world,
        "n_nodes": worker.fixed_metrics["n_nodes"],
        "object_store_readers": worker.fixed_metrics["object_store_readers"],
        "peak_rss_mib": _peak_rss_mib(),
    }
    if device.type == "cuda":
        metrics["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return metrics
