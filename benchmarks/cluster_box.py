"""The cluster-in-a-box tests timed as a whole (box up, the pipeline job with its late workers and its
killed host, results home, serving, batch translation, box down), beside the same pipeline's `dvc repro`
on a local Ray in the same run: what the box and the cluster round trip add.

    python -m benchmarks.cluster_box [--out benchmarks/results/DATE-cluster_box.json] [--no-baseline]

As root (the box makes network namespaces). Rows: the whole `pytest tests/test_cluster_box.py` run, each
test's time (set-up included, from pytest's JUnit XML), the local baseline, and what was left of the box
afterwards (namespaces, links named after it, `sleep infinity` hosts).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks.results import REPO_ROOT, write_result


def _box_leftovers() -> str:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in namespaces.splitlines() if line.startswith("s2sb")]
    left += [line.split(":")[1].strip() for line in links.splitlines() if ": s2s" in line]
    return ", ".join(left) or "none"


def box_rows() -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_cluster_box.py", f"--junitxml={report}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        whole = time.perf_counter() - started
        cases = ElementTree.parse(report).getroot().iter("testcase") if report.exists() else []
        rows = [
            {"measurement": f"test {case.get('name')}", "seconds": round(float(case.get("time", 0)), 1)}
            for case in cases
        ]
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"exit {done.returncode}"
    rows.insert(0, {"measurement": "box tests, whole run", "seconds": round(whole, 1), "result": summary})
    rows.append({"measurement": "left of the box afterwards", "result": _box_leftovers()})
    return rows


def baseline_row() -> dict:
    """The tests' pipeline (same params and corpus) as `dvc repro` on a local Ray, no box."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.box_project import BOX_PARAMS, write_corpus
    from tests.dvc_project import make_dvc_project, run

    with tempfile.TemporaryDirectory() as scratch:
        project = make_dvc_project(Path(scratch), BOX_PARAMS)
        write_corpus(project)
        started = time.perf_counter()
        run(["dvc", "repro"], project, timeout=1800)
        seconds = time.perf_counter() - started
    return {
        "measurement": "baseline: the same pipeline, dvc repro on a local Ray",
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    rows = box_rows()
    if not args.no_baseline:
        rows.append(baseline_row())
    for row in rows:
        print(row)
    if args.out is not None:
        notes = [
            "2 CPU cores; the box: a head and worker hosts of 1 CPU each, S3 (moto), MLflow on PostgreSQL"
        ]
        write_result(args.out, "cluster_box", rows, notes)


if __name__ == "__main__":
    main()
