"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): the data stages' Ray Data tasks and actors
work on both, and a batch translation on the two-node cluster. (Training across hosts, its ranks reading
the object store's copy of the data, is tested on the cluster in a box: tests/test_cluster_box.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    REPO_ROOT,
    different_files,
    random_model_dir,
    run_data_stages,
    stdin_translation,
    torch_threads,
)
from tests.two_node_data import OPERATORS

pytestmark = pytest.mark.slow


def test_data_stages_and_batch_translation_run_blocks_on_both_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data stages' map tasks and tokenizer actors, and the batch translation's model actors, work on
    blocks on both nodes; the files are those of the local engine, and the translation equals one
    process's."""
    run_data_stages(tmp_path / "local", "builtin", "local")
    sources = [f"the {i} big dogs see a red cat ." for i in range(300)]  # 150 chunks: see two_node_data
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    model = random_model_dir(tmp_path / "local/data/processed", tmp_path / "model")
    paths = [tmp_path / "ray", model, tmp_path / "in.txt", tmp_path / "out.txt"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.two_node_data", *map(str, paths)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert len(found["nodes"]) == 2
    assert {name: found[name] for name in OPERATORS} == dict.fromkeys(OPERATORS, found["nodes"])
    assert different_files(tmp_path / "local", tmp_path / "ray") == []
    with torch_threads(1):
        one_process = stdin_translation(model, (tmp_path / "in.txt").read_bytes(), capsys, monkeypatch)
    assert (tmp_path / "out.txt").read_text() == one_process
