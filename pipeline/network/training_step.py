"""One optimizer update: what every Ray Train worker runs, and what the benchmarks' bare PyTorch loop runs
too, so the two measure the very same step (precision, accumulation, clipping and schedule included).

An update is one global batch of `train.batch_size` target tokens, cut the same way whatever the number
of workers, split into `workers x train.accumulate` micro-batches; each rank runs its micro-batches and DDP
sums the gradients. Every micro-batch's loss is divided by the global batch's token count (as fairseq
does), not by its own, so the update is the same with 1 worker or 8: the gradient of the summed loss over
all of the global batch's tokens, divided by their number.

Nothing in an update waits for the device: the losses come back as device tensors, summed by the caller
and read only when it reports.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import Batch, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.tokenization import PAD_ID

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sequence_losses(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed, plain) cross-entropy, each summed over the non-padding target tokens, from one
    log-softmax of the same logits: the first is what training minimises, the second what it reports (the
    smoothed loss sits well above the validation loss and would read as underfitting)."""
    log_probs = F.log_softmax(logits.reshape(-1, logits.size(-1)).float(), dim=-1)
    flat = target.reshape(-1)
    real = flat != PAD_ID
    nll = -log_probs.gather(1, flat.clamp(min=0).unsqueeze(1)).squeeze(1)
    nll_sum = (nll * real).sum()
    if not label_smoothing:
        return nll_sum, nll_sum
    # PyTorch's definition: (1 - e) * nll + e * the mean negative log-probability over the vocabulary.
    uniform = -log_probs.mean(dim=-1)
    smoothed_sum = ((1.0 - label_smoothing) * nll + label_smoothing * uniform).mul(real).sum()
    return smoothed_sum, nll_sum


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The summed cross-entropy that training minimises (callers divide by the token count)."""
    return sequence_losses(logits, target, label_smoothing)[0]


def epoch_batches(split: EncodedSplit, config: TrainConfig, epoch: int) -> list[np.ndarray]:
    """The epoch's global batches (one optimizer update each): a deterministic shuffle per epoch, the same
    list on every rank and whatever the number of ranks, each mixing `train.length_buckets` length ranges."""
    return token_budget_batches(split, config.batch_size, config.seed * 1000 + epoch, config.length_buckets)


def lr_factor(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def decay_groups(model: torch.nn.Module, weight_decay: float, scope: str = "matrices") -> list[dict]:
    """Weight decay on the weight matrices only (scope "matrices"): not on biases and norms (vectors) nor
    on embeddings (a tied output projection is the target embedding), as fairseq and Hugging Face's
    trainers do; on every parameter with scope "all"."""
    decayed, exempt = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = scope == "matrices" and (parameter.ndim < 2 or "embedding" in name)
        (exempt if no_decay else decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, total_steps: int, device: torch.device | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (fused on CUDA, multi-tensor elsewhere: one kernel for all parameters instead of one each)
    and its warm-up + cosine schedule over `total_steps` updates."""
    on_cuda = device is not None and device.type == "cuda"
    optimizer = torch.optim.AdamW(
        decay_groups(model, config.weight_decay, config.weight_decay_scope),
        lr=config.lr,
        betas=(0.9, config.adam_beta2),
        fused=on_cuda or None,
        foreach=None if on_cuda else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(max(1, total_steps), config.warmup_fraction)
    )
    return optimizer, scheduler


def compiled(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`train.compile`: the model through torch.compile (its compile time shows in the first epoch); on CUDA
    with CUDA graphs (`reduce-overhead`), which replay kernels without launching them one by one and which
    the padded lengths (`train.pad_multiple`) let repeat. The returned module shares the parameters."""
    if not config.compile:
        return model
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that computes in bfloat16 natively, fp16 (with loss scaling) on one that does
    not (V100, T4), fp32 on the CPU; an explicit bf16 on such a GPU is one clear error."""
    if device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and not native_bf16:
        name = torch.cuda.get_device_name(device)
        raise PipelineError(
            f"train.precision bf16: {name} has no native bfloat16 (only emulated, far slower); "
            "use fp16 (with loss scaling) or auto"
        )
    return precision


@dataclass
class UpdateStep:
    """One optimizer update over this rank's micro-batches of a global batch. Holds what persists from one
    update to the next: fp16's loss scaler (checkpointed, so that a resumed run scales alike)."""

    model: torch.nn.Module  # may be wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    device: torch.device
    world_size: int = 1

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def __call__(
        self, micro_batches: Sequence[Batch], global_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of each micro-batch (a placeholder when this rank has no share of a small
        global batch: it still takes part in DDP's gradient all-reduce), clipping, update, schedule. Returns
        the summed (smoothed, plain) losses as device tensors: reading them would wait for the device."""
        self.optimizer.zero_grad(set_to_none=True)
        scale = self._loss_scale(micro_batches, global_tokens)
        smoothed_total = torch.zeros((), device=self.device)
        nll_total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self._gradient_sync(last):
                smoothed, nll = self._forward(batch)
                self.scaler.scale(smoothed * scale).backward()
            smoothed_total += smoothed.detach()
            nll_total += nll.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return smoothed_total, nll_total

    def _loss_scale(self, micro_batches: Sequence[Batch], global_tokens: int) -> float:
        """What each micro-batch's summed loss is multiplied by before backward (`train.loss_denominator`)."""
        if self.config.loss_denominator == "rank":
            rank_tokens = sum(batch.n_target_tokens for batch in micro_batches)
            return 1.0 / max(rank_tokens, 1)
        # DDP averages gradients over ranks; scaled by world/global tokens, the sum over ranks is the
        # gradient of the whole global batch's summed loss over its token count.
        return self.world_size / max(global_tokens, 1)

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Through the model as given (the DDP wrapper on a worker): its forward is what makes DDP expect
        this rank's gradients and all-reduce them."""
        batch = batch.to(self.device)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            logits = self.model(batch.src, batch.src_lengths, batch.tgt_in, self.config.teacher_forcing)
        smoothed, nll = sequence_losses(logits, batch.tgt_out, self.config.label_smoothing)
        if batch.placeholder:  # zero gradients, but through the same graph: every bucket is all-reduced
            return smoothed * 0.0, nll * 0.0
        return smoothed, nll

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces on the last micro-batch only: the earlier ones accumulate locally."""
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()
