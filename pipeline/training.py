"""The per-worker training function and the TorchTrainer that runs it.

Knows Ray Train, not Tune: Tune wraps `build_trainer` (see tuning.py). Data arrives as object-store
references (`EncodedSplit`s), so workers on any node read it without the driver's disk. Rank 0 writes the
checkpoint (weights, optimizer, scheduler, epoch, history); every rank reports every epoch, because
`ray.train.report` is a barrier.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.batching import EncodedSplit, collate, shard_batches, source_tensor, token_budget_batches
from pipeline.data.encoded import ProcessedData
from pipeline.data.tokenization import decode_ids
from pipeline.decoding import greedy_decode
from pipeline.model import Seq2Seq, build_model
from pipeline.scoring import corpus_scores, sequence_loss, teacher_forced_loss

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "training_state.pt"
VAL_BATCH_TOKENS = 8000


@dataclass(frozen=True)
class TrainingData:
    """What every worker needs, as object refs plus the small things inline."""

    train_ref: ray.ObjectRef
    validation_ref: ray.ObjectRef
    src_vocab_size: int
    tgt_vocab_size: int
    tgt_tokenizer_json: str


def put_training_data(processed: ProcessedData, max_examples: int | None = None) -> TrainingData:
    """Ship the train (first `max_examples` pairs) and validation splits to the object store."""
    train, validation = processed.splits["train"], processed.splits["validation"]
    limit = max_examples or len(train.src_ids)
    return TrainingData(
        ray.put(EncodedSplit.from_lists(train.src_ids[:limit], train.tgt_ids[:limit])),
        ray.put(EncodedSplit.from_lists(validation.src_ids, validation.tgt_ids)),
        processed.src_vocab_size,
        processed.tgt_vocab_size,
        processed.tgt_tokenizer.to_str(),
    )


def train_loop_config(
    model: ModelConfig,
    train: TrainConfig,
    data: TrainingData,
    epochs: int,
    mlflow: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The dict each worker receives. `mlflow` holds tracking_uri and run_id when rank 0 should log."""
    return {
        "model": model.model_dump(),
        "train": train.model_dump(),
        "data": data,
        "epochs": epochs,
        "mlflow": mlflow,
    }


def _lr_lambda(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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


def validation_bleu(model: Seq2Seq, split: EncodedSplit, tokenizer: Tokenizer, device, limit: int) -> float:
    """Greedy BLEU on the first `limit` validation pairs: a cheap per-epoch quality signal."""
    sample = split.head(limit)
    if len(sample) == 0:
        return 0.0
    model.eval()
    hypotheses: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(sample), 128):
            indices = range(start, min(start + 128, len(sample)))
            src, lengths = source_tensor([sample.src(i) for i in indices])
            hypotheses.extend(greedy_decode(model, src.to(device), lengths, max_len=int(src.size(1) * 2 + 5)))
    model.train()
    references = decode_ids(tokenizer, [sample.tgt(i) for i in range(len(sample))])
    return corpus_scores(decode_ids(tokenizer, hypotheses), references)["bleu"]


def _save_state(directory: Path, state: dict[str, Any]) -> ray.train.Checkpoint:
    torch.save(state, directory / CHECKPOINT_FILE)
    return ray.train.Checkpoint.from_directory(str(directory))


def load_training_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """weights_only=True: a checkpoint is plain tensors and numbers, never an arbitrary pickle."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP training with per-epoch validation, report and checkpoint."""
    model_config = ModelConfig(**loop_config["model"])
    train_config = TrainConfig(**loop_config["train"])
    data: TrainingData = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # One intra-op thread per CPU the worker was given: more threads than cores only thrash.
    torch.set_num_threads(max(1, int(train_config.cpus_per_worker)))
    torch.manual_seed(train_config.seed)

    train_split: EncodedSplit = ray.get(data.train_ref)
    validation_split: EncodedSplit = ray.get(data.validation_ref)
    tgt_tokenizer = Tokenizer.from_str(data.tgt_tokenizer_json)
    device = ray.train.torch.get_device()
    use_bf16 = device.type == "cuda"

    model = build_model(model_config, data.src_vocab_size, data.tgt_vocab_size)
    model = ray.train.torch.prepare_model(model)
    bare_model: Seq2Seq = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    batches_per_epoch = len(token_budget_batches(train_split, train_config.batch_size, seed=0)) // world
    total_steps = max(1, batches_per_epoch * loop_config["epochs"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, train_config.warmup_fraction)
    )

    start_epoch, history, best_val, stale_epochs = 0, [], math.inf, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_training_state(checkpoint)
        bare_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_val, stale_epochs = state["best_val_loss"], state["stale_epochs"]
        logger.warning("rank %d: resuming from the checkpoint of epoch %d", rank, state["epoch"])
        if rank == 0:
            print(f"Resuming training from checkpoint at epoch {state['epoch']} (next epoch {start_epoch})")

    n_nodes = _count_nodes()
    tracker = None
    if rank == 0 and loop_config.get("mlflow"):
        from pipeline.tracking import EpochMetricsLogger

        tracker = EpochMetricsLogger(**loop_config["mlflow"])

    for epoch in range(start_epoch, loop_config["epochs"]):
        if stale_epochs >= train_config.early_stopping_patience:
            break  # restored after early stopping had already triggered
        started = time.perf_counter()
        batches = shard_batches(
            token_budget_batches(train_split, train_config.batch_size, seed=train_config.seed * 1000 + epoch),
            rank,
            world,
        )
        loss_sum, token_count = 0.0, 0
        for indices in batches:
            batch = collate(train_split, indices).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(batch.src, batch.src_lengths, batch.tgt_in, train_config.teacher_forcing)
            loss = sequence_loss(logits, batch.tgt_out, train_config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            (loss / batch.n_target_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            token_count += batch.n_target_tokens
        train_seconds = time.perf_counter() - started
        loss_sum, token_count = _all_reduce_sum([loss_sum, token_count], device)
        val_loss = _validation_loss(bare_model, validation_split, rank, world, device)
        bleu = (
            validation_bleu(
                bare_model, validation_split, tgt_tokenizer, device, train_config.val_bleu_sentences
            )
            if rank == 0 and train_config.val_bleu_sentences
            else 0.0
        )
        divergence = _replica_divergence(bare_model)
        improved = val_loss < best_val - 1e-4
        best_val, stale_epochs = (val_loss, 0) if improved else (best_val, stale_epochs + 1)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(token_count, 1.0),
            "val_loss": val_loss,
            "val_bleu": bleu,
            "tokens_per_sec": token_count / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - started,
            "lr": scheduler.get_last_lr()[0],
            "resumed_from_epoch": start_epoch - 1,
            "replica_divergence": divergence,
            "n_workers": world,
            "n_nodes": n_nodes,
        }
        if device.type == "cuda":
            metrics["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        history.append(metrics)
        if tracker is not None:
            tracker.log(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                checkpoint = _save_state(
                    Path(directory),
                    {
                        "model": bare_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "best_val_loss": best_val,
                        "stale_epochs": stale_epochs,
                    },
                )
            ray.train.report(metrics, checkpoint=checkpoint)
        if stale_epochs >= train_config.early_stopping_patience:
            if rank == 0:
                print(
                    f"Early stopping after epoch {epoch}: no val_loss improvement for {stale_epochs} epochs"
                )
            break


def build_trainer(
    loop_config: dict[str, Any],
    train_config: TrainConfig,
    run_name: str,
    storage_path: str,
    callbacks: list | None = None,
) -> ray.train.torch.TorchTrainer:
    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.use_gpu:
        resources["GPU"] = 1
    return ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_config.num_workers, use_gpu=train_config.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_config.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            callbacks=callbacks or [],
        ),
    )
