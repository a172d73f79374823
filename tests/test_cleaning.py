"""Cleaning policy: normalisation, filters, de-duplication, seeded splits, statistics."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SPLITS, DataConfig
from pipeline.data import arrow_text, cleaning
from pipeline.data.arrow_text import read_texts
from pipeline.data.cleaning import PreparedCorpus, carve_assignment, length_percentiles
from pipeline.data.sources import RawCorpus, RawSplit
from pipeline.errors import PipelineError
from pipeline.network.tokenization import clean_text


def corpus_of(**splits: list[tuple[str, str]]) -> RawCorpus:
    # Generators, as the real sources give: each split can be read once.
    return RawCorpus(
        "test", "de", "en", {name: RawSplit(iter(pairs), f"{name}-file") for name, pairs in splits.items()}
    )


class Cleaned:
    """What `clean_corpus` wrote, read back."""

    def __init__(self, corpus: RawCorpus, config: DataConfig, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.result: PreparedCorpus = cleaning.clean_corpus(corpus, config, folder)
        self.files = sorted(path.name for path in folder.iterdir())
        self.splits = {name: list(zip(*read_texts(folder / f"{name}.arrow"), strict=True)) for name in SPLITS}
        self.dropped, self.carved = self.result.dropped, self.result.carved


def clean_corpus(corpus: RawCorpus, config: DataConfig, folder: Path) -> Cleaned:
    return Cleaned(corpus, config, folder)


def numbered(n: int) -> list[tuple[str, str]]:
    return [(f"satz {i}", f"sentence {i}") for i in range(n)]


def test_clean_text_composes_unicode_to_nfc():
    decomposed = "Cafe\u0301 Mu\u0308ller"
    assert clean_text(decomposed) == "Caf\u00e9 M\u00fcller"


def test_clean_text_collapses_whitespace_and_strips_control_characters():
    assert clean_text("  ein\t\tHaus \u00a0 am\u3000See \n") == "ein Haus am See"
    assert clean_text("\ufeffNull\x00byte und\x1b Escape\x7f") == "Nullbyte und Escape"


def test_every_split_is_normalised_and_loses_empty_pairs(tmp_path):
    corpus = corpus_of(train=[*numbered(5), (" ", "x")], test=[("Cafe\u0301 ", " cafe\u0301"), ("", "y")])
    prepared = clean_corpus(corpus, DataConfig(validation_fraction=0.2), tmp_path)
    assert prepared.splits["test"] == [("Caf\u00e9", "caf\u00e9")]
    assert prepared.dropped["test"] == {"empty": 1}  # the only filter an evaluation split gets
    assert prepared.dropped["train"]["empty"] == 1


def test_length_filters_apply_to_training_pairs_only(tmp_path):
    long_pair = (" ".join(["w"] * 9), " ".join(["w"] * 9))
    lopsided = ("a", "a b c d e")
    corpus = corpus_of(
        train=[*numbered(4), long_pair, lopsided], validation=[long_pair, lopsided], test=numbered(1)
    )
    prepared = clean_corpus(corpus, DataConfig(max_tokens=8, max_length_ratio=4.0), tmp_path)
    assert prepared.dropped["train"]["too_long"] == 1
    assert prepared.dropped["train"]["length_ratio"] == 1
    assert prepared.splits["validation"] == [long_pair, lopsided]


def test_duplicates_and_evaluation_overlap_are_dropped_from_train_only(tmp_path):
    test = [("satz 0", "sentence 0"), ("satz 0", "sentence 0")]
    corpus = corpus_of(train=[*numbered(4), ("satz  1", "sentence 1")], validation=[("v", "v")], test=test)
    prepared = clean_corpus(corpus, DataConfig(), tmp_path)
    assert prepared.splits["train"] == numbered(4)[1:]
    assert prepared.dropped["train"]["duplicate"] == 1  # "satz  1" equals "satz 1" once cleaned
    assert prepared.dropped["train"]["in_eval_split"] == 1
    assert prepared.splits["test"] == test  # evaluation splits are kept whole


def test_missing_splits_are_carved_deterministically_from_the_seed(tmp_path):
    config = DataConfig(validation_fraction=0.1, test_fraction=0.2, seed=7)
    first = clean_corpus(corpus_of(train=numbered(100)), config, tmp_path / "first")
    again = clean_corpus(corpus_of(train=numbered(100)), config, tmp_path / "again")
    other = clean_corpus(
        corpus_of(train=numbered(100)), config.model_copy(update={"seed": 8}), tmp_path / "other"
    )
    assert first.splits == again.splits
    assert first.splits["test"] != other.splits["test"]
    assert [len(first.splits[name]) for name in ("train", "validation", "test")] == [70, 10, 20]
    assert first.carved == ("validation", "test")
    every = [pair for pairs in first.splits.values() for pair in pairs]
    assert sorted(every) == sorted(numbered(100))  # a partition: nothing lost, nothing shared
    assert first.splits["train"] == sorted(first.splits["train"], key=numbered(100).index)  # order kept


def test_only_the_missing_split_is_carved(tmp_path):
    prepared = clean_corpus(
        corpus_of(train=numbered(20), validation=[("v", "v")]), DataConfig(test_fraction=0.1), tmp_path
    )
    assert prepared.carved == ("test",)
    assert prepared.splits["validation"] == [("v", "v")]
    assert len(prepared.splits["test"]) == 2


def test_split_empty_after_filtering_names_split_and_reasons(tmp_path):
    corpus = corpus_of(train=[("", "x"), ("a", "a b c d e f"), ("a", "a")], test=[("a", "a")])
    with pytest.raises(PipelineError) as error:
        clean_corpus(corpus, DataConfig(), tmp_path)
    message = str(error.value)
    assert "train split is empty after cleaning" in message
    assert "3 pairs loaded from train-file" in message
    assert "empty=1, length_ratio=1, in_eval_split=1" in message


def test_too_few_pairs_to_carve_is_refused():
    with pytest.raises(PipelineError, match=r"only 2 training pairs remain"):
        carve_assignment(2, ("validation", "test"), DataConfig())


def test_tiny_carved_splits_are_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Three pairs split 1/1/1 is legal, but a score on one sentence is noise: the user should hear so."""
    with caplog.at_level("WARNING", logger="pipeline.data.cleaning"):
        assignment = carve_assignment(3, ("validation", "test"), DataConfig())
    assert sorted(np.bincount(assignment).tolist()) == [1, 1, 1]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "carved 1 validation pair(s) (data.validation_fraction=0.05) and 1 test pair(s)" in warning
    assert "out of 3 training pairs" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.data.cleaning"):
        carve_assignment(cleaning.MIN_CARVED_PAIRS * 20, ("validation", "test"), DataConfig())
    assert not caplog.records, "splits of MIN_CARVED_PAIRS pairs and more are not tiny"


def test_length_percentiles_use_nearest_rank():
    assert length_percentiles(np.arange(1, 101)) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert length_percentiles(np.zeros(0)) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_results_do_not_depend_on_the_batch_size(tmp_path, monkeypatch):
    """Batches bound memory; de-duplication, overlap and carving still see the whole corpus."""
    pairs = [*numbered(30), *numbered(30)[::3], ("satz 7", "sentence 7")]  # duplicates across batches
    corpus_args = {"train": pairs, "test": [("satz 29", "sentence 29"), ("t", "t")]}
    config = DataConfig(validation_fraction=0.2)
    whole = clean_corpus(corpus_of(**corpus_args), config, tmp_path / "whole")
    for module in (cleaning, arrow_text):
        monkeypatch.setattr(module, "BATCH_ROWS", 4)
    batched = clean_corpus(corpus_of(**corpus_args), config, tmp_path / "batched")
    assert batched.splits == whole.splits
    assert batched.result == whole.result
    assert whole.dropped["train"]["duplicate"] == 11 and whole.dropped["train"]["in_eval_split"] == 1
    assert whole.files == batched.files == ["test.arrow", "train.arrow", "validation.arrow"]


def test_a_bad_line_mid_stream_propagates_after_closing_the_files(tmp_path):
    def failing() -> itertools.chain:
        def boom():
            raise PipelineError("corpus.de:5: invalid UTF-8")
            yield

        return itertools.chain(numbered(4), boom())

    corpus = RawCorpus("test", "de", "en", {"train": RawSplit(failing(), "train-file")})
    with pytest.raises(PipelineError, match="corpus.de:5"):
        cleaning.clean_corpus(corpus, DataConfig(), tmp_path)
