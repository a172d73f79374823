"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): one DDP worker on each, and Ray Data's
tasks and actors (the data stages, batch translation) on both.

The data reaches the second node's worker through the object store, not the driver's disk.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import prepare_project, working_directory

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
