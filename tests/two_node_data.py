"""Run by tests/test_multinode.py in a process of its own: a two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), the data stages with `data.engine: ray` and a batch translation on it, and
which nodes ran the data stages' tasks and actors, as JSON on the last line of stdout.

    python -m tests.two_node_data PROJECT MODEL INPUT OUTPUT

A process of its own because a cluster started inside pytest changes process-wide Ray and logging state
that later Ray runs in the same process would inherit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Ray Data operators whose tasks or actors must work on blocks on both nodes: the data stages' cleaning
# tasks and tokenizer actors, and the batch translation's model actors. 4 one-CPU actors cannot fit on a
# 3-CPU node, and the translation starts only once all of them are up. Ray Data gives a chunk to an actor
# on the node that holds it while one there has room (2 chunks queued each), so the other node's actor
# gets chunks only while the reading node's are full: 150 chunks keep them full (with 30, actors that
# translate as fast as the chunks arrive sometimes took them all).
OPERATORS = ("_clean_block", "TokenizerActor", "TranslatorActor")


def block_node_ids(name_part: str) -> set[str]:
    """The nodes whose tasks (Ray's state records) worked on blocks of an operator named with `name_part`:
    its map tasks, or its actors' `submit` calls (not the actors' start or location probes, which run
    wherever an actor stands, whether or not it is given a block)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(limit=10_000, raise_on_missing_output=False)
    return {task.node_id for task in tasks if _on_blocks(task.name or "", name_part) and task.node_id}


def _on_blocks(task_name: str, name_part: str) -> bool:
    if name_part not in task_name:
        return False
    return task_name.endswith(".submit") if task_name.startswith("MapWorker(") else True


def main(project: Path, model: Path, source: Path, output: Path) -> dict[str, list[str]]:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.__main__ import main as pipeline_main
    from pipeline.data import ray_encode, ray_prepare
    from tests.helpers import run_data_stages

    # 3 CPUs a node: the tokenizer pool (one actor per CPU, a CPU per node left to the readers) cannot fit
    # on one node, so both run some. Ray Data spreads actors only as far as free CPUs allow.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    ray_prepare.BLOCK_ROWS = ray_encode.BLOCK_ROWS = 100  # several blocks from a small corpus
    try:
        ray.init(address=cluster.address)
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        run_data_stages(project, "builtin", "ray")
        arguments = ["-q", "translate", "--model", str(model), "--max-sentences", "2", "--actors", "4"]
        if pipeline_main([*arguments, "--input", str(source), "--output", str(output)]) != 0:
            raise SystemExit("batch translation failed")
        ran_on = {name: sorted(block_node_ids(name)) for name in OPERATORS}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": nodes, **ran_on}


if __name__ == "__main__":
    found = main(*(Path(argument) for argument in sys.argv[1:5]))
    print(json.dumps(found))
