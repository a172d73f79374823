"""CPU cost of one training update: eager against torch.compile, and padded lengths, for the transformer CPU
recipe's model and for gru_attention, side by side in one run.

    python -m benchmarks.step_cost [--data ../shared/data/multi30k] [--batches 6] [--epochs 3] \\
        [--archs transformer,gru_attention] [--out FILE]

Each mode trains the same model from the same seed on the same Multi30k batches in the bare loop of
`benchmarks/common.py` (one process, one torch thread, one Ray Train worker's share of the recipe's
global batch): steady-state target tokens/s is the median of the epochs after the first, and the first
epoch's extra time is what compilation costs. Aten operations per update are counted by torch.profiler
over one update after warm-up (fewer operations, fewer dispatches on the host); the padding share is the
padded target positions that hold no token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import MULTI30K, bare_loop_tokens_per_sec, multi30k, prepared_corpus, steady_median
from benchmarks.results import REPO_ROOT, text_table, write_result
from pipeline.config import ModelConfig, TrainConfig
from pipeline.network.batching import micro_batches, padded_length, target_tokens, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import build_model
from pipeline.network.training_step import UpdateStep, build_optimizer, compiled

RECIPES = {
    "transformer": REPO_ROOT / "recipes" / "multi30k-transformer-cpu.yaml",
    "gru_attention": REPO_ROOT / "recipes" / "multi30k-gru-attention.yaml",
}
MODES = {
    "eager": {"compile": False, "pad_multiple": 1},
    "eager, pad 8": {"compile": False, "pad_multiple": 8},
}
MODES["compiled, pad 8"] = {"compile": True, "pad_multiple": 8}
WORKERS = 2  # the recipes' Ray Train workers: one worker's share of the global batch is measured


def padding_share(split: EncodedSplit, batches: list[np.ndarray], multiple: int) -> float:
    """Target positions of the padded batches that hold no token (nor </s>)."""
    lengths = split.tgt_lengths() + 1
    positions = sum(len(b) * padded_length(int(lengths[b].max()), multiple) for b in batches)
    return 1.0 - sum(int(lengths[b].sum()) for b in batches) / positions


def aten_ops_per_update(
    model_config: ModelConfig, train: TrainConfig, split: EncodedSplit, vocab: tuple
) -> int:
    """Aten operations the host dispatches for one update, after two updates of warm-up (compilation)."""
    torch.manual_seed(train.seed)
    device = torch.device("cpu")
    model = build_model(model_config, *vocab)
    optimizer, scheduler = build_optimizer(model, train, 100, device)
    update = UpdateStep(compiled(model, train, device), optimizer, scheduler, train, device)
    batch = token_budget_batches(split, train.batch_size, seed=0)[0]
    shares = micro_batches(split, batch, 0, 1, train.accumulate, train.pad_multiple)
    for _ in range(2):
        update(shares, target_tokens(split, batch))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        float(update(shares, target_tokens(split, batch))[0])
    return sum(event.count for event in profile.key_averages() if event.key.startswith("aten::"))


def measure(model_config: ModelConfig, train: TrainConfig, split: EncodedSplit, vocab: tuple, args) -> dict:
    started = time.perf_counter()
    rates, _ = bare_loop_tokens_per_sec(
        model_config, train, split, vocab, args.epochs, max_batches=args.batches
    )
    seconds = time.perf_counter() - started
    steady = steady_median(rates)
    tokens_per_epoch = sum(
        target_tokens(split, b) for b in token_budget_batches(split, train.batch_size, 0)[: args.batches]
    )
    return {
        "target tokens/s": round(steady),
        "first epoch extra s": round(max(0.0, seconds - args.epochs * tokens_per_epoch / steady), 1),
        "aten ops per update": aten_ops_per_update(model_config, train, split, vocab),
        "padding share": round(
            padding_share(
                split, token_budget_batches(split, train.batch_size, 0)[: args.batches], train.pad_multiple
            ),
            3,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=MULTI30K, help="a Multi30k folder")
    parser.add_argument("--batches", type=int, default=6, help="updates per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--archs", default=",".join(RECIPES), help="comma-separated: transformer,gru_attention"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for arch in args.archs.split(","):
        config, processed = prepared_corpus(multi30k(args.data), RECIPES[arch])
        model_config = config.model
        base = config.train.model_dump()
        base["batch_size"] //= WORKERS
        vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
        split = processed.encoded("train")
        baseline = None
        for mode, settings in MODES.items():
            train = TrainConfig.model_validate({**base, **settings})
            row = {"model": arch, "mode": mode, **measure(model_config, train, split, vocab, args)}
            baseline = baseline or row["target tokens/s"]
            row["vs eager"] = round(row["target tokens/s"] / baseline, 2)
            print(row, flush=True)
            rows.append(row)
    print(text_table(rows))
    if args.out:
        write_result(args.out, "step_cost", rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
