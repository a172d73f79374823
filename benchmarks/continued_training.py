"""Continued training: a corpus that grows, trained again from scratch or from the model of its first half.

    python -m benchmarks.continued_training [--data ../shared/data/multi30k] [--parent-epochs 20]
                                            [--continued-epochs 4] [--continued-lr 0.003 ...]
                                            [--continued "train.lr=0.005 train.average_last=2" ...]
                                            [--workdir DIR] [--out FILE]           # from the project root

Three runs of the `gru_attention` Multi30k recipe through the pipeline's own stages, one after another:
- parent: the recipe on the first half of the training pairs (validation and test as given), for
  `--parent-epochs` (the recipe's by default; 20 gives it as many updates as the scratch run's 10 epochs on
  all the pairs, the training a champion of the smaller corpus would have had), registered as champion in
  its folder's MLflow store;
- scratch: the recipe on all the training pairs, from random weights;
- continued: in the parent's folder, all the training pairs, `set-params
  train.init_from=models:/seq2seq-translator@champion` (pinned to the parent's version) and
  `train.epochs=<--continued-epochs>`: the parent's tokenizers, architecture and weights, a fresh optimizer;
  one continued run for each `--continued-lr` (`train.lr`) and each `--continued` (its own `set-params`
  settings), in the order given; one with the recipe's settings when neither is given.
With `--workdir`, the runs' folders stay there, and a later run with the same recipe, data and
`--parent-epochs` uses the parent trained there instead of training it again (the parent and scratch runs
repeat to the last digit on one machine; the scratch run, the baseline, always runs again).
Each row gives the train stage's minutes (the training time compared), the stages' minutes and the test
scores; the continued row also its train time as a fraction of the scratch run's. Runs Ray locally: nothing
else may start a local Ray on this machine meanwhile, and for the scratch and continued times nothing else
may run (the parent's time is not compared).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import MULTI30K, pipeline_environment
from benchmarks.quality import run_step, split_scores
from benchmarks.results import REPO_ROOT, git_state, text_table, write_result
from pipeline.files import file_sha256, read_json_object, write_json

RECIPE = REPO_ROOT / "recipes" / "multi30k-gru-attention.yaml"
MODEL_NAME = "seq2seq-translator"
TRAINING_STAGES = ("prepare", "preprocess", "tune", "train", "evaluate")
PARENT_RECORD = "parent.json"  # in the working folder: what the parent was trained with, and its row


def relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def first_half(data: Path, folder: Path) -> int:
    """`folder` as `data` with only the first half of the training pairs; validation and test linked as they
    are. Returns the number of training pairs kept."""
    folder.mkdir(parents=True)
    kept = 0
    for path in sorted(data.iterdir()):
        if not path.name.startswith("train."):
            (folder / path.name).symlink_to(path.resolve())
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.readlines()
        kept = len(lines) // 2
        with opener(folder / path.name, "wt", encoding="utf-8") as handle:
            handle.writelines(lines[:kept])
    return kept


class Project:
    """A folder with params.yaml and the stages run in it by `python -m pipeline`, each timed."""

    def __init__(self, label: str, folder: Path) -> None:
        self.label, self.folder = label, folder
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "params.yaml", folder / "params.yaml")
        self.env = pipeline_environment()

    def pipeline(self, *arguments: str) -> float:
        started = time.perf_counter()
        run_step(self.label, [sys.executable, "-m", "pipeline", *arguments], self.folder, self.env)
        return time.perf_counter() - started

    def stages(self, names: tuple[str, ...]) -> dict[str, float]:
        seconds = {}
        for name in names:
            seconds[name] = self.pipeline(name)
            print(f"  {self.label}: {name} {seconds[name]:.0f} s", flush=True)
        return seconds

    def result(self, data: str, pairs: int, seconds: dict[str, float]) -> dict[str, Any]:
        reports = self.folder / "reports"
        trained = json.loads((reports / "train_metrics.json").read_text())
        with (reports / "train_history.csv").open(encoding="utf-8") as handle:
            history = list(csv.DictReader(handle))
        return {
            "run": self.label,
            "data": data,
            "training pairs": pairs,
            "epochs": len(history),
            "train s": seconds["train"],
            "stages s": sum(seconds.values()),
            "init_from": (trained.get("init_from") or {}).get("uri"),
            "history": history,
            **split_scores(reports),
        }


def table_row(result: dict[str, Any], scratch: dict[str, Any] | None) -> dict[str, Any]:
    """One run's figures; a continued run's train time and score beside the scratch run's."""
    return {
        "run": result["run"],
        "training pairs": result["training pairs"],
        "epochs": result["epochs"],
        "train min": round(result["train s"] / 60, 1),
        "train time / scratch's": None
        if scratch is None
        else round(result["train s"] / scratch["train s"], 3),
        "lowercase BLEU": result["bleu_lc"],
        "BLEU - scratch's": None if scratch is None else round(result["bleu_lc"] - scratch["bleu_lc"], 2),
        "chrF": result["chrf"],
    }


def curve_note(result: dict[str, Any]) -> str:
    bleu = ", ".join(f"{float(row['val_bleu']):.1f}" for row in result["history"] if row.get("val_bleu"))
    seconds = ", ".join(f"{float(row['epoch_seconds']):.0f}" for row in result["history"])
    return f"{result['run']}: validation BLEU (greedy) by epoch {bleu}; epoch seconds {seconds}"


def write(out: Path | None, results: list[dict[str, Any]], notes: list[str]) -> None:
    """The rows so far (a run of hours keeps what it has measured)."""
    scratch = next((r for r in results if r["run"] == "scratch"), None)
    rows = [table_row(r, scratch if r["run"].startswith("continued") else None) for r in results]
    print(text_table(rows), flush=True)
    if out is not None:
        write_result(out, "continued_training", rows, notes + [curve_note(r) for r in results])


@contextlib.contextmanager
def working_folder(workdir: Path | None) -> Iterator[Path]:
    """`workdir`, kept; or a temporary folder, removed at the end."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="continued-") as temporary:
        yield Path(temporary)


def parent_identity(recipe: Path, data: Path, parent_epochs: int | None) -> dict[str, Any]:
    """What makes two parents the same (with the code: the record keeps the commit it was trained at)."""
    return {
        "recipe sha256": file_sha256(recipe).hex(),
        "data": str(data.resolve()),
        "parent epochs": parent_epochs,
    }


def earlier_parent(root: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The record of the parent trained in `root` with `identity`; None when there is none."""
    record = root / PARENT_RECORD
    if not record.exists():
        return None
    saved = read_json_object(record)
    if saved["identity"] != identity:
        raise SystemExit(
            f"{root} holds a parent trained with other settings ({saved['identity']}, not {identity}):"
            " remove it or give another --workdir"
        )
    return saved


def train_parent(root: Path, args: argparse.Namespace, identity: dict[str, Any]) -> dict[str, Any]:
    """The parent on the first half of the training pairs, registered as champion in its folder's store; its
    record written last, so a parent stopped half-way is trained again, from nothing."""
    for leftover in (root / "half", root / "parent"):
        shutil.rmtree(leftover, ignore_errors=True)
    half_pairs = first_half(args.data, root / "half")
    parent = Project("parent", root / "parent")
    parent.pipeline(
        "set-params",
        "--recipe",
        str(args.recipe),
        f"data.source={root / 'half'}",
        *([f"train.epochs={args.parent_epochs}"] if args.parent_epochs else []),
    )
    seconds = parent.stages(TRAINING_STAGES)
    seconds["register"] = parent.pipeline("register")
    record = {
        "identity": identity,
        "commit": git_state()[0],
        "result": parent.result("first half", half_pairs, seconds),
    }
    write_json(root / PARENT_RECORD, record)  # atomic: a record exists only for a finished parent
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=MULTI30K, help="a Multi30k folder (train/val/test)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe of all three runs")
    parser.add_argument(
        "--parent-epochs", type=int, default=None, help="train.epochs of the parent (default: the recipe's)"
    )
    parser.add_argument(
        "--continued-epochs", type=int, default=4, help="train.epochs of the continued run (recipe: 10)"
    )
    parser.add_argument(
        "--continued-lr",
        type=float,
        action="append",
        default=None,
        help="train.lr of a continued run; repeat for one run each (default: the recipe's)",
    )
    parser.add_argument(
        "--continued",
        action="append",
        default=None,
        metavar="SETTINGS",
        help="set-params settings of a continued run, KEY=VALUE separated by spaces; repeat for one run each",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the runs' folders here; a parent trained here before with the same recipe, data and"
        " --parent-epochs is used, not trained again (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no Multi30k folder at {args.data} (see ../shared/data/multi30k/README.md)")
    full = str(args.data.resolve())
    notes = [
        f"recipe {relative(args.recipe)}; Multi30k de->en, test2016; lowercase sacreBLEU",
        "parent: the recipe on the first half of the training pairs"
        + (f", train.epochs {args.parent_epochs}" if args.parent_epochs else "")
        + ", registered; its time is not compared",
        f"continued: all pairs, train.init_from the parent's pinned version, train.epochs "
        f"{args.continued_epochs}, a fresh optimizer; the settings of each run in its name",
    ]
    variants = [f"train.lr={lr}" for lr in args.continued_lr or []] + list(args.continued or [])
    results: list[dict[str, Any]] = []
    with working_folder(args.workdir) as root:
        for settings in variants:  # a misspelt key fails now, not after the hour of the first two runs
            Project("check", root / "check").pipeline(
                "set-params", "--recipe", str(args.recipe), *settings.split()
            )
        identity = parent_identity(args.recipe, args.data, args.parent_epochs)
        parent = earlier_parent(root, identity)
        if parent is None:
            parent = train_parent(root, args, identity)
        else:
            notes.append(
                "parent: trained by an earlier run in the same working folder, at commit"
                f" {parent['commit'][:7]}, and used again (not trained in this run)"
            )
        results.append(parent["result"])
        write(args.out, results, notes)

        shutil.rmtree(root / "scratch", ignore_errors=True)  # an earlier run's checkpoints would be resumed
        scratch = Project("scratch", root / "scratch")
        scratch.pipeline("set-params", "--recipe", str(args.recipe), f"data.source={full}")
        seconds = scratch.stages(TRAINING_STAGES)
        pairs = json.loads((scratch.folder / "data/processed/meta.json").read_text())["pairs"]["train"]
        results.append(scratch.result("all", pairs, seconds))
        write(args.out, results, notes)

        for settings in variants or [""]:
            label = f"continued {settings}".strip()
            # In the parent's folder: its store, its champion. Ray Train's checkpoints of an earlier run with
            # the same settings would be resumed instead of trained, and the parent's are not needed (its
            # model is in the store).
            shutil.rmtree(root / "parent" / "runs", ignore_errors=True)
            continued = Project(label, root / "parent")
            continued.pipeline(
                "set-params",
                "--recipe",
                str(args.recipe),
                f"data.source={full}",
                f"train.init_from=models:/{MODEL_NAME}@champion",
                f"train.epochs={args.continued_epochs}",
                *settings.split(),
            )
            seconds = continued.stages(TRAINING_STAGES)
            results.append(continued.result("all", pairs, seconds))
            write(args.out, results, notes)


if __name__ == "__main__":
    main()
