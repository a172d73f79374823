"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): one DDP worker on each, and Ray Data's
tasks and actors (the data stages, batch translation) on both.

The data reaches the second node's worker through the object store, not the driver's disk.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import prepare_project, torch_threads, working_directory

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
    """Ray Data's map tasks and actors land on both nodes, and the files are those of the local engine."""
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.ray_data import random_model_dir
    from pipeline.__main__ import main
    from pipeline.data import ray_encode, ray_prepare
    from tests.test_ray_data import different_files, run_data_stages, stdin_translation

    run_data_stages(tmp_path / "local", "builtin", "local")
    sources = [f"the {i} big dogs see a red cat ." for i in range(60)]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    model = random_model_dir(tmp_path / "local/data/processed", tmp_path / "model")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    saved = ray_prepare.BLOCK_ROWS, ray_encode.BLOCK_ROWS
    ray_prepare.BLOCK_ROWS = ray_encode.BLOCK_ROWS = 100  # several blocks from a small corpus
    try:
        ray.init(address=cluster.address)
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        run_data_stages(tmp_path / "ray", "builtin", "ray")
        args = ["-q", "translate", "--model", str(model), "--max-sentences", "10", "--actors", "2"]
        assert main([*args, "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")]) == 0
        names = ("_clean_block", "TokenizerActor", "TranslatorActor")
        ran_on = {name: block_node_ids(name) for name in names}
    finally:
        ray_prepare.BLOCK_ROWS, ray_encode.BLOCK_ROWS = saved
        ray.shutdown()
        cluster.shutdown()

    assert len(nodes) == 2
    assert ran_on == dict.fromkeys(ran_on, nodes), ran_on
    assert different_files(tmp_path / "local", tmp_path / "ray") == []
    with torch_threads(1):
        one_process = stdin_translation(model, (tmp_path / "in.txt").read_bytes(), capsys, monkeypatch)
    assert (tmp_path / "out.txt").read_text() == one_process


def block_node_ids(name_part: str) -> set[str]:
    """The nodes whose tasks or actors (Ray's state records) ran an operator named with `name_part`."""
    from ray.util.state import list_actors, list_tasks

    tasks = list_tasks(limit=10_000, raise_on_missing_output=False)
    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    return {task.node_id for task in tasks if name_part in (task.name or "") and task.node_id} | {
        actor.node_id for actor in actors if name_part in (actor.class_name or "") and actor.node_id
    }
