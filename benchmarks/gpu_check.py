"""GPU check: a short Ray Train run with runtime.use_gpu and bf16 beside a bare PyTorch loop on the same GPU.

    python -m benchmarks.gpu_check [--pairs 20000] [--epochs 3] [--out FILE]     # from the project root

Needs one NVIDIA GPU and a CUDA build of torch. Prints target tokens/s and peak GPU memory for both,
measured in the same run. The model is params.yaml's, the batch train.batch_size target tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    bare_loop_tokens_per_sec,
    median,
    prepared_builtin_corpus,
    ray_train_tokens_per_sec,
    training_splits,
)
from benchmarks.results import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch (is this a CUDA build of torch?)")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")

    import ray

    config, processed = prepared_builtin_corpus(
        {
            "data": {"builtin": {"n_pairs": args.pairs, "seed": 13}},
            "runtime": {"use_gpu": True, "num_workers": 1, "cpus_per_worker": 4},
        }
    )
    train, _ = training_splits(processed)
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)

    started = time.perf_counter()
    bare, bare_peak = bare_loop_tokens_per_sec(
        config.model,
        config.train,
        train,
        vocab,
        args.epochs,
        "cuda",
        threads=int(config.runtime.cpus_per_worker),
    )
    bare_wall = time.perf_counter() - started
    torch.cuda.empty_cache()

    ray.init(logging_level="ERROR")
    try:
        started = time.perf_counter()
        history = ray_train_tokens_per_sec(
            config, processed, 1, args.epochs, Path(tempfile.mkdtemp(prefix="gpu-check-")), "gpu-check"
        )
        ray_wall = time.perf_counter() - started
    finally:
        ray.shutdown()

    steady = slice(1, None) if args.epochs > 1 else slice(None)
    bare_rate = median(bare[steady])
    ray_rate = median([row["tokens_per_sec"] for row in history][steady])
    ray_peak = max(row.get("peak_gpu_mem_mib", 0.0) for row in history)
    print(f"{'run':<34}{'tokens/s (median)':>20}{'peak GPU MiB':>14}{'wall s':>10}")
    print(f"{'bare PyTorch loop, bf16':<34}{bare_rate:>20.0f}{bare_peak:>14.0f}{bare_wall:>10.1f}")
    print(f"{'Ray Train 1 GPU worker, bf16':<34}{ray_rate:>20.0f}{ray_peak:>14.0f}{ray_wall:>10.1f}")
    print(f"Ray / bare: {ray_rate / bare_rate:.2f}")
    if args.out:
        runs = (
            ("bare PyTorch loop, bf16", bare_rate, bare_peak, bare_wall),
            ("Ray Train, 1 GPU worker, bf16", ray_rate, ray_peak, ray_wall),
        )
        rows = [
            {
                "run": run,
                "target tokens/s": rate,
                "vs bare loop": rate / bare_rate,
                "peak GPU MiB": peak,
                "wall s": wall,
            }
            for run, rate, peak, wall in runs
        ]
        write_result(args.out, "gpu_check", rows, [f"{len(train)} training pairs"])


if __name__ == "__main__":
    main()
