"""Continued training (`train.init_from`): the parent model a train run starts from, read from its folder,
and the checks that it fits params.yaml's model section and data/processed, made before Ray starts.

The run's network is the parent's (its model_config.json), with params.yaml's dropout: every other model key
shapes the weights or what they compute, so a disagreement stops the stage instead of being settled in
either direction without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from pipeline.config import ModelConfig
from pipeline.data.processed import ProcessedData
from pipeline.errors import PipelineError
from pipeline.files import file_sha256
from pipeline.network.model import settings_in_use
from pipeline.network.model_files import WEIGHTS_FILE, load_model_dir

# Model keys that may differ from the parent's: they change how it trains, not its weights.
FREE_MODEL_KEYS = ("dropout",)


@dataclass(frozen=True)
class ParentModel:
    """What a continued run takes from its parent: architecture, vocabularies and weights."""

    source: str  # train.init_from as params.yaml gives it
    model_config: ModelConfig
    vocab_sizes: tuple[int, int]  # source, target: the rows of its embeddings
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]  # the full state dict (tied names included), on the CPU
    weights_sha256: str  # of its model.safetensors


def read_parent(folder: Path, source: str) -> ParentModel:
    """The parent model in `folder` (checked as `load_model_dir` checks any model folder)."""
    loaded = load_model_dir(folder)
    model = loaded.model
    return ParentModel(
        source=source,
        model_config=loaded.model_config,
        vocab_sizes=(model.src_vocab_size, model.tgt_vocab_size),
        src_tokenizer=loaded.src_tokenizer,
        tgt_tokenizer=loaded.tgt_tokenizer,
        weights={key: value.detach().cpu() for key, value in model.state_dict().items()},
        weights_sha256=file_sha256(Path(folder) / WEIGHTS_FILE).hex(),
    )


def architecture_mismatch(parent: ModelConfig, params: ModelConfig) -> list[tuple[str, object, object]]:
    """(key, parent's value, params.yaml's value) for each model key that the architectures read and that
    differ; the keys neither architecture reads do not count (a GRU has no heads)."""
    parent_keys = settings_in_use(parent.model_dump())
    params_keys = settings_in_use(params.model_dump())
    keys = [key for key in ModelConfig.model_fields if key in parent_keys or key in params_keys]
    return [
        (key, getattr(parent, key), getattr(params, key))
        for key in keys
        if key not in FREE_MODEL_KEYS and getattr(parent, key) != getattr(params, key)
    ]


def check_architecture(parent: ParentModel, params: ModelConfig) -> None:
    """One error naming every model key on which params.yaml and the parent disagree, with both values."""
    differences = architecture_mismatch(parent.model_config, params)
    if differences:
        listed = "; ".join(
            f"model.{key} {parent_value!r}, params.yaml has {params_value!r}"
            for key, parent_value, params_value in differences
        )
        raise PipelineError(
            f"train.init_from {parent.source} has {listed}: set these model keys to the parent's values"
        )


def continued_model_config(parent: ParentModel, params: ModelConfig) -> ModelConfig:
    """The network a continued run trains: the parent's, with params.yaml's dropout."""
    return parent.model_config.model_copy(update={key: getattr(params, key) for key in FREE_MODEL_KEYS})


def check_processed_tokenizers(parent: ParentModel, processed: ProcessedData, processed_dir: Path) -> None:
    """data/processed must hold ids of the parent's own tokenizers: other ids would index other rows of its
    embeddings (or none), and training would quietly unlearn the parent."""
    sides = (
        ("source", processed.src_vocab_size, processed.src_tokenizer, parent.src_tokenizer),
        ("target", processed.tgt_vocab_size, processed.tgt_tokenizer, parent.tgt_tokenizer),
    )
    for (side, size, tokenizer, parent_tokenizer), parent_size in zip(sides, parent.vocab_sizes, strict=True):
        if size != parent_size:
            reason = f"its {side} vocabulary has {size} tokens, the parent's embeddings {parent_size}"
        elif tokenizer.to_str() != parent_tokenizer.to_str():
            reason = f"its {side} tokenizer differs from the parent's"
        else:
            continue
        raise PipelineError(
            f"{processed_dir} was not encoded with the tokenizers of train.init_from {parent.source}"
            f" ({reason}): re-run preprocess with train.init_from set"
        )
