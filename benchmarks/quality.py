"""Quality: test BLEU of each architecture's Multi30k recipe through the pipeline's own stages, with one
setting changed at a time, and of the default main job at given commits and settings.

    python -m benchmarks.quality [--archs gru,gru_attention,transformer] [--data ../shared/data/multi30k]
                                 [--set KEY=VALUE ...] [--decode "KEY=VALUE KEY=VALUE" ...]
                                 [--out quality.json]                             # from the project root
    python -m benchmarks.quality --run "LABEL:REV[:KEY=VALUE,...]" --run ... [--out FILE]

- The recipes (by default): for each architecture, a fresh folder with params.yaml, `set-params --recipe
  recipes/multi30k-<arch>.yaml data.source=<data>`, then `python -m pipeline prepare, preprocess, tune,
  train, evaluate` (tune is off in the recipes: it only records the recipe's settings). The transformer
  takes its CPU recipe (`multi30k-transformer-cpu.yaml`) unless `--full-transformer`. Printed beside the
  published figures on the same test set (Multi30k test2016 de->en, lowercase BLEU). Runs Ray locally:
  nothing else may start a local Ray on this machine meanwhile. `--set` changes a setting for every run
  after the recipe (a training-side row, e.g. `--set preprocess.byte_fallback=false`); each `--decode`
  re-runs only evaluate on the same trained model with other settings (a decoding-side row, e.g.
  `--decode evaluate.length_penalty=0.6`), so a decoding change is measured on identical weights.
- `--run LABEL:REV[:KEY=VALUE,...]` (repeatable): the default main job, the search off, at commit REV: a
  clone of this repository at REV in a temporary folder, `tune.num_samples=0` and the given keys set with
  `python -m pipeline set-params`, then `dvc repro evaluate` (prepare, preprocess, train, evaluate on the
  built-in corpus, 2 Ray Train workers) with this environment's Python; what a change to the defaults
  costs or gains, measured the same way at each commit. Runs go one after another: on 2 cores each takes
  about 10 minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import MULTI30K, pipeline_environment
from benchmarks.results import REPO_ROOT, Row, git_output, text_table, write_result

RECIPES = {
    "gru": "multi30k-gru.yaml",
    "gru_attention": "multi30k-gru-attention.yaml",
    "transformer": "multi30k-transformer-cpu.yaml",
}
STAGES = ("prepare", "preprocess", "tune", "train", "evaluate")
# Lowercase BLEU on Multi30k test2016 de->en, from ../shared/data/multi30k/README.md and the issue tracker.
PUBLISHED = {
    "gru": "20.6 (GRU, 14M)",
    "gru_attention": "28.3 (GRU + attention, 20.5M)",
    "transformer": "36.5 (PyTorch tutorial); 38.4 (OpenNMT-py)",
}


def run_step(label: str, arguments: list[str], folder: Path, env: dict[str, str]) -> None:
    """`arguments` run in `folder`, output appended to folder/quality.log; the benchmark stops if it fails."""
    log = folder / "quality.log"
    with log.open("a", encoding="utf-8") as handle:
        done = subprocess.run(arguments, cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"{label}: {shlex.join(arguments[1:])} failed (exit {done.returncode}):\n{tail}")


def run_recipe(
    arch: str, recipe: Path, data: Path, keep: Path | None, overrides: list[str], decodes: list[list[str]]
) -> list[dict[str, Any]]:
    """The recipe's row, then one row per decoding variant evaluated on the same weights."""
    folder = Path(tempfile.mkdtemp(prefix=f"quality-{arch}-"))
    shutil.copy(REPO_ROOT / "params.yaml", folder / "params.yaml")
    env = pipeline_environment()

    def pipeline(*arguments: str) -> None:
        run_step(arch, [sys.executable, "-m", "pipeline", *arguments], folder, env)

    pipeline("set-params", "--recipe", str(recipe), f"data.source={data.resolve()}", *overrides)
    seconds: dict[str, float] = {}
    for stage in STAGES:
        started = time.perf_counter()
        pipeline(stage)
        seconds[stage] = time.perf_counter() - started
        print(f"  {arch}: {stage} {seconds[stage]:.0f} s", flush=True)
    reports = folder / "reports"
    trained = json.loads((reports / "train_metrics.json").read_text())
    with (reports / "train_history.csv").open(encoding="utf-8") as handle:
        history = list(csv.DictReader(handle))
    trained_result = {
        "arch": arch,
        "recipe": recipe.name,
        "settings": " ".join(overrides) or "recipe",
        "parameters": trained["parameters"],
        "epochs": len(history),
        "wall_seconds": sum(seconds.values()),
        "stage_seconds": seconds,
        "train_tokens_per_sec": statistics.median(float(row["tokens_per_sec"]) for row in history),
        "history": history,
    }
    results = [{**trained_result, **split_scores(reports)}]
    if keep is not None:
        shutil.copytree(reports, keep / arch, dirs_exist_ok=True)
    base_params = (folder / "params.yaml").read_text()
    for decode in decodes:
        (folder / "params.yaml").write_text(base_params)  # each variant starts from the trained settings
        pipeline("set-params", *decode)
        pipeline("evaluate")
        settings = " ".join([*overrides, *decode])
        results.append({**trained_result, **split_scores(reports), "settings": settings, "decode_only": True})
        print(f"  {arch}: {settings}: lowercase BLEU {results[-1]['bleu_lc']:.1f}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def split_scores(reports: Path) -> dict[str, Any]:
    metrics = json.loads((reports / "metrics.json").read_text())
    scores = {key: metrics.get(key) for key in ("bleu", "bleu_lc", "chrf")}
    # With evaluate.length_penalty_search, the length penalty chosen on the validation split.
    scores["length_penalty"] = metrics.get("length_penalty")
    return scores


def default_job(label: str, revision: str, settings: list[str]) -> Row:
    """The default main job at commit `revision` with `settings`, the search off: its test scores."""
    commit = git_output("rev-parse", revision)
    with tempfile.TemporaryDirectory(prefix="default-job-") as scratch:
        project = Path(scratch) / "project"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(project)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=project, check=True)
        env = pipeline_environment(project)  # the clone's code, not this checkout's editable install
        pipeline = [sys.executable, "-m", "pipeline"]
        run_step(label, [*pipeline, "set-params", "tune.num_samples=0", *settings], project, env)
        started = time.perf_counter()
        run_step(label, [sys.executable, "-m", "dvc", "repro", "evaluate"], project, env)
        seconds = time.perf_counter() - started
        scores = split_scores(project / "reports")
        trained = json.loads((project / "reports" / "train_metrics.json").read_text())
    return {
        "measurement": label,
        "code": commit[:7],
        "settings": " ".join(settings) or "defaults",
        "test BLEU": scores["bleu"],
        "lowercase BLEU": scores["bleu_lc"],
        "chrF": scores["chrf"],
        "best val_loss": trained.get("best_val_loss"),
        "stages s": round(seconds),
    }


def parse_run(value: str) -> tuple[str, str, list[str]]:
    """LABEL:REV[:KEY=VALUE,...] as (label, revision, settings); the label may hold colons, REV may not."""
    head, _, last = value.rpartition(":")
    label, revision, settings = (*head.rpartition(":")[::2], last) if "=" in last else (head, last, "")
    if not label or not revision:
        raise argparse.ArgumentTypeError(f"expected LABEL:REV[:KEY=VALUE,...], got {value!r}")
    return label, revision, [item for item in settings.split(",") if item]


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One run's figures beside the published figure for its architecture (the baseline of the table)."""
    return {
        "architecture": result["arch"],
        "recipe": result["recipe"],
        "settings": result["settings"] + (" (same weights)" if result.get("decode_only") else ""),
        "parameters M": result["parameters"] / 1e6,
        "epochs": result["epochs"],
        "train min": result["stage_seconds"]["train"] / 60,
        "wall min": result["wall_seconds"] / 60,
        "target tokens/s": result["train_tokens_per_sec"],
        "test BLEU": result["bleu"],
        "lowercase BLEU": result["bleu_lc"],
        "chrF": result["chrf"],
        "length penalty": result["length_penalty"],
        "published lowercase BLEU": PUBLISHED[result["arch"]],
    }


def curve_note(result: dict[str, Any]) -> str:
    """The run's learning curve, which one final figure does not show."""
    bleu = ", ".join(_figure(row.get("val_bleu"), ".1f") for row in result["history"])
    seconds = ", ".join(_figure(row.get("epoch_seconds"), ".0f") for row in result["history"])
    label = f"{result['arch']} ({result['settings']})"
    return f"{label}: validation BLEU (greedy) by epoch {bleu}; epoch seconds {seconds}"


def _figure(value: str | None, spec: str) -> str:
    return "-" if value in (None, "") else format(float(value), spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archs", default=",".join(RECIPES), help="comma-separated, from " + ", ".join(RECIPES)
    )
    parser.add_argument("--data", type=Path, default=MULTI30K, help="a Multi30k folder (train/val/test)")
    parser.add_argument("--full-transformer", action="store_true", help="the GPU recipe, not the CPU one")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting after the recipe, for every run (repeatable)",
    )
    parser.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="re-run evaluate on the trained model with these settings, one row each (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    parser.add_argument("--keep-reports", type=Path, default=None, help="copy each run's reports/ here")
    parser.add_argument(
        "--run",
        type=parse_run,
        action="append",
        default=[],
        metavar="LABEL:REV[:KEY=VALUE,...]",
        help="the default main job at commit REV with these settings, one row each (repeatable)",
    )
    args = parser.parse_args()
    if args.run:
        rows = []
        for label, revision, settings in args.run:
            rows.append(default_job(label, revision, settings))
            print(rows[-1], flush=True)
        print(text_table(rows))
        if args.out is not None:
            notes = ["built-in corpus, 20,000 pairs; tune off; beam 4"]
            write_result(args.out, "quality", rows, notes)
        return
    if not args.data.is_dir():
        raise SystemExit(f"no Multi30k folder at {args.data} (see ../shared/data/multi30k/README.md)")
    archs = [arch.strip() for arch in args.archs.split(",") if arch.strip()]
    unknown = [arch for arch in archs if arch not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown architecture(s) {unknown}; choose from {list(RECIPES)}")
    results = []
    for arch in archs:
        name = (
            "multi30k-transformer.yaml" if arch == "transformer" and args.full_transformer else RECIPES[arch]
        )
        decodes = [shlex.split(variant) for variant in args.decode]
        recipe = REPO_ROOT / "recipes" / name
        results += run_recipe(arch, recipe, args.data, args.keep_reports, args.overrides, decodes)
        if args.out:  # after each architecture: a run of hours keeps what it has measured
            rows = [table_row(r) for r in results]
            notes = [curve_note(r) for r in results if not r.get("decode_only")]
            write_result(args.out, "quality", rows, notes)
    print(text_table([table_row(r) for r in results]))


if __name__ == "__main__":
    main()
