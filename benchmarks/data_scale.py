"""Data at scale: prepare, preprocess and one training epoch at growing corpus sizes, with each data engine
(`local`, Ray Data) side by side, and batch translation on Ray Data against one process.

    python -m benchmarks.data_scale                          # 20k, 200k, 2M pairs, local (about 30 min)
    python -m benchmarks.data_scale --engines local,ray --no-train --sizes 200000,2000000 --translate 100000
    python -m benchmarks.data_scale --sentences-per-pair 3 --no-train   # news-like lengths (WMT: ~25 tokens)
    python -m benchmarks.data_scale --hf --no-train          # the same pairs as a saved Hugging Face dataset
    python -m benchmarks.data_scale --sizes 20000 --engines local,ray --no-train --translate 2000   # quick

Per corpus size and engine, each stage runs as `python -m pipeline <stage>` in a fresh project on the
built-in corpus (tune off, a small GRU), the way `dvc repro` runs it. Wall time comes from the clock; peak
RSS is the largest of any process the stage ran: the kernel's count for the stage and the children it
waited for (`wait4`, from a small launcher: a child of the benchmark's own process would start its count
at that process's size), and every descendant sampled every 0.2 s (Ray's processes, which the stage does
not wait for). Every other engine's data/prepared and data/processed must be byte for byte the first's.

The training epoch (in the first engine's project; `--no-train` leaves it out) runs with 2 Ray Train
workers; its figures are the epoch's own (reports/train_history.csv: wall seconds, and the largest peak RSS
of the workers), beside the train stage's peak RSS and a bare PyTorch loop (one process, same model,
batches and step) over the first batches of the same data, measured in the same run. The printed table
gives each figure's ratio of the largest size to the next: linear time gives 10 for sizes ten apart,
bounded memory about 1.

`--translate N`: N source sentences of the built-in corpus, a randomly initialised GRU with attention on the
smallest project's tokenizers (the work per sentence is a real model's; the words are not), greedy:
`translate < FILE` in one process (torch's default threads, then one thread, as each actor has) against
`translate --input FILE --actors A` on Ray Data; the outputs must be equal.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.common import bare_loop_tokens_per_sec, pipeline_environment
from benchmarks.results import REPO_ROOT, Row, figure, write_result

SAMPLE_S = 0.2
STAGES = ("prepare", "preprocess")

# Runs a command and writes [exit code, peak RSS in KiB] of it to argv[1]. The command is forked from this
# small launcher, not from the benchmark process: Linux carries a process's peak RSS across fork and exec,
# so a child of a process that has imported torch would start its count at that process's size.
_LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n"
)


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mib: float


def sampled_peak_rss_mib(launcher: psutil.Process, stop: threading.Event, peak: dict[int, float]) -> None:
    """Largest RSS seen per process among the launcher's descendants (Ray's raylet and workers included)."""
    while not stop.is_set():
        try:
            family = launcher.children(recursive=True)
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
) -> Run:
    """Wall time and peak RSS (the largest of any process it ran) of `command`, which must succeed. Its
    output goes to `stdout` or cwd/bench.log, its errors to cwd/bench.log."""
    env = {**pipeline_environment(), **(environment or {})}
    log = cwd / "bench.log"
    with tempfile.TemporaryDirectory(prefix="rusage-") as scratch:
        rusage = Path(scratch) / "rusage.json"
        with (
            open(stdin or os.devnull, "rb") as source,
            open(stdout or log, "ab") as sink,
            open(log, "ab") as errors,
        ):
            started = time.perf_counter()
            launcher = psutil.Popen(
                [sys.executable, "-c", _LAUNCHER, str(rusage), *command],
                cwd=cwd,
                env=env,
                stdin=source,
                stdout=sink,
                stderr=errors,
            )
            peak: dict[int, float] = {}
            stop = threading.Event()
            sampler = threading.Thread(target=sampled_peak_rss_mib, args=(launcher, stop, peak), daemon=True)
            sampler.start()
            launcher.wait()
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
        exit_code, peak_kib = json.loads(rusage.read_text()) if rusage.is_file() else (-1, 0)
    if exit_code != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{log.read_text()[-3000:]}")
    return Run(seconds, max([peak_kib / 1024, *peak.values()]))  # Linux reports KiB


def stage_params(
    n_pairs: int, engine: str, sentences_per_pair: int, hf_folder: Path | None
) -> dict[str, Any]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["builtin"].update({"n_pairs": n_pairs, "sentences_per_pair": sentences_per_pair})
    if hf_folder is not None:
        params["data"]["source"] = f"hf:{hf_folder}"
    params["data"]["max_tokens"] = 64 * sentences_per_pair
    params["data"]["engine"] = engine
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


def same_files(a: Path, b: Path) -> bool:
    files = sorted(path.relative_to(a) for path in a.rglob("*") if path.is_file())
    return files == sorted(path.relative_to(b) for path in b.rglob("*") if path.is_file()) and all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in files
    )


def bare_loop_baseline(project: Path, params: dict[str, Any], max_batches: int) -> float:
    """Target tokens/s of the bare loop over the first `max_batches` batches of the training split."""
    from pipeline.data.processed import load_processed
    from pipeline.params_file import config_from_dict

    config = config_from_dict(params)
    processed = load_processed(project / "data" / "processed")
    split = processed.encoded("train")
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    rates, _ = bare_loop_tokens_per_sec(config.model, config.train, split, vocab, 1, max_batches=max_batches)
    return rates[0]


def training_epoch(project: Path, params: dict[str, Any], bare_batches: int) -> Row:
    driver = run_measured([sys.executable, "-m", "pipeline", "train"], project)
    with open(project / "reports" / "train_history.csv") as handle:
        epoch = next(csv.DictReader(handle))
    meta = json.loads((project / "data" / "processed" / "meta.json").read_text())
    seconds = float(epoch["epoch_seconds"])
    return {
        "train epoch s": seconds,
        "train epoch pairs/s": int(meta["pairs"]["train"]) / seconds,
        "train tokens/s": float(epoch["tokens_per_sec"]),
        "bare loop tokens/s": bare_loop_baseline(project, params, bare_batches),
        "train worker peak RSS MiB": float(epoch["peak_rss_mib"]),
        "train stage peak RSS MiB": driver.peak_rss_mib,  # the largest of its processes
    }


def measure(n_pairs: int, args: argparse.Namespace, root: Path) -> list[Row]:
    """One row per engine: each stage's time, pairs/s and peak RSS, then (first engine) the training epoch."""
    rows: list[Row] = []
    for index, engine in enumerate(args.engines):
        project = root / f"{engine}-{n_pairs}"
        project.mkdir()
        hf_folder = None
        if args.hf:
            hf_folder = project / "hf-dataset"
            save_builtin_as_hf_dataset(n_pairs, args.sentences_per_pair, hf_folder)
        params = stage_params(n_pairs, engine, args.sentences_per_pair, hf_folder)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        row: Row = {"pairs": n_pairs, "engine": engine}
        for stage in STAGES:
            run = run_measured([sys.executable, "-m", "pipeline", stage], project)
            row[f"{stage} s"], row[f"{stage} pairs/s"] = run.seconds, n_pairs / run.seconds
            row[f"{stage} peak RSS MiB"] = run.peak_rss_mib
            print(f"{n_pairs:>10,} {engine:<6} {stage:<10} {run.seconds:8.1f} s  {run.peak_rss_mib:8.0f} MiB")
        if index:
            first = root / f"{args.engines[0]}-{n_pairs}"
            same = all(same_files(first / sub, project / sub) for sub in ("data/prepared", "data/processed"))
            row[f"same files as {args.engines[0]}"] = "yes" if same else "no"
        elif not args.no_train:
            row.update(training_epoch(project, params, args.bare_batches))
            print(f"{n_pairs:>10,} train {row['train epoch s']:8.1f} s", flush=True)
        rows.append(row)
    return rows


def source_sentences(count: int, path: Path) -> Path:
    from pipeline.data.builtin_corpus import iter_corpus

    with open(path, "w", encoding="utf-8") as sink:
        for source, _ in iter_corpus(count, seed=7):
            sink.write(source + "\n")
    return path


def batch_translation(count: int, actors: int, processed: Path, root: Path) -> Row:
    from tests.helpers import random_model_dir

    model = random_model_dir(processed, root / "model")
    text = source_sentences(count, root / "sentences.txt")
    one, threaded, many = root / "stdin.out", root / "stdin-1-thread.out", root / "ray.out"
    translate = [sys.executable, "-m", "pipeline", "translate", "--model", str(model)]
    single = run_measured(translate, root, stdin=text, stdout=one)
    # The same process with one torch thread: each actor's setting, so the ratio shows how the pool scales.
    one_thread = run_measured(
        translate, root, stdin=text, stdout=threaded, environment={"OMP_NUM_THREADS": "1"}
    )
    pool = run_measured(
        [*translate, "--input", str(text), "--output", str(many), "--actors", str(actors)], root
    )
    outputs = {one.read_bytes(), threaded.read_bytes(), many.read_bytes()}
    return {
        "measurement": f"translate {count:,} sentences",
        "one process s": round(single.seconds, 1),
        "one process, 1 thread s": round(one_thread.seconds, 1),
        f"{actors} actors s": round(pool.seconds, 1),
        "speed-up": round(single.seconds / pool.seconds, 2),
        "speed-up over 1 thread": round(one_thread.seconds / pool.seconds, 2),
        "one process peak RSS MiB": round(single.peak_rss_mib),
        "actors peak RSS MiB": round(pool.peak_rss_mib),
        "same output": "yes" if len(outputs) == 1 else "no",
    }


def scaling_table(rows: list[Row]) -> str:
    """Per engine, each figure at each size and the ratio of the largest size to the next."""
    tables = []
    for engine in dict.fromkeys(row["engine"] for row in rows):
        mine = [row for row in rows if row["engine"] == engine]
        big, small = mine[-1], mine[-2] if len(mine) > 1 else mine[-1]
        sizes = " | ".join(f"{row['pairs']:,} pairs" for row in mine)
        lines = [f"| {engine} | {sizes} | ratio |", "|---" * (len(mine) + 2) + "|"]
        for key, value in big.items():
            if isinstance(value, float):
                ratio = value / small[key] if small.get(key) else float("nan")
                cells = " | ".join(figure(row.get(key)) for row in mine)
                lines.append(f"| {key} | {cells} | {ratio:.2f} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,200000,2000000", help="comma-separated corpus sizes")
    parser.add_argument("--engines", default="local", help="comma-separated data engines: local,ray")
    parser.add_argument("--sentences-per-pair", type=int, default=1, help="3 gives news-like lengths")
    parser.add_argument("--no-train", action="store_true", help="prepare and preprocess only")
    parser.add_argument("--hf", action="store_true", help="read the corpus as a saved Hugging Face dataset")
    parser.add_argument("--bare-batches", type=int, default=200, help="batches the bare-loop baseline trains")
    parser.add_argument(
        "--translate", type=int, default=0, metavar="N", help="also batch-translate N sentences"
    )
    parser.add_argument("--actors", type=int, default=2, help="model actors of the batch translation")
    parser.add_argument("--out", type=Path, help="also write the result (JSON) here")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    args.engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]

    root = Path(tempfile.mkdtemp(prefix="data-scale-"))
    print(
        f"projects in {root}; {args.sentences_per_pair} sentence(s) a pair; {os.cpu_count()} CPUs", flush=True
    )
    rows = [row for n in sizes for row in measure(n, args, root)]
    print("\n" + scaling_table(rows))
    if args.translate:
        processed = root / f"{args.engines[0]}-{sizes[0]}" / "data" / "processed"
        rows.append(batch_translation(args.translate, args.actors, processed, root))
        print(rows[-1], flush=True)
    if args.out:
        write_result(args.out, "data_scale", rows)


if __name__ == "__main__":
    main()
