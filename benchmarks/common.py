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

from pipeline.config import ModelConfig, TrainConfig, config_from_dict
from pipeline.data.batching import EncodedSplit, collate, token_budget_batches
from pipeline.model import build_model
from pipeline.scoring import sequence_loss

REPO_ROOT = Path(__file__).resolve().parents[1]


def prepared_builtin_corpus(overrides: dict[str, Any]) -> tuple[Any, Any]:
    """Run the real prepare and preprocess stages in a temporary folder; returns (config, ProcessedData)."""
    from pipeline.data.encoded import load_processed
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
    train, validation = processed.splits["train"], processed.splits["validation"]
    return (
        EncodedSplit.from_lists(train.src_ids, train.tgt_ids),
        EncodedSplit.from_lists(validation.src_ids, validation.tgt_ids),
    )


def bare_loop_tokens_per_sec(
    model_config: ModelConfig,
    train_config: TrainConfig,
    split: EncodedSplit,
    vocab: tuple[int, int],
    epochs: int,
    device: str = "cpu",
) -> tuple[list[float], float]:
    """The baseline: one process, no Ray, no DDP; same model, batches, optimizer step and threads.

    Returns per-epoch target tokens/s and peak GPU memory in MiB (0 on CPU).
    """
    torch.set_num_threads(max(1, int(train_config.cpus_per_worker)))
    torch.manual_seed(train_config.seed)
    model = build_model(model_config, *vocab).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    use_bf16 = device.startswith("cuda")
    if use_bf16:
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for epoch in range(epochs):
        batches = token_budget_batches(split, train_config.batch_size, seed=train_config.seed * 1000 + epoch)
        if use_bf16:
            torch.cuda.synchronize()
        started, tokens = time.perf_counter(), 0
        for indices in batches:
            batch = collate(split, indices).to(torch.device(device))
            with torch.autocast(
                device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16
            ):
                logits = model(batch.src, batch.src_lengths, batch.tgt_in, train_config.teacher_forcing)
            loss = sequence_loss(logits, batch.tgt_out, train_config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            (loss / batch.n_target_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            tokens += batch.n_target_tokens
        if use_bf16:
            torch.cuda.synchronize()
        rates.append(tokens / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated() / 2**20 if use_bf16 else 0.0
    return rates, peak


def ray_train_tokens_per_sec(
    config: Any, processed: Any, num_workers: int, epochs: int, storage: Path, name: str
) -> list[dict[str, float]]:
    """Per-epoch metrics of a real Ray Train run of the project's training function."""
    from pipeline.training import build_trainer, load_training_state, put_training_data, train_loop_config

    data = put_training_data(processed)
    train_config = config.train.model_copy(
        update={"num_workers": num_workers, "val_bleu_sentences": 0, "early_stopping_patience": 1000}
    )
    trainer = build_trainer(
        train_loop_config(config.model, train_config, data, epochs), train_config, name, str(storage)
    )
    result = trainer.fit()
    return load_training_state(result.checkpoint)["history"]


def median(values: list[float]) -> float:
    return statistics.median(values)
