"""benchmarks/continued_training.py --workdir: a parent trained in the working folder is used again only when
the recipe, the data and the parent's epochs are the ones it was trained with, and the parent's corpus is the
first half of the training pairs."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from benchmarks.continued_training import PARENT_RECORD, earlier_parent, first_half, parent_identity
from pipeline.files import write_json


def _recipe(folder: Path, text: str = "train:\n  epochs: 10\n") -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    return recipe


def test_a_folder_without_a_finished_parent_has_none_to_use(tmp_path: Path) -> None:
    identity = parent_identity(_recipe(tmp_path), tmp_path, 20)
    (tmp_path / "parent" / "runs").mkdir(parents=True)  # a parent stopped half-way writes no record
    assert earlier_parent(tmp_path, identity) is None


def test_the_parent_of_the_same_recipe_data_and_epochs_is_used_again(tmp_path: Path) -> None:
    identity = parent_identity(_recipe(tmp_path), tmp_path, 20)
    record = {"identity": identity, "commit": "0" * 40, "result": {"run": "parent", "bleu_lc": 32.0}}
    write_json(tmp_path / PARENT_RECORD, record)
    assert earlier_parent(tmp_path, parent_identity(tmp_path / "recipe.yaml", tmp_path, 20)) == record


@pytest.mark.parametrize("change", ["recipe", "epochs", "data"])
def test_a_parent_trained_otherwise_is_refused_with_one_line_naming_both(tmp_path: Path, change: str) -> None:
    recipe = _recipe(tmp_path)
    write_json(
        tmp_path / PARENT_RECORD,
        {"identity": parent_identity(recipe, tmp_path, 20), "commit": "0" * 40, "result": {}},
    )
    data, epochs = tmp_path, 20
    if change == "recipe":
        _recipe(tmp_path, "train:\n  epochs: 12\n")
    elif change == "epochs":
        epochs = None
    else:
        data = tmp_path / "other"
        data.mkdir()
    wanted = parent_identity(recipe, data, epochs)
    with pytest.raises(SystemExit) as refused:
        earlier_parent(tmp_path, wanted)
    message = str(refused.value)
    assert "\n" not in message
    assert str(tmp_path) in message and str(wanted) in message and "--workdir" in message


def test_the_parents_corpus_is_the_first_half_of_the_training_pairs(tmp_path: Path) -> None:
    data = tmp_path / "multi30k"
    data.mkdir()
    for language in ("de", "en"):
        with gzip.open(data / f"train.{language}.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(f"{language} {i}\n" for i in range(7))
        (data / f"val.{language}.gz").write_bytes(b"kept as it is")
    assert first_half(data, tmp_path / "half") == 3
    for language in ("de", "en"):
        with gzip.open(tmp_path / "half" / f"train.{language}.gz", "rt", encoding="utf-8") as handle:
            assert handle.readlines() == [f"{language} {i}\n" for i in range(3)]
        validation = tmp_path / "half" / f"val.{language}.gz"
        assert validation.is_symlink() and validation.read_bytes() == b"kept as it is"
