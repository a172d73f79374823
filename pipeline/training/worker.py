"""The function every Ray Train worker runs: DDP training with per-epoch validation, report and checkpoint.

It only calls components: the network layer's `train_step` and scoring, the `Checkpointer` (state.py) for
restore and save, and an injected epoch logger (MLflow, from the tracking layer) on rank 0. Every rank
reports every epoch, because `ray.train.report` is a barrier.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from pipeline.config import ModelConfig, TrainConfig
from pipeline.network.batching import collate, shard_batches, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq, build_model
from pipeline.network.scoring import greedy_bleu, teacher_forced_loss
from pipeline.network.training_step import build_optimizer, train_step
from pipeline.training.state import Checkpointer

if TYPE_CHECKING:
    from pipeline.training.trainer import TrainingData

VAL_BATCH_TOKENS = 8000


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _gather_objects(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _replica_divergence(model: torch.nn.Module) -> int:
    """How many ranks hold weights that differ (bit for bit) from the others': 0 when DDP works."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return len(set(_gather_objects(digest.hexdigest()))) - 1


def _count_nodes() -> int:
    """How many Ray nodes the worker group spans (a multi-node run should say more than 1)."""
    return len(set(_gather_objects(ray.get_runtime_context().get_node_id())))


def _validation_loss(model: torch.nn.Module, split: EncodedSplit, rank: int, world: int, device) -> float:
    """Plain (unsmoothed) cross-entropy per target token over the whole validation split, all ranks.

    `model` is the bare module, not the DDP wrapper: ranks see different numbers of batches here, and a
    wrapper's forward may synchronise.
    """
    batches = token_budget_batches(split, VAL_BATCH_TOKENS, seed=None)[rank::world]
    total, tokens = teacher_forced_loss(model, split, batches, device)
    total, tokens = _all_reduce_sum([total, tokens], device)
    return total / max(tokens, 1.0)


def _epoch_batches(split: EncodedSplit, config: TrainConfig, epoch: int, rank: int, world: int) -> list:
    """This rank's batches of an epoch: a deterministic shuffle per epoch, the same count on every rank."""
    batches = token_budget_batches(split, config.batch_size, seed=config.seed * 1000 + epoch)
    return shard_batches(batches, rank, world)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: set up, restore, then train epoch by epoch until done or stale."""
    model_config = ModelConfig(**loop_config["model"])
    config = TrainConfig(**loop_config["train"])
    data: TrainingData = loop_config["data"]
    epochs: int = loop_config["epochs"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # One intra-op thread per CPU the worker was given: more threads than cores only thrash.
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)

    train_split: EncodedSplit = ray.get(data.train_ref)
    validation_split: EncodedSplit = ray.get(data.validation_ref)
    tgt_tokenizer = Tokenizer.from_str(data.tgt_tokenizer_json)
    device = ray.train.torch.get_device()

    model = ray.train.torch.prepare_model(build_model(model_config, data.src_vocab_size, data.tgt_vocab_size))
    bare_model: Seq2Seq = model.module if hasattr(model, "module") else model
    steps_per_epoch = len(_epoch_batches(train_split, config, 0, rank, world))
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch * epochs)
    checkpointer = Checkpointer(bare_model, optimizer, scheduler, rank)
    state = checkpointer.load()
    resumed_from_epoch = state.epoch
    n_nodes = _count_nodes()
    epoch_logger = loop_config.get("epoch_logger") if rank == 0 else None

    for epoch in range(state.epoch + 1, epochs):
        if state.stale_epochs >= config.early_stopping_patience:
            break  # restored after early stopping had already triggered
        started = time.perf_counter()
        loss_sum, token_count = 0.0, 0
        for indices in _epoch_batches(train_split, config, epoch, rank, world):
            batch = collate(train_split, indices)
            loss_sum += train_step(model, batch, optimizer, scheduler, config, device)
            token_count += batch.n_target_tokens
        train_seconds = time.perf_counter() - started
        loss_sum, token_count = _all_reduce_sum([loss_sum, token_count], device)
        val_loss = _validation_loss(bare_model, validation_split, rank, world, device)
        bleu = (
            greedy_bleu(bare_model, validation_split, tgt_tokenizer, device, config.val_bleu_sentences)
            if rank == 0 and config.val_bleu_sentences
            else 0.0
        )
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(token_count, 1.0),
            "val_loss": val_loss,
            "val_bleu": bleu,
            "tokens_per_sec": token_count / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - started,
            "lr": scheduler.get_last_lr()[0],
            "resumed_from_epoch": resumed_from_epoch,
            "replica_divergence": _replica_divergence(bare_model),
            "n_workers": world,
            "n_nodes": n_nodes,
        }
        if device.type == "cuda":
            metrics["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        state.record(metrics)
        if epoch_logger is not None:
            epoch_logger.log(metrics, step=epoch)
        checkpointer.save(state, metrics)
        if state.stale_epochs >= config.early_stopping_patience:
            if rank == 0:
                print(
                    f"Early stopping after epoch {epoch}: "
                    f"no val_loss improvement for {state.stale_epochs} epochs"
                )
            break
