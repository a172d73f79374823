"""The TorchTrainer that runs `worker.train_worker`, and what it ships to every worker.

Knows Ray Train, not Tune: Tune wraps `build_trainer` (see tuning.py). Workers on the driver's machine
memory-map data/processed directly (no copy: they share the page cache and touch only the pages of their
batches). On a cluster the splits are also put in the object store once, so a worker elsewhere gets one
zero-copy replica per node instead of reading the driver's disk, which its node does not have. "On a
cluster" is decided by how the driver joined Ray, not by the nodes alive now: an autoscaling cluster adds
its (GPU) workers after the stage asks for them, and those must find the data too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch

from pipeline.config import CheckpointInterval, ModelConfig, RuntimeConfig, TrainConfig
from pipeline.data.processed import ProcessedData
from pipeline.network.encoded import EncodedSplit
from pipeline.training.ray_session import cluster_address
from pipeline.training.resources import worker_resources
from pipeline.training.worker import LOOP_KEY, train_worker


@dataclass(frozen=True)
class SplitHandle:
    """Where a worker finds one encoded split: the driver's folder, mapped by workers on the driver's node,
    and an object ref for workers on other nodes (None on a one-node cluster)."""

    path: str
    driver_node_id: str
    limit: int | None = None  # first N pairs only
    ref: ray.ObjectRef | None = None

    def from_object_store(self) -> bool:
        """Whether this process reads the object-store replica (it is not on the driver's node)."""
        return self.ref is not None and ray.get_runtime_context().get_node_id() != self.driver_node_id

    def open(self) -> EncodedSplit:
        if self.from_object_store():
            return ray.get(self.ref)  # zero-copy: numpy arrays in the node's shared object store
        split = EncodedSplit.open(Path(self.path))
        return split if self.limit is None else split.head(self.limit)


@dataclass(frozen=True)
class TrainingData:
    """What every worker needs: handles to the splits plus the small things inline."""

    train: SplitHandle
    validation: SplitHandle
    src_vocab_size: int
    tgt_vocab_size: int
    tgt_tokenizer_json: str
    validation_references: tuple[str, ...]  # the cleaned text, what per-epoch BLEU scores against


class EpochLogger(Protocol):
    """Where rank 0 sends each epoch's metrics (the tracking layer's MLflow logger; this layer knows
    only the shape). It must pickle: it travels to the workers inside the loop config."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...


def put_training_data(processed: ProcessedData, max_examples: int | None = None) -> TrainingData:
    """Handles to the train (first `max_examples` pairs) and validation splits for the workers."""
    multi_node = may_span_nodes()
    driver_node_id = ray.get_runtime_context().get_node_id()

    def handle(split: str, limit: int | None) -> SplitHandle:
        path = processed.split_dir(split)
        ref = None
        if multi_node:
            encoded = EncodedSplit.open(path)
            ref = ray.put((encoded if limit is None else encoded.head(limit)).in_memory())
        return SplitHandle(str(path), driver_node_id, limit, ref)

    return TrainingData(
        handle("train", max_examples),
        handle("validation", None),
        processed.src_vocab_size,
        processed.tgt_vocab_size,
        processed.tgt_tokenizer.to_str(),
        tuple(processed.texts("validation")[1]),
    )


def put_init_weights(weights: dict[str, Any]) -> ray.ObjectRef:
    """A continued run's starting weights, put into the object store once: every worker, on any node,
    reads that one copy (zero-copy on the driver's node) instead of each being sent its own."""
    return ray.put(weights)


def may_span_nodes() -> bool:
    """Whether a worker may run on a node other than the driver's: the driver joined a cluster (RAY_ADDRESS,
    as in every Ray job), which can grow at any time, or the Ray it uses has several nodes already. A local
    Ray that a stage started on its own machine has one node for good."""
    return cluster_address() is not None or sum(node["Alive"] for node in ray.nodes()) > 1


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker's loop reads, as typed fields: it crosses into Ray as this one object.

    `epoch_logger` gets rank 0's per-epoch metrics. `checkpoint_every` adds mid-epoch checkpoints
    (`runtime.checkpoint_every`); Tune trials leave it None: ASHA counts every report as an iteration.
    `init_weights` starts the model from a parent's weights instead of `train.seed`'s.
    """

    model: ModelConfig
    train: TrainConfig
    data: TrainingData
    epochs: int
    epoch_logger: EpochLogger | None = None
    checkpoint_every: CheckpointInterval | None = None
    cpus_per_worker: float = 1.0  # the worker's torch threads follow its CPUs
    # A continued run's starting weights (`train.init_from`): an object-store ref to the parent's state
    # dict, put once by the driver and read by every worker, whichever node it is on.
    init_weights: ray.ObjectRef | None = None


class _TorchTrainer(ray.train.torch.TorchTrainer):
    """Ray's TorchTrainer without its Ctrl-C handler. In the main thread `fit()` replaces SIGINT's handler
    with one that aborts the run and ends the process (exit status 1, no message) and leaves it installed
    after `fit()`. Without it Ctrl-C raises KeyboardInterrupt where the driver waits, and the stage stops
    as every stage does: one line, exit 130, previous outputs kept; the controller and its workers end
    with the driver's Ray session."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None

    def fit(self) -> ray.train.Result:
        _autoscaling_coordinator_started()
        return super().fit()


# Far above the seconds a new actor takes on a loaded machine; a run that cannot start one fails later anyway.
COORDINATOR_START_TIMEOUT_S = 120.0


def _autoscaling_coordinator_started() -> None:
    """Start the cluster's resource-request actor before Train's controller asks it for the workers' CPUs.
    The controller waits 5 s for its answer; a first request that has to start the actor on a loaded
    machine takes longer, and Ray prints a traceback (a warning, but the run's output has it). The actor
    is detached and named: every later run, trial and Ray Data job of the cluster uses this one. (Ray
    internals: if they move, only this head start is lost.)"""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.__ray_ready__.remote(), timeout=COORDINATOR_START_TIMEOUT_S)


def build_trainer(
    loop: WorkerConfig,
    runtime: RuntimeConfig,
    run_name: str,
    storage_path: str,
    callbacks: list | None = None,
) -> ray.train.torch.TorchTrainer:
    return _TorchTrainer(
        train_worker,
        train_loop_config={LOOP_KEY: loop},  # Ray Train hands the worker a dict: one key, the typed loop
        scaling_config=ray.train.ScalingConfig(
            num_workers=runtime.num_workers,
            use_gpu=runtime.use_gpu,
            resources_per_worker=worker_resources(runtime),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            # A worker group that does not start within runtime.worker_start_timeout_s fails the run at once
            # (Ray would retry it forever: `Error count: N (max allowed: inf)`).
            failure_config=ray.train.FailureConfig(
                max_failures=runtime.max_failures, controller_failure_limit=0
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=runtime.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            callbacks=callbacks or [],
        ),
    )
