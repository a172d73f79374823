"""The default main job's test BLEU at given commits and settings, the search off: what a change to the
defaults costs or gains, measured the same way at each commit.

    python -m benchmarks.default_bleu --run "before:7b13eb8" --run "after:a06674c" \\
        --run "after, length buckets 1:HEAD:train.length_buckets=1" --out FILE

Each `--run LABEL:REV[:KEY=VALUE,...]` clones this repository at REV into a temporary folder, sets
`tune.num_samples=0` and the given keys with `python -m pipeline set-params`, runs `dvc repro evaluate`
(prepare, preprocess, train, evaluate on the built-in corpus, 2 Ray Train workers) with this environment's
Python, and reads reports/metrics.json and reports/train_metrics.json. Runs go one after another: on 2
cores each takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import REPO_ROOT, git_output, write_result


def measure(label: str, revision: str, settings: list[str]) -> dict[str, Any]:
    commit = git_output("rev-parse", revision)
    with tempfile.TemporaryDirectory(prefix="default-bleu-") as scratch:
        project = Path(scratch) / "project"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(project)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=project, check=True)
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(project),  # the clone's code, not this checkout's editable install
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("RAY_ADDRESS", None)
        pipeline = [sys.executable, "-m", "pipeline"]
        subprocess.run(
            [*pipeline, "set-params", "tune.num_samples=0", *settings], cwd=project, env=env, check=True
        )
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "evaluate"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{label}: dvc repro exited {done.returncode}\n{done.stderr[-3000:]}")
        metrics = json.loads((project / "reports/metrics.json").read_text())
        trained = json.loads((project / "reports/train_metrics.json").read_text())
    return {
        "measurement": label,
        "code": commit[:7],
        "settings": " ".join(settings) or "defaults",
        "test BLEU": metrics["bleu"],
        "lowercase BLEU": metrics.get("bleu_lc"),
        "chrF": metrics["chrf"],
        "best val_loss": trained.get("best_val_loss"),
        "stages s": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL:REV[:KEY=VALUE,...]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for spec in args.run:
        label, revision, *rest = spec.split(":", 2)
        settings = [item for item in (rest[0].split(",") if rest else []) if item]
        rows.append(measure(label, revision, settings))
        print(rows[-1], flush=True)
    if args.out is not None:
        write_result(args.out, "default_bleu", rows, ["built-in corpus, 20,000 pairs; tune off; beam 4"])


if __name__ == "__main__":
    main()
