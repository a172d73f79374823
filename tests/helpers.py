"""Shared test helpers: where the project and the real Multi30k data are, small real projects on disk
(params written, stages run, the data stages on either engine), a random model folder on a project's
tokenizers, `translate` on stdin in-process, a working directory or a torch thread count for a while. The
fixtures built on them are in conftest.py; the toy models in seq2seq_toys.py. Test modules import only
these, never each other."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import pytest

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


def write_pair_files(folder: Path, pairs: list[tuple[str, str]]) -> None:
    """`folder`/train.en and train.art, one side of each (source, target) pair a line: a corpus folder of
    the built-in generator's English-to-"art" pairs, for `data.source: corpus/...`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.en").write_text("".join(f"{source}\n" for source, _ in pairs), encoding="utf-8")
    (folder / "train.art").write_text("".join(f"{target}\n" for _, target in pairs), encoding="utf-8")


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


# The data stages' outputs: what the two data engines must write byte for byte alike.
DATA_OUTPUTS = (
    "data/prepared",
    "data/processed",
    "reports/prepare_stats.json",
    "reports/prepare_metrics.json",
)


def run_data_stages(project: Path, source: str, engine: str) -> None:
    """prepare and preprocess of TINY_PARAMS on `source` with data.engine `engine`, in `project`."""
    from pipeline.params_file import load_config
    from pipeline.stages import prepare, preprocess

    project.mkdir(exist_ok=True)
    write_params(project, deep_merge(TINY_PARAMS, {"data": {"source": source, "engine": engine}}))
    with working_directory(project):
        config = load_config("params.yaml")
        prepare.run(config)
        preprocess.run(config)


def different_files(a: Path, b: Path) -> list[str]:
    """Paths under DATA_OUTPUTS whose bytes differ between projects a and b (or exist in one only)."""
    names = {
        path.relative_to(root)
        for root in (a, b)
        for output in DATA_OUTPUTS
        for path in ([root / output] if (root / output).is_file() else (root / output).rglob("*"))
        if path.is_file()
    }
    return sorted(
        str(n) for n in names if not ((a / n).is_file() and (a / n).read_bytes() == (b / n).read_bytes())
    )


def random_model_dir(processed: Path, folder: Path) -> Path:
    """A randomly initialised small GRU with attention on `processed`'s tokenizers, as a model folder."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.network.model import build_model
    from pipeline.network.model_files import save_model_dir
    from pipeline.network.tokenization import load_tokenizer

    src = load_tokenizer(processed / "src_tokenizer.json")
    tgt = load_tokenizer(processed / "tgt_tokenizer.json")
    config = ModelConfig(arch="gru_attention", emb_dim=64, hidden_dim=96, n_layers=1)
    torch.manual_seed(0)
    model = build_model(config, src.get_vocab_size(), tgt.get_vocab_size()).eval()
    decoding = {"beam_size": 1, "length_penalty": 1.0, "max_len_ratio": 1.5}
    save_model_dir(folder, model, config, src, tgt, decoding)
    return folder


def stdin_translation(
    model: Path, text: bytes, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """`translate` of `text` on stdin, in this process (25 sentences a batch): what batch translation must
    equal."""
    from pipeline.__main__ import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))
    assert main(["-q", "translate", "--model", str(model), "--max-sentences", "25"]) == 0
    return capsys.readouterr().out


# Resets SIGINT to its default, then becomes the command. A process started in the background by a shell
# without job control (`cmd &` in a script, a CI runner) ignores SIGINT, and its children inherit that:
# Python then installs no KeyboardInterrupt handler, and a test's Ctrl-C would reach nothing.
_DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " os.execv(sys.argv[1], sys.argv[1:])"
)


def pipeline_command(*arguments: str) -> list[str]:
    """`python -m pipeline ARGUMENTS` as a process that Ctrl-C (SIGINT) reaches as it reaches one started
    from a terminal, whatever this process inherited."""
    return [sys.executable, "-c", _DEFAULT_SIGINT_EXEC, sys.executable, "-m", "pipeline", *arguments]


def joining_ray_env() -> dict[str, str]:
    """The environment of a `python -m pipeline` subprocess that joins this process's Ray (RAY_ADDRESS), as
    a stage in a Ray job joins the job's cluster, and imports the project from this checkout."""
    import ray

    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
