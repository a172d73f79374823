"""Scale: prepare, preprocess and one training epoch (2 Ray Train workers) at growing corpus sizes.

    python -m benchmarks.data_scale                                  # 20k, 200k, 2M pairs (about 30 min)
    python -m benchmarks.data_scale --sentences-per-pair 3 --no-train   # news-like lengths (WMT: ~25 tokens)
    python -m benchmarks.data_scale --sizes 20000,200000 --out scale.json
    python -m benchmarks.data_scale --hf --no-train      # the same pairs as a saved Hugging Face dataset

Each stage runs as its own process in a fresh project on the built-in corpus (tune off, a small GRU), the
way `dvc repro` runs it; wall time and peak RSS come from the kernel (`wait4`). Training figures are the
epoch's own (from reports/train_history.csv: wall seconds of the epoch, and the largest peak RSS of the
training workers), beside the peak RSS of the train stage (the largest of its processes). Every figure
is printed with the ratio of the largest size to the one ten times smaller: linear time gives 10,
bounded memory about 1. The baseline for
training throughput is a bare PyTorch loop (one process, same model, batches and train step) over the
first batches of the same data, measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO_ROOT, bare_loop_tokens_per_sec
from benchmarks.results import write_result

TARGET_TIME_RATIO = 11.0
TARGET_PEAK_RSS_MIB = 1536.0


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mib: float


def stage_params(n_pairs: int, sentences_per_pair: int, hf_folder: Path | None) -> dict[str, Any]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["builtin"].update({"n_pairs": n_pairs, "sentences_per_pair": sentences_per_pair})
    if hf_folder is not None:
        params["data"]["source"] = f"hf:{hf_folder}"
    params["data"]["max_tokens"] = 64 * sentences_per_pair
    params["model"].update({"arch": "gru", "emb_dim": 32, "hidden_dim": 64, "n_layers": 1})
    params["train"].update({"epochs": 1, "val_bleu_sentences": 0})
    params["runtime"].update({"num_workers": 2, "cpus_per_worker": 1})
    params["tune"]["num_samples"] = 0
    return params


def save_builtin_as_hf_dataset(n_pairs: int, sentences_per_pair: int, folder: Path) -> None:
    """The built-in pairs as a `save_to_disk` dataset with a wmt-style `translation` column (not timed)."""
    import datasets
    import pyarrow as pa

    from pipeline.data.arrow_text import TextPairWriter
    from pipeline.data.builtin_corpus import iter_corpus

    schema = pa.schema([("translation", pa.struct([("en", pa.string()), ("art", pa.string())]))])
    staging = folder.parent / "hf-staging.arrow"
    writer = TextPairWriter(staging, schema)
    for src, tgt in iter_corpus(n_pairs, 13, sentences_per_pair):
        writer.write(translation=[{"en": src, "art": tgt}])
    writer.close()
    datasets.Dataset.from_file(str(staging)).save_to_disk(str(folder))
    staging.unlink()


# Runs a command and writes [exit code, peak RSS in KiB] of it to argv[1]. The stage is forked from this
# small launcher, not from the benchmark process: Linux carries a process's peak RSS across fork and exec,
# so a child of a process that has imported torch would start its count at that process's size.
_MEASURE = (
    "import json, os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n"
)


def run_stage(project: Path, stage: str) -> Run:
    """One `python -m pipeline <stage>` process: its wall time and peak RSS (kernel accounting)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own SQLite store
    measured = project / f"{stage}.rusage.json"
    command = [sys.executable, "-c", _MEASURE, str(measured), sys.executable, "-m", "pipeline", stage]
    started = time.perf_counter()
    with open(project / f"{stage}.log", "w") as log:
        subprocess.run(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    exit_code, peak_kib = json.loads(measured.read_text()) if measured.is_file() else (-1, 0)
    if exit_code != 0:
        tail = (project / f"{stage}.log").read_text()[-3000:]
        raise SystemExit(f"{stage} failed in {project}:\n{tail}")
    return Run(seconds, peak_kib / 1024)  # Linux reports KiB


def bare_loop_baseline(project: Path, config: Any, max_batches: int) -> float:
    """Target tokens/s of the bare loop over the first `max_batches` batches of the training split."""
    from pipeline.data.processed import load_processed

    processed = load_processed(project / "data" / "processed")
    split = processed.encoded("train")
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    rates, _ = bare_loop_tokens_per_sec(config.model, config.train, split, vocab, 1, max_batches=max_batches)
    return rates[0]


def measure(n_pairs: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    from pipeline.params_file import config_from_dict

    project = root / f"pairs-{n_pairs}"
    project.mkdir()
    hf_folder = None
    if args.hf:
        hf_folder = project / "hf-dataset"
        save_builtin_as_hf_dataset(n_pairs, args.sentences_per_pair, hf_folder)
    params = stage_params(n_pairs, args.sentences_per_pair, hf_folder)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    row: dict[str, float] = {}
    for stage in ("prepare", "preprocess"):
        run = run_stage(project, stage)
        row[f"{stage} s"], row[f"{stage} pairs/s"] = run.seconds, n_pairs / run.seconds
        row[f"{stage} peak RSS MiB"] = run.peak_rss_mib
        print(f"{n_pairs:>10,} {stage:<10} {run.seconds:8.1f} s  {run.peak_rss_mib:8.0f} MiB", flush=True)
    if args.no_train:
        return row
    driver = run_stage(project, "train")
    with open(project / "reports" / "train_history.csv") as handle:
        epoch = next(csv.DictReader(handle))
    meta = json.loads((project / "data" / "processed" / "meta.json").read_text())
    train_pairs = int(meta["pairs"]["train"])
    row["train epoch s"] = float(epoch["epoch_seconds"])
    row["train epoch pairs/s"] = train_pairs / float(epoch["epoch_seconds"])
    row["train tokens/s"] = float(epoch["tokens_per_sec"])
    row["bare loop tokens/s"] = bare_loop_baseline(project, config_from_dict(params), args.bare_batches)
    row["train worker peak RSS MiB"] = float(epoch["peak_rss_mib"])
    row["train stage peak RSS MiB"] = driver.peak_rss_mib  # the largest of its processes (wait4)
    worker, seconds = row["train worker peak RSS MiB"], row["train epoch s"]
    print(f"{n_pairs:>10,} train      {seconds:8.1f} s  {worker:8.0f} MiB per worker", flush=True)
    return row


def table(sizes: list[int], rows: dict[int, dict[str, float]]) -> str:
    big, small = sizes[-1], sizes[-2] if len(sizes) > 1 else sizes[-1]
    header = "| figure | " + " | ".join(f"{n:,} pairs" for n in sizes) + f" | {big:,} ÷ {small:,} |"
    lines = [header, "|---" * (len(sizes) + 2) + "|"]
    for key in rows[big]:
        values = " | ".join(
            f"{rows[n][key]:,.1f}" if rows[n][key] < 100 else f"{rows[n][key]:,.0f}" for n in sizes
        )
        lines.append(f"| {key} | {values} | {rows[big][key] / rows[small][key]:.2f} |")
    return "\n".join(lines)


def verdict(sizes: list[int], rows: dict[int, dict[str, float]]) -> list[str]:
    """Each time ratio and each peak RSS at the largest size against the targets."""
    big, small = sizes[-1], sizes[-2]
    checks = []
    for key, value in rows[big].items():
        if key.endswith(" s"):
            ratio = value / rows[small][key]
            ok = ratio <= TARGET_TIME_RATIO
            checks.append(
                f"{key}: ratio {ratio:.2f}, target <= {TARGET_TIME_RATIO:g}: {'ok' if ok else 'MISSED'}"
            )
        if "RSS" in key:
            ok = value <= TARGET_PEAK_RSS_MIB
            target = f"target <= {TARGET_PEAK_RSS_MIB:,.0f}"
            checks.append(f"{key} at {big:,} pairs: {value:,.0f}, {target}: {'ok' if ok else 'MISSED'}")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000,2000000", help="comma-separated corpus sizes")
    parser.add_argument("--sentences-per-pair", type=int, default=1, help="3 gives news-like lengths")
    parser.add_argument("--no-train", action="store_true", help="prepare and preprocess only")
    parser.add_argument("--hf", action="store_true", help="read the corpus as a saved Hugging Face dataset")
    parser.add_argument("--bare-batches", type=int, default=200, help="batches the bare-loop baseline trains")
    parser.add_argument("--out", type=Path, help="also write the result (JSON) here")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))

    root = Path(tempfile.mkdtemp(prefix="data-scale-"))
    print(
        f"projects in {root}; {args.sentences_per_pair} sentence(s) per pair; {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = {n: measure(n, args, root) for n in sizes}
    result = table(sizes, rows)
    print("\n" + result)
    if len(sizes) > 1:
        print("\n" + "\n".join(verdict(sizes, rows)))
    if args.out:
        write_result(args.out, "data_scale", [{"pairs": n, **rows[n]} for n in sizes])


if __name__ == "__main__":
    main()
