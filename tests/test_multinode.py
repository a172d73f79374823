"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): one DDP worker on each, the data stages'
Ray Data tasks and actors on both, and a batch translation on the two-node cluster.

The data reaches the second node's worker through the object store, not the driver's disk.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, prepare_project, torch_threads, working_directory

pytestmark = pytest.mark.slow


def test_train_stage_spans_two_nodes_one_worker_each(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.params_file import load_config
    from pipeline.stages import train

    prepare_project(tmp_path, {"train": {"epochs": 1}})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        with working_directory(tmp_path):
            train.run(load_config("params.yaml"))
            history = list(csv.DictReader(Path("reports/train_history.csv").read_text().splitlines()))
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert int(history[0]["n_nodes"]) == 2
    assert int(history[0]["n_workers"]) == 2
    assert int(history[0]["replica_divergence"]) == 0
    # The worker on the second node reads the object-store replica; the one beside the driver maps files.
    assert int(history[0]["object_store_readers"]) == 1


def test_data_stages_and_batch_translation_run_blocks_on_both_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data stages' map tasks and tokenizer actors, and the batch translation's model actors, work on
    blocks on both nodes; the files are those of the local engine, and the translation equals one
    process's."""
    from benchmarks.ray_data import random_model_dir
    from tests.test_ray_data import different_files, run_data_stages, stdin_translation
    from tests.two_node_data import OPERATORS

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
