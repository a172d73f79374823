"""Shared test helpers: where the project and the real Multi30k data are, small real projects on disk
(params written, stages run), a working directory or a torch thread count for a while. The fixtures
built on them are in conftest.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTI30K = REPO_ROOT.parent / "shared" / "data" / "multi30k"


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    from pipeline.params_file import merge_params

    return merge_params(base, overrides, "test overrides")


def write_params(directory: Path, overrides: dict[str, Any]) -> Path:
    """The project's own params.yaml with `overrides` merged in, written to directory/params.yaml."""
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False))
    return path


# Small enough for CI, large enough that a tiny model visibly learns.
TINY_PARAMS: dict[str, Any] = {
    "data": {"builtin": {"n_pairs": 1500}},
    "preprocess": {"vocab_size": 400},
    "model": {"emb_dim": 32, "hidden_dim": 48},
    "train": {"epochs": 2, "batch_size": 3000, "val_bleu_sentences": 20, "lr": 0.005},
    "tune": {"num_samples": 0},
    "evaluate": {"beam_size": 2},
}


def prepare_project(directory: Path, overrides: dict[str, Any] | None = None):
    """Run the real prepare and preprocess stages in `directory`; returns the config."""
    from pipeline.params_file import load_config
    from pipeline.stages import prepare, preprocess

    write_params(directory, deep_merge(TINY_PARAMS, overrides or {}))
    with working_directory(directory):
        config = load_config("params.yaml")
        prepare.run(config)
        preprocess.run(config)
    return config


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """`count` intra-op torch threads for a while. For the tests' tiny models one thread is fastest: on two
    cores shared with other processes, two threads spin against each other (a tiny GRU step went from
    0.06 s to over 1 s)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
