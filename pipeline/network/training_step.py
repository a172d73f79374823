"""One optimizer update on one batch: what every Ray Train worker runs, and what the throughput benchmark's
bare PyTorch loop runs too, so the two measure the very same step (scheduler included)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.network.batching import Batch
from pipeline.network.tokenization import PAD_ID


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the non-padding target tokens (callers divide by the token count)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def lr_factor(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its warm-up + cosine schedule over `total_steps` updates."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(max(1, total_steps), config.warmup_fraction)
    )
    return optimizer, scheduler


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    device: torch.device,
) -> float:
    """Forward (bf16 autocast on GPU), per-token loss, backward, clipping, update; returns the summed loss.

    `model` may be wrapped in DistributedDataParallel: its backward then all-reduces the gradients.
    """
    batch = batch.to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(batch.src, batch.src_lengths, batch.tgt_in, config.teacher_forcing)
    loss = sequence_loss(logits, batch.tgt_out, config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss / batch.n_target_tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())
