"""Continued training (`train.init_from`), without Ray: the worker's model starts from the parent's weights,
the stages' checks before any work (architecture, tokenizers, a missing or unpinned parent, a search),
set-params pinning an alias in a real SQLite MLflow store, preprocess keeping the parent's vocabulary, and
the lineage a continued model is registered with.

The parent is a real model folder (`random_model_dir`) on the tokenizers of a real prepared and
preprocessed builtin corpus.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.errors import PipelineError
from tests.helpers import TINY_PARAMS, deep_merge, prepare_project, random_model_dir, write_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_NAME = "continued-translator"
# random_model_dir's architecture; params.yaml must name it to continue from that folder.
PARENT_MODEL = {"arch": "gru_attention", "emb_dim": 64, "hidden_dim": 96, "n_layers": 1}
CONTINUED = {
    "model": {**PARENT_MODEL, "dropout": 0.0},  # the parent has 0.1: dropout may differ
    "runtime": {"num_workers": 1},
}


@dataclass(frozen=True)
class Workspace:
    project: Path  # prepared and preprocessed with TINY_PARAMS
    parent: Path  # a model folder on the project's tokenizers
    other_processed: Path  # data/processed of the same corpus with another vocabulary size


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    base = tmp_path_factory.mktemp("continued")
    for name in ("a", "b"):
        (base / name).mkdir()
    prepare_project(base / "a")
    prepare_project(base / "b", {"preprocess": {"vocab_size": 300}})
    parent = random_model_dir(base / "a" / "data" / "processed", base / "parent")
    return Workspace(base / "a", parent, base / "b" / "data" / "processed")


def _project(tmp_path: Path, workspace: Workspace, overrides: dict[str, Any], processed: Path | None = None):
    """A project in tmp_path with the workspace's data and params.yaml of TINY_PARAMS + `overrides`."""
    from pipeline.params_file import load_config

    shutil.copytree(workspace.project / "data" / "prepared", tmp_path / "data" / "prepared")
    shutil.copytree(processed or workspace.project / "data" / "processed", tmp_path / "data" / "processed")
    write_params(tmp_path, deep_merge(TINY_PARAMS, overrides))
    return load_config(tmp_path / "params.yaml")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _registered_store(parent: Path) -> None:
    """Version 1 of MODEL_NAME, alias `champion`, in the store MLFLOW_TRACKING_URI names."""
    from pipeline.tracking.store import mlflow_client

    client = mlflow_client()
    client.create_registered_model(MODEL_NAME)
    client.create_model_version(MODEL_NAME, source=str(parent))
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")


def _loss(model: torch.nn.Module, processed: Path) -> torch.Tensor:
    """Cross-entropy of a batch of the training split, with gradients on."""
    import numpy as np

    from pipeline.data.processed import load_processed
    from pipeline.network.batching import collate

    split = load_processed(processed, splits=("train",)).encoded("train")
    batch = collate(split, np.arange(16))
    model.eval()  # no dropout draws: the same function of the weights on both sides
    logits = model(batch.src, batch.src_lengths, batch.tgt_in)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=0
    )


# ----------------------------------------------------------------------------------------------- the weights


def test_the_worker_builds_the_parent_model_and_its_loss_is_the_parents(
    workspace: Workspace, tmp_path: Path
) -> None:
    from pipeline.network.model_files import load_model_dir
    from pipeline.training.parent import check_architecture, continued_model_config, read_parent
    from pipeline.training.trainer import SplitHandle, TrainingData, WorkerConfig
    from pipeline.training.worker import seeded_model

    # random_model_dir seeds 0: another seed makes the worker's own initial weights differ from the parent's.
    train = {"init_from": str(workspace.parent), "seed": 1}
    config = _project(tmp_path, workspace, {**CONTINUED, "train": train})
    parent = read_parent(workspace.parent, str(workspace.parent))
    check_architecture(parent, config.model)
    model_config = continued_model_config(parent, config.model)
    assert model_config.dropout == 0.0 and parent.model_config.dropout == 0.1, "params.yaml's dropout"
    unused = SplitHandle("unused", "driver")
    data = TrainingData(unused, unused, *parent.vocab_sizes, "", ())
    loop = WorkerConfig(model_config, config.train, data, epochs=1)

    continued = seeded_model(loop, 0, parent.weights)
    from_scratch = seeded_model(loop, 0)

    processed = tmp_path / "data" / "processed"
    expected = _loss(load_model_dir(workspace.parent).model, processed)
    loss = _loss(continued, processed)
    assert loss.requires_grad
    assert torch.allclose(loss, expected, rtol=0, atol=1e-6), (loss.item(), expected.item())
    # Untrained, both losses are near ln(vocabulary size): apart by far more than rounding, not by much.
    assert abs(_loss(from_scratch, processed).item() - expected.item()) > 1e-5
    loss.backward()
    assert all(p.grad is not None for p in continued.parameters() if p.requires_grad)


def test_a_model_section_unlike_the_parents_is_one_error_naming_every_key_and_both_values(
    workspace: Workspace, tmp_path: Path
) -> None:
    from pipeline.training.parent import check_architecture, read_parent

    parent = read_parent(workspace.parent, "models:/seq2seq-translator/3")
    config = _project(tmp_path, workspace, {"model": {**PARENT_MODEL, "emb_dim": 32, "hidden_dim": 128}})
    with pytest.raises(PipelineError) as raised:
        check_architecture(parent, config.model)
    assert str(raised.value) == (
        "train.init_from models:/seq2seq-translator/3 has model.emb_dim 64, params.yaml has 32;"
        " model.hidden_dim 96, params.yaml has 128: set these model keys to the parent's values"
    )
    # A key its architecture does not read (a GRU has no heads) and dropout may differ.
    check_architecture(parent, config.model.model_copy(update={**PARENT_MODEL, "n_heads": 8, "dropout": 0.3}))


def test_the_train_stage_refuses_data_not_encoded_with_the_parents_tokenizers_before_ray(
    workspace: Workspace, in_tmp: Path
) -> None:
    from pipeline.stages import train

    overrides = {**CONTINUED, "train": {"init_from": str(workspace.parent)}}
    config = _project(in_tmp, workspace, overrides, processed=workspace.other_processed)
    with pytest.raises(PipelineError) as raised:
        train.run(config)
    message = str(raised.value)
    assert message.startswith(
        f"data/processed was not encoded with the tokenizers of train.init_from {workspace.parent}"
    )
    assert "its source vocabulary has" in message
    assert message.endswith("re-run preprocess with train.init_from set")
    assert not (in_tmp / "models").exists() and not (in_tmp / "runs").exists()


def test_the_train_stage_refuses_a_model_section_unlike_the_parents_before_ray(
    workspace: Workspace, in_tmp: Path
) -> None:
    from pipeline.stages import train

    overrides = {"model": {"hidden_dim": 48}, "runtime": {"num_workers": 1}}
    config = _project(in_tmp, workspace, {**overrides, "train": {"init_from": str(workspace.parent)}})
    with pytest.raises(PipelineError, match=r"model\.emb_dim 64, params\.yaml has 32; model\.hidden_dim 96"):
        train.run(config)


# --------------------------------------------------------------------------- the registry: missing, pinning


def test_a_missing_registered_version_or_alias_is_one_error_naming_the_key_and_the_store(
    workspace: Workspace, in_tmp: Path
) -> None:
    from pipeline.stages import preprocess, train
    from pipeline.tracking.parent import resolve_version

    _registered_store(workspace.parent)
    assert resolve_version(f"models:/{MODEL_NAME}@champion") == "1"
    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    for value, what in (
        (f"models:/{MODEL_NAME}/99", "version 99"),
        (f"models:/{MODEL_NAME}@nobody", "alias @nobody"),
        ("models:/no-such-model/1", "version 1"),
    ):
        with pytest.raises(PipelineError) as raised:
            resolve_version(value)
        message = str(raised.value)
        assert message.startswith(f"train.init_from {value!r}: the MLflow store {store} has no {what}")
        assert "\n" not in message
    # The stages stop with it before their work: preprocess before reading data/prepared, train before Ray.
    missing = f"models:/{MODEL_NAME}/99"
    config = _project(in_tmp, workspace, {**CONTINUED, "train": {"init_from": missing}})
    shutil.rmtree(in_tmp / "data" / "prepared")
    for stage in (preprocess, train):
        with pytest.raises(PipelineError, match=f"train.init_from '{missing}': the MLflow store"):
            stage.run(config)


def test_a_missing_or_incomplete_folder_is_one_error_naming_the_key(
    workspace: Workspace, in_tmp: Path
) -> None:
    from pipeline.tracking.parent import pin_init_from

    with pytest.raises(PipelineError, match=r"^train.init_from 'nowhere' is not a usable model folder: .*"):
        pin_init_from("nowhere")
    shutil.copytree(workspace.parent, in_tmp / "broken")
    (in_tmp / "broken" / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="missing model.safetensors"):
        pin_init_from(str(in_tmp / "broken"))


def test_set_params_pins_an_alias_to_its_version_and_a_stage_refuses_an_alias(
    workspace: Workspace, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main
    from pipeline.params_file import load_config
    from pipeline.stages import preprocess, train, tune

    _registered_store(workspace.parent)
    params = write_params(in_tmp, TINY_PARAMS)
    alias = f"models:/{MODEL_NAME}@champion"

    assert (
        main(["--params", str(params), "set-params", f"train.init_from={alias}", "tune.num_samples=0"]) == 0
    )

    assert capsys.readouterr().out == (
        f"train.init_from: {alias} is version 1; params.yaml pins models:/{MODEL_NAME}/1\n"
    )
    assert yaml.safe_load(params.read_text())["train"]["init_from"] == f"models:/{MODEL_NAME}/1"

    assert main(["--params", str(params), "set-params", f"train.init_from=models:/{MODEL_NAME}@gone"]) == 2
    assert "train.init_from 'models:/continued-translator@gone': the MLflow store" in capsys.readouterr().err
    assert yaml.safe_load(params.read_text())["train"]["init_from"] == f"models:/{MODEL_NAME}/1", "untouched"

    # An alias written by hand is refused by every stage that reads it, with the fix.
    params.write_text(params.read_text().replace(f"models:/{MODEL_NAME}/1", alias))
    config = load_config(params)
    for stage in (preprocess, tune, train):
        with pytest.raises(PipelineError) as raised:
            stage.run(config)
        assert str(raised.value) == (
            f"train.init_from '{alias}' is an alias, which can move: pin it to its version with"
            f" `python -m pipeline set-params train.init_from={alias}`"
        )


def test_init_from_takes_a_folder_or_the_two_registry_forms_only() -> None:
    from pipeline.params_file import config_from_dict

    for value in ("models/", "models:/name/3", "models:/name@champion", None):
        assert config_from_dict({"train": {"init_from": value}}).train.init_from == value
    for value in ("models:/name", "models:/name/latest", "models:/a/b/3", "models:/@champion"):
        with pytest.raises(PipelineError, match=r"train\.init_from: .*models:/<name>/<version> or"):
            config_from_dict({"train": {"init_from": value}})


# ------------------------------------------------------------------------------------ preprocess and tune


def test_preprocess_uses_the_parents_tokenizers_and_byte_fallback_keeps_an_unseen_character(
    workspace: Workspace, in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.network.tokenization import decode_ids, encode_texts, load_tokenizer
    from pipeline.stages import preprocess

    overrides = {"preprocess": {"vocab_size": 300}, "train": {"init_from": str(workspace.parent)}}
    config = _project(in_tmp, workspace, overrides)
    shutil.rmtree(in_tmp / "data" / "processed")
    with caplog.at_level(logging.INFO, logger="pipeline.stages.preprocess"):
        preprocess.run(config)

    processed = in_tmp / "data" / "processed"
    for name in ("src_tokenizer.json", "tgt_tokenizer.json"):
        assert (processed / name).read_bytes() == (workspace.parent / name).read_bytes(), name
    meta = json.loads((processed / "meta.json").read_text())
    assert meta["tokenizers_from"] == str(workspace.parent) and meta["tokenizer"] == "bpe"
    assert meta["src_vocab_size"] != 300, "preprocess.vocab_size is not used"
    assert "using the tokenizers of" in caplog.text and "vocab_size" in caplog.text

    tokenizer = load_tokenizer(processed / "src_tokenizer.json")
    unseen = "the dog sees a Zebra 🦓 ."
    assert decode_ids(tokenizer, encode_texts(tokenizer, [unseen])) == [unseen]


def test_tune_refuses_a_search_with_init_from(workspace: Workspace, in_tmp: Path) -> None:
    from pipeline.stages import tune

    config = _project(in_tmp, workspace, {"tune": {"num_samples": 4}, "train": {"init_from": "models:/m/3"}})
    with pytest.raises(PipelineError) as raised:
        tune.run(config)
    assert str(raised.value) == (
        "tune.num_samples is 4 with train.init_from set: set tune.num_samples: 0 to continue training with"
        " params.yaml's learning rate, or clear train.init_from"
    )
    assert not (in_tmp / "reports").exists()


# ------------------------------------------------------------------------------------- lineage and the gate


def test_a_continued_version_is_tagged_and_described_with_its_parent() -> None:
    from pipeline.tracking import lineage

    entry = lineage.parent_entry("models:/seq2seq-translator/3", "ab" * 32)
    assert entry == {
        "uri": "models:/seq2seq-translator/3",
        "name": "seq2seq-translator",
        "version": "3",
        "weights_sha256": "ab" * 32,
    }
    assert lineage.parent_run_tags(entry) == {
        "parent_model": "models:/seq2seq-translator/3",
        "parent_model_version": "3",
        "parent_model_weights_sha256": "ab" * 32,
    }
    assert lineage.parent_version_tags(entry) == {
        "parent_model_name": "seq2seq-translator",
        "parent_model_version": "3",
        "parent_model_weights_sha256": "ab" * 32,
    }
    assert lineage.parent_description(entry, "d41d8cd9.dir") == (
        "Continued from seq2seq-translator v3 on corpus d41d8cd9.dir."
    )
    folder = lineage.parent_entry("runs/champion-model", "cd" * 32)
    assert lineage.parent_version_tags(folder)["parent_model_folder"] == "runs/champion-model"
    assert "parent_model_version" not in lineage.parent_run_tags(folder)
    assert lineage.parent_description(folder, "x") == (
        "Continued from the model folder runs/champion-model (weights sha256 cdcdcdcdcdcd) on corpus x."
    )
    assert lineage.parent_version_tags(None) == {} and lineage.parent_description(None, "x") == ""


def test_the_register_candidate_carries_the_parent_into_tags_and_description(
    workspace: Workspace, in_tmp: Path
) -> None:
    from pipeline.params_file import config_from_dict
    from pipeline.tracking import candidate as candidates

    base = dict(
        model_dir=workspace.parent,
        content_hash="0" * 64,
        model_config=json.loads((workspace.parent / "model_config.json").read_text()),
        decoding={"beam_size": 1},
        metrics={"bleu": 1.0},
        train_run=None,
        best_epoch=None,
        test_sources=[],
        test_references=[],
        test_hash="1" * 64,
        lowercases=False,
    )
    config = config_from_dict({})
    scratch = candidates.Candidate(**base)
    continued = candidates.Candidate(**base, parent=dict(name="seq2seq-translator", version="3", uri="x"))
    assert not any(key.startswith("parent_") for key in candidates.version_tags(config, scratch))
    assert "Continued" not in candidates.version_description(config, scratch)
    tags = candidates.version_tags(config, continued)
    assert (tags["parent_model_name"], tags["parent_model_version"]) == ("seq2seq-translator", "3")
    assert "Continued from seq2seq-translator v3 on corpus unknown." in candidates.version_description(
        config, continued
    )


def test_the_gate_warns_that_a_rescored_champions_earlier_figures_are_not_comparable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.tracking import gate

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.gate"):
        gate.decide("4", 30.0, gate.ChampionScore("3", 28.0, rescored=False), 0.0)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.gate"):
        decision = gate.decide("4", 30.0, gate.ChampionScore("3", 28.0, rescored=True), 0.0)
    assert decision.promote and "re-scored on the current test split" in decision.reason
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "the test split changed since champion version 3 was scored: its earlier figures are not comparable"
        " with version 4's; the gate compares its re-score on the current split"
    )
