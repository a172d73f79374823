"""Training throughput: Ray Train (1 worker) vs a bare PyTorch loop, and 2 workers vs 1, in one run.

    python -m benchmarks.train_throughput [--pairs 6000] [--epochs 3] [--out FILE]  # from the project root

Same model (params.yaml's model section), same length-bucketed batches (train.batch_size target tokens),
same optimizer step, one torch thread per worker. Figures are target tokens per second over each
epoch's training loop (validation excluded), medians over epochs after the first (warm-up).
Ray's start-up (about 10 s) and worker-group start (about 20 s) are fixed costs and not in these figures;
the script prints the whole-run wall times too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--pairs", type=int, default=6000, help="built-in corpus size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args()

    import ray

    config, processed = prepared_builtin_corpus(
        {"data": {"builtin": {"n_pairs": args.pairs, "seed": 13}}, "runtime": {"cpus_per_worker": 1}}
    )
    train, _ = training_splits(processed)
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    setup = (
        f"model {config.model.arch} emb {config.model.emb_dim} hidden {config.model.hidden_dim}; "
        f"{len(train)} training pairs; batch {config.train.batch_size} target tokens; 1 thread per worker"
    )
    print(setup)

    started = time.perf_counter()
    bare, _ = bare_loop_tokens_per_sec(config.model, config.train, train, vocab, args.epochs)
    bare_wall = time.perf_counter() - started

    storage = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray.init(num_cpus=2, logging_level="ERROR")
    try:
        started = time.perf_counter()
        one = ray_train_tokens_per_sec(config, processed, 1, args.epochs, storage, "bench-1-worker")
        one_wall = time.perf_counter() - started
        started = time.perf_counter()
        two = ray_train_tokens_per_sec(config, processed, 2, args.epochs, storage, "bench-2-workers")
        two_wall = time.perf_counter() - started
    finally:
        ray.shutdown()

    steady = slice(1, None) if args.epochs > 1 else slice(None)
    bare_rate = median(bare[steady])
    one_rate = median([row["tokens_per_sec"] for row in one][steady])
    two_rate = median([row["tokens_per_sec"] for row in two][steady])
    print(f"{'run':<28}{'tokens/s (median)':>20}{'ratio':>10}{'wall s':>10}")
    print(f"{'bare PyTorch loop':<28}{bare_rate:>20.0f}{1.0:>10.2f}{bare_wall:>10.1f}")
    print(f"{'Ray Train, 1 worker':<28}{one_rate:>20.0f}{one_rate / bare_rate:>10.2f}{one_wall:>10.1f}")
    print(
        f"{'Ray Train, 2 workers (DDP)':<28}{two_rate:>20.0f}{two_rate / bare_rate:>10.2f}{two_wall:>10.1f}"
    )
    print(f"1 Ray worker / bare loop: {one_rate / bare_rate:.2f} (target >= 0.9)")
    print(f"2 workers / 1 worker:     {two_rate / one_rate:.2f}")
    if args.out:
        runs = (
            ("bare PyTorch loop", bare_rate, bare_wall),
            ("Ray Train, 1 worker", one_rate, one_wall),
            ("Ray Train, 2 workers (DDP)", two_rate, two_wall),
        )
        rows = [
            {"run": run, "target tokens/s": rate, "vs bare loop": rate / bare_rate, "wall s": wall}
            for run, rate, wall in runs
        ]
        write_result(args.out, "train_throughput", rows, [setup])


if __name__ == "__main__":
    main()
