"""Shared by the benchmarks: params.yaml with a recipe laid over it, a prepared corpus, the bare PyTorch loop
every figure is compared with, a Ray Train run of the project's training function, and FLOPs per token.

Its module-level imports are what a torch-only box has (benchmarks/gpu_torch.py imports it there).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.results import REPO_ROOT
from pipeline.config import ModelConfig, TrainConfig
from pipeline.network.batching import collate, micro_batches, target_tokens, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq, build_model
from pipeline.network.training_step import UpdateStep, build_optimizer, compiled, epoch_batches, sequence_loss
from pipeline.params_file import config_from_dict, merge_params, read_recipe

# Multi30k (train/val/test folders) beside the project, as ../shared/data/multi30k/README.md describes.
MULTI30K = REPO_ROOT.parent / "shared" / "data" / "multi30k"
# FLOPs are counted on a few small batches: per target token they hardly depend on the batch size.
FLOP_SAMPLE_BATCHES, FLOP_SAMPLE_TOKENS = 8, 1000


def params_with(recipe: Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml, the recipe over it, then `overrides` (params.yaml's shape): what `set-params --recipe`
    would write."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    if recipe is not None:
        raw = merge_params(raw, read_recipe(recipe), str(recipe))
    return merge_params(raw, overrides or {}, "the benchmark's settings")


def prepared_corpus(overrides: dict[str, Any], recipe: Path | None = None) -> tuple[Any, Any]:
    """Run the real prepare and preprocess stages in a temporary folder with `params_with(recipe,
    overrides)`; returns (config, ProcessedData)."""
    from pipeline.data.processed import load_processed
    from pipeline.stages import prepare, preprocess

    config = config_from_dict(params_with(recipe, overrides))
    previous = Path.cwd()
    directory = Path(tempfile.mkdtemp(prefix="bench-"))
    os.chdir(directory)
    try:
        prepare.run(config)
        preprocess.run(config)
        return config, load_processed()
    finally:
        os.chdir(previous)


def pipeline_environment(code: Path = REPO_ROOT) -> dict[str, str]:
    """The environment of a measured `python -m pipeline` or `dvc` process: the `pipeline` package of
    `code`, this environment's Python (and its dvc) first on PATH, a local Ray and the project's own
    tracking store."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(code)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def multi30k(data: Path) -> dict[str, Any]:
    """The override that reads Multi30k German -> English from the folder `data`."""
    return {"data": {"source": str(data.resolve()), "src_lang": "de", "tgt_lang": "en"}}


def training_splits(processed: Any) -> tuple[EncodedSplit, EncodedSplit]:
    return processed.encoded("train"), processed.encoded("validation")


def bare_loop_tokens_per_sec(
    model_config: ModelConfig,
    train_config: TrainConfig,
    split: EncodedSplit,
    vocab: tuple[int, int],
    epochs: int,
    device: str = "cpu",
    max_batches: int | None = None,
    threads: int = 1,
) -> tuple[list[float], float]:
    """The baseline: one process, no Ray, no DDP; the same model, global batches, threads and the very same
    `UpdateStep` (precision, optimizer and scheduler included) that every Ray Train worker runs.

    Returns per-epoch target tokens/s and peak GPU memory in MiB (0 on CPU); `max_batches` cuts each epoch
    short (a sample of a large corpus).
    """
    torch.set_num_threads(threads)  # as a Ray Train worker with runtime.cpus_per_worker = threads
    torch.manual_seed(train_config.seed)
    target = torch.device(device)
    model = build_model(model_config, *vocab).to(target)
    steps_per_epoch = len(epoch_batches(split, train_config, 0))
    optimizer, scheduler = build_optimizer(model, train_config, steps_per_epoch * epochs, target)
    update = UpdateStep(compiled(model, train_config, target), optimizer, scheduler, train_config, target)
    on_gpu = target.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for epoch in range(epochs):
        batches = epoch_batches(split, train_config, epoch)[:max_batches]
        if on_gpu:
            torch.cuda.synchronize()
        started, tokens, losses = time.perf_counter(), 0, torch.zeros((), device=target)
        for indices in batches:
            shares = micro_batches(split, indices, 0, 1, train_config.accumulate, train_config.pad_multiple)
            losses += update(shares, target_tokens(split, indices))[0]
            tokens += target_tokens(split, indices)
        float(losses)  # the one wait for the device, as the workers read their losses once an epoch
        rates.append(tokens / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else 0.0
    return rates, peak


def ray_train_tokens_per_sec(
    config: Any, processed: Any, num_workers: int, epochs: int, storage: Path, name: str
) -> list[dict[str, float]]:
    """Per-epoch metrics of a real Ray Train run of the project's training function."""
    from pipeline.training.checkpoint import read_checkpoint
    from pipeline.training.trainer import WorkerConfig, build_trainer, put_training_data

    data = put_training_data(processed)
    train_config = config.train.model_copy(update={"val_bleu_sentences": 0, "early_stopping_patience": 1000})
    runtime = config.runtime.model_copy(update={"num_workers": num_workers})
    loop = WorkerConfig(config.model, train_config, data, epochs, cpus_per_worker=runtime.cpus_per_worker)
    trainer = build_trainer(loop, runtime, name, str(storage))
    result = trainer.fit()
    return read_checkpoint(result.checkpoint)["state"]["history"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def steady_median(values: list[float]) -> float:
    """The median of the epochs after the first (warm-up: compilation, allocator growth), if there are any."""
    return median(values[1:] or values)


def flops_per_target_token(model: Seq2Seq, split: EncodedSplit, config: TrainConfig) -> float:
    """Forward + backward FLOPs per real target token, counted by `torch.utils.flop_counter` on sample
    batches (padding included). Count on a CPU model in float32: the count does not depend on the device,
    and cuDNN's fused GRU kernels would hide from the counter on CUDA."""
    from torch.utils.flop_counter import FlopCounterMode

    counter, tokens = FlopCounterMode(display=False), 0
    batches = token_budget_batches(split, FLOP_SAMPLE_TOKENS, seed=1)[:FLOP_SAMPLE_BATCHES]
    with counter:
        for indices in batches:
            batch = collate(split, indices)
            logits = model(batch.src, batch.src_lengths, batch.tgt_in, config.teacher_forcing)
            sequence_loss(logits, batch.tgt_out, config.label_smoothing).backward()
            tokens += batch.n_target_tokens
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / tokens
