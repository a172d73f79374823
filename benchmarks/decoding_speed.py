"""Beam search speed across the code's history: one trained model, one split, decoded by the search of each
given commit in turn, rounds interleaved so that the machine's drift falls on every commit alike.

    python -m benchmarks.decoding_speed --project DIR --code "REV:label" --code "REV:label" ...
                                        [--split test] [--beam-size 5] [--rounds 3] [--out FILE]

DIR is a project after `train` (its models/ and data/processed/). For each `--code`, the `pipeline/` package
of commit REV comes out of git (`git archive`) into a temporary folder, and a child process that imports it
from there loads DIR/models and times `Translator.translate` on the split's sources (loading excluded), with
BENCHMARK_THREADS torch threads (default 2). Rows: the median decoding time over the rounds, the speed-up
over the first `--code`, lowercase BLEU, and how many translations differ from the last `--code`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from benchmarks.results import REPO_ROOT, git_output, write_result


def code_at(revision: str, folder: Path) -> Path:
    """`pipeline/` as commit `revision` had it, unpacked under `folder`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "pipeline"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def timed_child(code: Path, models: Path, sources: Path, output: Path, beam_size: int) -> float:
    """Seconds the search of `code` takes on `sources`; its translations go to `output`."""
    # The child runs in `code`, so `pipeline` resolves there, ahead of any installed copy; `benchmarks`
    # comes from this checkout.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(REPO_ROOT)])}
    command = [sys.executable, "-m", "benchmarks.decoding_speed", "--child", str(code)]
    command += ["--models", str(models), "--sources", str(sources), "--output", str(output)]
    command += ["--beam-size", str(beam_size)]
    done = subprocess.run(command, cwd=code, env=environment, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"decoding with {code} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def child(code: Path, models: Path, sources: Path, output: Path, beam_size: int) -> None:
    """In the child: translate with the `pipeline` package of `code`, print the seconds as JSON."""
    import torch

    import pipeline
    from pipeline.network.model_files import load_model_dir
    from pipeline.network.translator import Translator

    if not Path(pipeline.__file__).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"imported {pipeline.__file__}, not the code under {code}")
    torch.set_num_threads(int(os.environ.get("BENCHMARK_THREADS", "2")))
    search = Translator(load_model_dir(models))
    lines = json.loads(sources.read_text(encoding="utf-8"))
    started = time.perf_counter()
    translations = search.translate(lines, beam_size=beam_size)
    seconds = time.perf_counter() - started
    output.write_text(json.dumps(translations), encoding="utf-8")
    print(json.dumps({"seconds": seconds}))


def measure(
    project: Path, codes: list[tuple[str, str]], split: str, beam_size: int, rounds: int, folder: Path
) -> list[dict[str, Any]]:
    from benchmarks.decoding import load_split
    from pipeline.network.scoring import score_corpus

    sources, references = load_split(project, split)
    source_file = folder / "sources.json"
    source_file.write_text(json.dumps(sources), encoding="utf-8")
    trees = [code_at(revision, folder / f"code-{index}") for index, (revision, _) in enumerate(codes)]
    seconds: list[list[float]] = [[] for _ in codes]
    outputs = [folder / f"translations-{index}.json" for index in range(len(codes))]
    for round_number in range(1, rounds + 1):
        for index, tree in enumerate(trees):
            taken = timed_child(tree, project / "models", source_file, outputs[index], beam_size)
            seconds[index].append(taken)
            print(f"round {round_number}: {codes[index][1]}: {taken:.1f} s", flush=True)
    translations = [json.loads(path.read_text(encoding="utf-8")) for path in outputs]
    medians = [statistics.median(times) for times in seconds]
    rows = []
    for index, (revision, label) in enumerate(codes):
        rows.append(
            {
                "decoding code": label,
                "commit": git_output("rev-parse", "--short", revision),
                "split": split,
                "sentences": len(sources),
                "beam size": beam_size,
                "decoding s (median)": round(medians[index], 1),
                "speed-up": round(medians[0] / medians[index], 2),
                "lowercase BLEU": score_corpus(translations[index], references).scores["bleu_lc"],
                "translations unlike the last code's": sum(
                    a != b for a, b in zip(translations[index], translations[-1], strict=True)
                ),
            }
        )
    return rows


def parse_code(value: str) -> tuple[str, str]:
    revision, separator, label = value.partition(":")
    if not separator or not revision or not label:
        raise argparse.ArgumentTypeError(f"expected REV:label, got {value!r}")
    return revision, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sources", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help="a project after train")
    parser.add_argument("--code", type=parse_code, action="append", help="REV:label (repeatable, 2 or more)")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.models, args.sources, args.output, args.beam_size)
        return
    if args.project is None or not args.code or len(args.code) < 2:
        parser.error("--project and at least two --code are required")
    with tempfile.TemporaryDirectory(prefix="decoding-speed-") as folder:
        rows = measure(
            args.project.resolve(), args.code, args.split, args.beam_size, args.rounds, Path(folder)
        )
    for row in rows:
        print(row, flush=True)
    if args.out:
        threads = os.environ.get("BENCHMARK_THREADS", "2")
        notes = [
            f"torch threads: {threads}; {args.rounds} rounds, each code once a round, in the order given"
        ]
        write_result(args.out, "decoding_speed", rows, notes)


if __name__ == "__main__":
    main()
