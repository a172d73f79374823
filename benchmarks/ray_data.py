"""The two data engines side by side, and batch translation on Ray Data against one process.

    python -m benchmarks.ray_data --out benchmarks/results/ray_data.json   # 200k, 2M pairs; 100k sentences
    python -m benchmarks.ray_data --sizes 20000 --sentences 2000            # a quick check, no result file

Per corpus size, prepare and preprocess run as `python -m pipeline <stage>` processes in two fresh projects
on the built-in corpus, one with `data.engine: local`, one with `ray`; wall time from the clock, peak RSS
the largest of every process the stage ran (the stage, and Ray's processes for the Ray engine: sampled every
0.2 s, and the kernel's count of waited-for children). The two projects' data/prepared and data/processed
must be byte for byte the same.

Batch translation: M source sentences of the built-in corpus, a randomly initialised GRU with attention
on the smallest project's tokenizers (the work per sentence is a real model's; the words are not), greedy;
`translate < FILE` in one process (torch's default threads, then one thread, as each actor has) against
`translate --input FILE --actors N`; the outputs must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.results import write_result
from tests.helpers import random_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2


def sampled_peak_rss_mib(root: psutil.Process, stop: threading.Event, peak: dict[int, float]) -> None:
    """Largest RSS seen per process among `root` and its descendants (Ray's raylet and workers included)."""
    while not stop.is_set():
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            family = []
        for process in family:
            try:
                rss = process.memory_info().rss / 2**20
            except psutil.Error:
                continue
            peak[process.pid] = max(peak.get(process.pid, 0.0), rss)
        stop.wait(SAMPLE_S)


def run_measured(
    command: list[str],
    cwd: Path,
    stdin: Path | None = None,
    stdout: Path | None = None,
    environment: dict[str, str] | None = None,
):
    """(wall seconds, largest peak RSS of any process in MiB) of `command`, which must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(environment or {})}
    log = cwd / "bench.log"
    with (
        open(stdin or os.devnull, "rb") as source,
        open(stdout or log, "ab") as sink,
        open(log, "ab") as errors,
    ):
        started = time.perf_counter()
        child = psutil.Popen(command, cwd=cwd, env=env, stdin=source, stdout=sink, stderr=errors)
        peak: dict[int, float] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sampled_peak_rss_mib, args=(child, stop, peak), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{log.read_text()[-3000:]}")
    return seconds, max([usage.ru_maxrss / 1024, *peak.values()])


def project_params(n_pairs: int, engine: str) -> dict[str, Any]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["builtin"]["n_pairs"] = n_pairs
    params["data"]["engine"] = engine
    return params


def same_files(a: Path, b: Path) -> bool:
    files = sorted(path.relative_to(a) for path in a.rglob("*") if path.is_file())
    return files == sorted(path.relative_to(b) for path in b.rglob("*") if path.is_file()) and all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in files
    )


def data_engines(n_pairs: int, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"measurement": f"prepare + preprocess, {n_pairs:,} pairs"}
    projects = {}
    for engine in ("local", "ray"):
        project = projects[engine] = root / f"{engine}-{n_pairs}"
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(project_params(n_pairs, engine), sort_keys=False))
        total, peak = 0.0, 0.0
        for stage in ("prepare", "preprocess"):
            seconds, rss = run_measured([sys.executable, "-m", "pipeline", stage], project)
            total, peak = total + seconds, max(peak, rss)
            row[f"{engine} {stage} s"] = round(seconds, 1)
        row[f"{engine} s"], row[f"{engine} peak RSS MiB"] = round(total, 1), round(peak)
        print(f"{n_pairs:>10,} {engine:<6} {total:8.1f} s  peak RSS {peak:6.0f} MiB", flush=True)
    row["ray / local time"] = round(row["ray s"] / row["local s"], 2)
    row["same files"] = (
        "yes"
        if all(
            same_files(projects["local"] / sub, projects["ray"] / sub)
            for sub in ("data/prepared", "data/processed")
        )
        else "no"
    )
    return row


def source_sentences(count: int, path: Path) -> Path:
    from pipeline.data.builtin_corpus import iter_corpus

    with open(path, "w", encoding="utf-8") as sink:
        for source, _ in iter_corpus(count, seed=7):
            sink.write(source + "\n")
    return path


def batch_translation(count: int, actors: int, processed: Path, root: Path) -> dict[str, Any]:
    model = random_model_dir(processed, root / "model")
    text = source_sentences(count, root / "sentences.txt")
    one, threaded, many = root / "stdin.out", root / "stdin-1-thread.out", root / "ray.out"
    translate = [sys.executable, "-m", "pipeline", "translate", "--model", str(model)]
    single, single_rss = run_measured(translate, root, stdin=text, stdout=one)
    # The same process with one torch thread: each actor's setting, so the ratio shows how the pool scales.
    one_thread, _ = run_measured(
        translate, root, stdin=text, stdout=threaded, environment={"OMP_NUM_THREADS": "1"}
    )
    batch, batch_rss = run_measured(
        [*translate, "--input", str(text), "--output", str(many), "--actors", str(actors)], root
    )
    speedup = single / batch
    print(
        f"translate {count:,} sentences: one process {single:.1f} s (one thread {one_thread:.1f} s),"
        f" {actors} actors {batch:.1f} s ({speedup:.2f}x)",
        flush=True,
    )
    outputs = {one.read_bytes(), threaded.read_bytes(), many.read_bytes()}
    return {
        "measurement": f"translate {count:,} sentences",
        "one process s": round(single, 1),
        "one process, 1 thread s": round(one_thread, 1),
        f"{actors} actors s": round(batch, 1),
        "speed-up": round(speedup, 2),
        "speed-up over 1 thread": round(one_thread / batch, 2),
        "one process peak RSS MiB": round(single_rss),
        "actors peak RSS MiB": round(batch_rss),
        "same output": "yes" if len(outputs) == 1 else "no",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000,2000000", help="comma-separated corpus sizes")
    parser.add_argument(
        "--sentences", type=int, default=100_000, help="sentences batch translation translates"
    )
    parser.add_argument("--actors", type=int, default=2, help="model actors of the batch translation")
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    root = Path(tempfile.mkdtemp(prefix="ray-data-"))
    print(f"projects in {root}; {os.cpu_count()} CPUs", flush=True)
    rows = [data_engines(n, root) for n in sizes]
    rows.append(batch_translation(args.sentences, args.actors, root / f"ray-{sizes[0]}/data/processed", root))
    print(json.dumps(rows, indent=1))
    if args.out:
        write_result(args.out, "ray_data", rows)


if __name__ == "__main__":
    main()
