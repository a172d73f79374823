"""The TorchTrainer that runs `worker.train_worker`, and what it ships to every worker.

Knows Ray Train, not Tune: Tune wraps `build_trainer` (see tuning.py). Data travels as object-store
references to `EncodedSplit`s, so workers on any node read it without the driver's disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch

from pipeline.config import ModelConfig, RuntimeConfig, TrainConfig
from pipeline.data.processed import ProcessedData
from pipeline.network.encoded import EncodedSplit
from pipeline.training.resources import worker_resources
from pipeline.training.worker import train_worker


@dataclass(frozen=True)
class TrainingData:
    """What every worker needs, as object refs plus the small things inline."""

    train_ref: ray.ObjectRef
    validation_ref: ray.ObjectRef
    src_vocab_size: int
    tgt_vocab_size: int
    tgt_tokenizer_json: str


class EpochLogger(Protocol):
    """Where rank 0 sends each epoch's metrics (the tracking layer's MLflow logger; this layer knows
    only the shape). It must pickle: it travels to the workers inside the loop config."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...


def put_training_data(processed: ProcessedData, max_examples: int | None = None) -> TrainingData:
    """Ship the train (first `max_examples` pairs) and validation splits to the object store."""
    train, validation = processed.splits["train"], processed.splits["validation"]
    limit = max_examples or len(train.src_ids)
    return TrainingData(
        ray.put(EncodedSplit.from_lists(train.src_ids[:limit], train.tgt_ids[:limit])),
        ray.put(EncodedSplit.from_lists(validation.src_ids, validation.tgt_ids)),
        processed.src_vocab_size,
        processed.tgt_vocab_size,
        processed.tgt_tokenizer.to_str(),
    )


def train_loop_config(
    model: ModelConfig,
    train: TrainConfig,
    data: TrainingData,
    epochs: int,
    epoch_logger: EpochLogger | None = None,
) -> dict[str, Any]:
    """The dict each worker receives; rank 0 logs every epoch to `epoch_logger` when there is one."""
    return {
        "model": model.model_dump(),
        "train": train.model_dump(),
        "data": data,
        "epochs": epochs,
        "epoch_logger": epoch_logger,
    }


def build_trainer(
    loop_config: dict[str, Any],
    train: TrainConfig,
    runtime: RuntimeConfig,
    run_name: str,
    storage_path: str,
    callbacks: list | None = None,
) -> ray.train.torch.TorchTrainer:
    return ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=worker_resources(train)
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=runtime.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            callbacks=callbacks or [],
        ),
    )
