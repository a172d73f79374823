"""The README's test command, timed step by step in a fresh clone of this checkout's HEAD: the installs, then
each lane twice in the same run: in one pytest process (the baseline) and on pytest-xdist's two workers,
each taking whole modules (`-n 2 --dist loadfile`), so each module keeps its one Ray instance.

    python -m benchmarks.suite_lanes [--out benchmarks/results/DATE-suite_lanes.json] [--runs serial,xdist]
    python -m benchmarks.suite_lanes --lanes "slow lane" --runs xdist,xdist3   # 2 workers against 3
    python -m benchmarks.suite_lanes --lanes "slow lane" --runs xdist,longest-first   # files handed out
    python -m benchmarks.suite_lanes --runs longest-first3,longest-first   # 3 workers against 2
    python -m benchmarks.suite_lanes --installs bundled-pip,upgraded-pip,bundled-pip,upgraded-pip --lanes ""

Run it alone on the machine (the lanes start Ray, servers and namespaces; as root for the cluster-in-a-box
tests). Rows: each step's seconds and pytest's summary line; the slow lane's 10 slowest tests of each run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import REPO_ROOT, write_result

PACKAGES = (
    ".venv/bin/pip install -q --no-compile torch==2.13.0"
    ' && .venv/bin/pip install -q --no-compile -c constraints.txt -e ".[dev]"'
)
# Each in a new venv. The README's upgrades pip first: the pip that `python3 -m venv` bundles (23.2 with
# Python 3.11) checks every file of every release of every candidate package against the platform's tags
# while it resolves, which took most of the install's time here.
INSTALLS = {
    "upgraded-pip": f"python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && {PACKAGES}",
    "bundled-pip": f"python3 -m venv .venv && {PACKAGES}",
}
PYTEST = ".venv/bin/python -m pytest -q --durations=10"
LANES = {"fast lane": '-m "not slow"', "slow lane": "-m slow"}
# The README's command runs each lane on pytest-xdist's workers, each taking whole modules, so a module
# keeps its one Ray instance; one pytest process is the baseline. Three workers on 2 cores: the slow tests
# spend much of their time waiting (processes and Ray starting, servers answering). `longest-first`: the
# files in tests/conftest.py's order, longest first (the README's), instead of xdist's own (most tests first).
RUNS = {
    "serial": "",
    "xdist": "-n 2 --dist loadfile",
    "longest-first": "-n 2 --dist loadfile --no-loadscope-reorder",
    "xdist3": "-n 3 --dist loadfile",
    "longest-first3": "-n 3 --dist loadfile --no-loadscope-reorder",
}
DURATION_LINE = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)$")


def timed(command: str, cwd: Path, log: Path) -> tuple[float, int, str]:
    """(seconds, exit code, output) of a shell command run in `cwd`, its output also kept in `log`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    started = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(done.stdout + done.stderr)
    return seconds, done.returncode, done.stdout + done.stderr


def summary(output: str) -> str:
    """pytest's last line (`N passed, ... in Xs`), or the output's last line."""
    lines = [line.strip("= ") for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def slowest(output: str, run: str, count: int) -> list[dict]:
    rows = []
    for line in output.splitlines():
        matched = DURATION_LINE.match(line.strip())
        if matched and len(rows) < count:
            seconds, phase, test = matched.groups()
            rows.append({"step": f"{run}: {phase} {test}", "seconds": float(seconds)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--runs", default="serial,xdist", help=f"how each lane runs, in order: {', '.join(RUNS)}"
    )
    parser.add_argument("--lanes", default=",".join(LANES), help='which lanes run, in order (none: "")')
    parser.add_argument(
        "--installs",
        default="upgraded-pip",
        help=f"installs, in order, each in a new venv ({', '.join(INSTALLS)}); the lanes use the last one's",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep each step's output here")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lanes") as scratch:
        clone = Path(scratch) / "clone"
        logs = args.logs or Path(scratch)
        logs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        installs = args.installs.split(",")
        named = [(f"install, {install}" if len(installs) > 1 else "install", install) for install in installs]
        steps = [(name, f"rm -rf .venv && {INSTALLS[install]}") for name, install in named]
        steps += [
            (f"{lane}, {run}", f"{PYTEST} {RUNS[run]} {LANES[lane]}")
            for lane in filter(None, args.lanes.split(","))
            for run in args.runs.split(",")
        ]
        for index, (name, command) in enumerate(steps):
            log = logs / f"{index:02d}-{name.replace(' ', '_').replace(',', '')}.log"
            seconds, code, output = timed(command, clone, log)
            result = "installed" if name.startswith("install") and code == 0 else summary(output)
            rows.append({"step": name, "seconds": round(seconds, 1), "exit": code, "result": result})
            print(rows[-1], flush=True)
            if name.startswith("slow lane"):
                rows += slowest(output, name.removeprefix("slow lane, "), 10)
    for row in rows:
        print(row)
    if args.out is not None:
        notes = [
            f"a fresh clone of HEAD; the installs ({args.installs}: upgraded-pip upgrades pip in the new venv"
            " first, as the README does; bundled-pip installs with the pip the venv comes with), each in a"
            f" new venv, then the lanes ({args.lanes or 'none'}) run as {args.runs}"
            " (serial: one pytest process; xdist: 2 workers; xdist3: 3; longest-first: 2 workers, longest"
            " files first; longest-first3: 3), one after another, alone on the machine",
            f"python {sys.version.split()[0]}",
        ]
        write_result(args.out, "suite_lanes", rows, notes)


if __name__ == "__main__":
    main()
