"""Decoding: what beam search's rules change on one trained model, how its length penalty is chosen, and how
fast the search of each given commit decodes the same split with the same weights.

    python -m benchmarks.decoding --project DIR [--beam-size 5] [--out FILE]      # from the project root
    python -m benchmarks.decoding --project DIR --split validation --length-penalties 0.4,0.6,0.8,1.0,1.2
    python -m benchmarks.decoding --project DIR --code "REV:label" --code "REV:label" ... [--rounds 3]

DIR is a project after `train` (its models/ and data/processed/). Decoding uses BENCHMARK_THREADS torch
threads (default 2).

- The rules (by default): every variant translates the split with the evaluate stage's `Translator` and
  the model folder's decoding settings. The rules without the masking or the forcing are re-created here,
  for one variant's run only, by replacing the next-token scoring the search uses
  (`decoding.next_token_log_probs`): "no <pad>/<s> mask": <pad> and <s> keep their probabilities, so the
  search may pick them; "limit without </s>": a hypothesis at its length limit ends there with its score
  as it is, without the probability of </s>. Rows: lowercase BLEU, BLEU and chrF, the hypotheses that
  reached their length limit or hold <pad> or <s>, and the decoding seconds.
- `--length-penalties`: one row per length penalty instead, with the shipped rules: how a default penalty
  is chosen (on the validation split; the test split takes no part).
- `--code REV:label` (2 or more): the speed of the search across commits. For each, the `pipeline/` package
  of commit REV comes out of git (`git archive`) into a temporary folder, and a child process that imports
  it from there loads DIR/models and times `Translator.translate` on the split's sources (loading
  excluded); rounds are interleaved so that the machine's drift falls on every commit alike. Rows: the
  median time over the rounds, the speed-up over the first `--code`, lowercase BLEU, and how many
  translations differ from the last `--code`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import pipeline_environment
from benchmarks.results import REPO_ROOT, Row, git_output, text_table, write_result
from pipeline.network import decoding, translator
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID

Scoring = Callable[[Tensor, Tensor], Tensor]
SHIPPED: Scoring = decoding.next_token_log_probs  # the search's scoring as the pipeline ships it


def without_special_mask(logits: Tensor, at_limit: Tensor) -> Tensor:
    """The search's scoring with <pad> and <s> left as the model scores them."""
    masked = SHIPPED(logits, at_limit)
    masked[:, [PAD_ID, BOS_ID]] = torch.log_softmax(logits.float(), dim=-1)[:, [PAD_ID, BOS_ID]]
    return masked


def limit_without_eos(logits: Tensor, at_limit: Tensor) -> Tensor:
    """The search's scoring with a hypothesis at its limit ending at no cost: </s> scores 0 there."""
    log_probs = SHIPPED(logits, at_limit)
    log_probs[at_limit, EOS_ID] = 0.0
    return log_probs


VARIANTS: dict[str, Scoring] = {
    "as shipped": SHIPPED,
    "no <pad>/<s> mask": without_special_mask,
    "limit without </s>": limit_without_eos,
}


@contextlib.contextmanager
def searching_with(scoring: Scoring, counts: dict[str, int]) -> Iterator[None]:
    """The search scores next tokens with `scoring`; `counts` gets the hypotheses whose length (with </s>)
    reached their sentence's limit, and those holding <pad> or <s>."""
    search = translator.decode_batch

    def counted(model: Any, src: Tensor, src_lengths: Tensor, **settings: Any) -> list[list[int]]:
        hypotheses = search(model, src, src_lengths, **settings)
        limits = decoding.max_lengths(src_lengths, settings.get("max_len_ratio"), settings.get("max_len"))
        counts["at_limit"] += sum(
            len(ids) + 1 >= limit for ids, limit in zip(hypotheses, limits, strict=True)
        )
        counts["special"] += sum(PAD_ID in ids or BOS_ID in ids for ids in hypotheses)
        return hypotheses

    decoding.next_token_log_probs, translator.decode_batch = scoring, counted
    try:
        yield
    finally:
        decoding.next_token_log_probs, translator.decode_batch = SHIPPED, search


def run_variant(
    name: str,
    scoring: Scoring,
    project: Path,
    split: str,
    beam_size: int,
    length_penalty: float | None = None,
) -> dict[str, Any]:
    from pipeline.network.model_files import load_model_dir
    from pipeline.network.scoring import score_corpus

    sources, references = load_split(project, split)
    loaded = load_model_dir(project / "models")
    counts = {"at_limit": 0, "special": 0}
    started = time.perf_counter()
    with searching_with(scoring, counts):
        search = translator.Translator(loaded, length_penalty=length_penalty)
        hypotheses = search.translate(sources, beam_size=beam_size)
    seconds = time.perf_counter() - started
    scores = score_corpus(hypotheses, references).scores
    return {
        "decoding": name,
        "split": split,
        "beam size": beam_size,
        "length penalty": search.length_penalty,
        "lowercase BLEU": scores["bleu_lc"],
        "BLEU": scores["bleu"],
        "chrF": scores["chrf"],
        "hypotheses at the length limit": counts["at_limit"],
        "hypotheses with <pad> or <s>": counts["special"],
        "sentences": len(sources),
        "decoding s": seconds,
    }


def load_split(project: Path, split: str) -> tuple[list[str], list[str]]:
    from pipeline.data.processed import load_processed

    return load_processed(project / "data" / "processed", splits=(split,)).texts(split)


def threads() -> int:
    """Torch threads every decoding of this benchmark uses."""
    return int(os.environ.get("BENCHMARK_THREADS", "2"))


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


# The timed child: it runs in the unpacked code's folder, so `pipeline` resolves there, ahead of any installed
# copy, and it imports nothing of this checkout. Arguments: code, models, sources (JSON), output, beam size,
# torch threads.
_CHILD = """
import json, sys, time
from pathlib import Path

import torch

import pipeline
from pipeline.network.model_files import load_model_dir
from pipeline.network.translator import Translator

code, models, sources, output, beam_size, threads = sys.argv[1:]
if not Path(pipeline.__file__).resolve().is_relative_to(Path(code).resolve()):
    raise SystemExit(f"imported {pipeline.__file__}, not the code under {code}")
torch.set_num_threads(int(threads))
search = Translator(load_model_dir(Path(models)))
lines = json.loads(Path(sources).read_text(encoding="utf-8"))
started = time.perf_counter()
translations = search.translate(lines, beam_size=int(beam_size))
seconds = time.perf_counter() - started
Path(output).write_text(json.dumps(translations), encoding="utf-8")
print(json.dumps({"seconds": seconds}))
"""


def timed_child(code: Path, models: Path, sources: Path, output: Path, beam_size: int) -> float:
    """Seconds the search of `code` takes on `sources`; its translations go to `output`."""
    arguments = [code, models, sources, output, beam_size, threads()]
    command = [sys.executable, "-c", _CHILD, *(str(argument) for argument in arguments)]
    done = subprocess.run(command, cwd=code, env=pipeline_environment(code), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"decoding with {code} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def speed(
    project: Path, codes: list[tuple[str, str]], split: str, beam_size: int, rounds: int, folder: Path
) -> list[Row]:
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="a project after train")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--length-penalties", help="comma-separated: one row each, shipped rules")
    mode.add_argument("--code", type=parse_code, action="append", help="REV:label (repeatable, 2 or more)")
    parser.add_argument("--rounds", type=int, default=3, help="--code: rounds, each code once a round")
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args()
    if args.code is not None and len(args.code) < 2:
        parser.error("--code needs at least two commits to compare")
    torch.set_num_threads(threads())
    notes = [f"torch threads: {threads()}"]
    if args.code:
        with tempfile.TemporaryDirectory(prefix="decoding-speed-") as folder:
            rows = speed(
                args.project.resolve(), args.code, args.split, args.beam_size, args.rounds, Path(folder)
            )
        notes = [f"{notes[0]}; {args.rounds} rounds, each code once a round, in the order given"]
    else:
        if args.length_penalties:
            runs = [("as shipped", SHIPPED, float(alpha)) for alpha in args.length_penalties.split(",")]
        else:
            runs = [(name, scoring, None) for name, scoring in VARIANTS.items()]
        rows = []
        for name, scoring, alpha in runs:
            rows.append(run_variant(name, scoring, args.project, args.split, args.beam_size, alpha))
            print(rows[-1], flush=True)
    print(text_table(rows))
    if args.out:
        write_result(args.out, "decoding", rows, notes)


if __name__ == "__main__":
    main()
