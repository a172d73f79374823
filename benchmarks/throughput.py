"""Training throughput: target tokens a second of the project's training step on the CPU and on one GPU, Ray
Train against a bare PyTorch loop, 2 workers against 1, and the Transformer against GRU + attention.

    python -m benchmarks.throughput [--pairs 6000] [--epochs 3] [--out FILE]        # from the project root
    python -m benchmarks.throughput --gpu [--pairs 20000] [--epochs 3] [--out FILE]  # = benchmarks.gpu_check
    python -m benchmarks.throughput --archs [--data ../shared/data/multi30k] [--batches 10] [--epochs 3]

Every figure is target tokens per second over an epoch's training loop (validation excluded), the median
over the epochs after the first (warm-up), measured against the bare loop of `benchmarks/common.py`: one
process, no Ray, no DDP, the same model, global batches and `UpdateStep` as every Ray Train worker.

- By default, on the CPU: Ray Train with 1 worker and with 2 (DDP) beside the bare loop, one torch thread
  per worker, params.yaml's model on the built-in corpus. Ray's start-up (about 10 s) and the worker
  group's start (about 20 s) are fixed costs outside these figures; the rows give each run's wall time.
- `--gpu` (also `python -m benchmarks.gpu_check`): one Ray Train worker with runtime.use_gpu beside the
  bare loop on the same GPU, train.precision's bf16, with peak GPU memory. Needs one NVIDIA GPU and a CUDA
  build of torch.
- `--archs`: recipes/multi30k-transformer-cpu.yaml's Transformer against the one-layer `gru_attention`
  whose hidden size brings its parameter count closest (same embedding width, joint vocabulary and
  Multi30k data), each in the bare loop with one thread, `--batches` batches an epoch, with forward and
  backward FLOPs per target token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MULTI30K,
    bare_loop_tokens_per_sec,
    flops_per_target_token,
    multi30k,
    prepared_corpus,
    ray_train_tokens_per_sec,
    steady_median,
    training_splits,
)
from benchmarks.results import REPO_ROOT, Row, text_table, write_result

ARCH_RECIPE = REPO_ROOT / "recipes" / "multi30k-transformer-cpu.yaml"


def ray_against_bare(pairs: int, epochs: int, gpu: bool) -> tuple[list[Row], str]:
    """Rows of the bare loop and of Ray Train (1 and 2 CPU workers, or 1 GPU worker), and the setup line."""
    import ray
    import torch

    if gpu and not torch.cuda.is_available():
        raise SystemExit("throughput --gpu: no CUDA device visible to torch (is this a CUDA build of torch?)")
    runtime = {"use_gpu": True, "num_workers": 1, "cpus_per_worker": 4} if gpu else {"cpus_per_worker": 1}
    config, processed = prepared_corpus(
        {"data": {"builtin": {"n_pairs": pairs, "seed": 13}}, "runtime": runtime}
    )
    train, _ = training_splits(processed)
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    threads = int(config.runtime.cpus_per_worker)
    device = "the CPU"
    if gpu:
        device = f"{torch.cuda.get_device_name(0)}, train.precision {config.train.precision}"
    setup = (
        f"model {config.model.arch} emb {config.model.emb_dim} hidden {config.model.hidden_dim};"
        f" {len(train)} training pairs; batch {config.train.batch_size} target tokens;"
        f" {threads} torch thread(s) per worker; on {device}"
    )
    print(setup, flush=True)

    started = time.perf_counter()
    bare, bare_peak = bare_loop_tokens_per_sec(
        config.model, config.train, train, vocab, epochs, "cuda" if gpu else "cpu", threads=threads
    )
    measured = [("bare PyTorch loop", bare, bare_peak, time.perf_counter() - started)]
    if gpu:
        torch.cuda.empty_cache()
    storage = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray.init(**({} if gpu else {"num_cpus": 2}), logging_level="ERROR")
    try:
        for workers in (1,) if gpu else (1, 2):
            started = time.perf_counter()
            history = ray_train_tokens_per_sec(
                config, processed, workers, epochs, storage, f"bench-{workers}"
            )
            name = {1: "Ray Train, 1 worker", 2: "Ray Train, 2 workers (DDP)"}[workers]
            name = "Ray Train, 1 GPU worker" if gpu else name
            rates = [row["tokens_per_sec"] for row in history]
            peak = max(row.get("peak_gpu_mem_mib", 0.0) for row in history)
            measured.append((name, rates, peak, time.perf_counter() - started))
    finally:
        ray.shutdown()

    bare_rate = steady_median(bare)
    rows = []
    for name, rates, peak, wall in measured:
        rate = steady_median(rates)
        row = {"run": name, "target tokens/s": rate, "vs bare loop": rate / bare_rate, "wall s": wall}
        rows.append({**row, "peak GPU MiB": peak} if gpu else row)
    return rows, setup


def matching_gru_attention(transformer: Any, vocab: tuple[int, int]) -> Any:
    """The one-layer gru_attention config with the transformer's emb_dim closest to it in parameters."""
    from pipeline.network.model import build_model, count_parameters

    target = count_parameters(build_model(transformer, *vocab))
    candidates = [
        transformer.model_copy(update={"arch": "gru_attention", "n_layers": 1, "hidden_dim": hidden})
        for hidden in range(64, 2049, 16)
    ]
    return min(candidates, key=lambda config: abs(count_parameters(build_model(config, *vocab)) - target))


def model_name(model_config: Any) -> str:
    sizes = (
        f"d {model_config.emb_dim}"
        if model_config.arch == "transformer"
        else f"emb {model_config.emb_dim}, hidden {model_config.hidden_dim}"
    )
    return f"{model_config.arch} ({sizes})"


def architectures(data: Path, batches: int, epochs: int) -> list[Row]:
    """The Transformer CPU recipe's model and the gru_attention of its parameter count, per target token."""
    from pipeline.network.model import build_model, count_parameters

    config, processed = prepared_corpus(multi30k(data), ARCH_RECIPE)
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    split = processed.encoded("train")
    rows = []
    for model_config in (config.model, matching_gru_attention(config.model, vocab)):
        rates, _ = bare_loop_tokens_per_sec(
            model_config, config.train, split, vocab, epochs, max_batches=batches
        )
        model = build_model(model_config, *vocab)
        rows.append(
            {
                "model": model_name(model_config),
                "parameters M": count_parameters(model) / 1e6,
                "target tokens/s": steady_median(rates),
                "MFLOP per target token": flops_per_target_token(model, split, config.train) / 1e6,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="Ray Train on one GPU beside the bare loop there")
    mode.add_argument("--archs", action="store_true", help="Transformer against gru_attention, bare loop")
    parser.add_argument("--pairs", type=int, help="built-in corpus size (default 6000; 20000 with --gpu)")
    parser.add_argument("--data", type=Path, default=MULTI30K, help="--archs: a Multi30k folder")
    parser.add_argument("--batches", type=int, default=10, help="--archs: batches per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args(argv)
    notes = []
    if args.archs:
        rows = architectures(args.data, args.batches, args.epochs)
    else:
        pairs = args.pairs or (20000 if args.gpu else 6000)
        rows, setup = ray_against_bare(pairs, args.epochs, args.gpu)
        notes.append(setup)
    print(text_table(rows))
    if args.out:
        write_result(args.out, "throughput", rows, notes)


if __name__ == "__main__":
    main()
