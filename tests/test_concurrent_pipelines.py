"""Two pipelines on one machine, each with its own local Ray: both finish. Before each Ray process knew its
own instance, Train's placement-group cleaner found two and failed, and the next trial's worker group
waited forever (`Error count: N (max allowed: inf)` every 60 s, at 0 % CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, prepare_project

pytestmark = pytest.mark.slow

SMALL_SEARCH = {
    "tune": {
        "num_samples": 2,
        "max_epochs": 1,
        "max_examples": 300,
        "search_space": {
            "model.emb_dim": {"choice": [16]},
            "model.hidden_dim": {"choice": [24, 32]},
            "model.n_layers": {"randint": [1, 2]},
            "model.dropout": {"uniform": [0.0, 0.1]},
        },
    },
    "train": {"val_bleu_sentences": 0},
    "runtime": {"worker_start_timeout_s": 240},
}
# Far above the couple of minutes two searches take side by side on 2 cores; far below "forever".
BOTH_DONE_WITHIN_S = 900


def test_two_tune_stages_started_together_on_one_machine_both_finish(tmp_path: Path) -> None:
    projects = [tmp_path / "first", tmp_path / "second"]
    for project in projects:
        project.mkdir()
        prepare_project(project, SMALL_SEARCH)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):  # local Ray, local store
        env.pop(name, None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "tune"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(project / "tune.log").open("w"),
        )
        for project in projects
    ]
    deadline = time.monotonic() + BOTH_DONE_WITHIN_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(
            "two tune stages side by side did not finish: " + (projects[0] / "tune.log").read_text()[-3000:]
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for project, process in zip(projects, processes, strict=True):
        assert process.returncode == 0, (project / "tune.log").read_text()[-3000:]
        best = json.loads((project / "reports" / "best_params.json").read_text())
        assert best["n_trials"] == 2
