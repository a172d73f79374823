"""Shared by the benchmarks: a prepared corpus, and the bare PyTorch loop every figure is compared with."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config import ModelConfig, TrainConfig
from pipeline.network.batching import micro_batches, target_tokens
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import build_model
from pipeline.network.training_step import UpdateStep, build_optimizer, compiled, epoch_batches
from pipeline.params_file import config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]


def prepared_builtin_corpus(overrides: dict[str, Any]) -> tuple[Any, Any]:
    """Run the real prepare and preprocess stages in a temporary folder; returns (config, ProcessedData)."""
    from pipeline.data.processed import load_processed
    from pipeline.stages import prepare, preprocess

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section].update(values)
    config = config_from_dict(raw)
    previous = Path.cwd()
    directory = Path(tempfile.mkdtemp(prefix="bench-"))
    os.chdir(directory)
    try:
        prepare.run(config)
        preprocess.run(config)
        return config, load_processed()
    finally:
        os.chdir(previous)


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
