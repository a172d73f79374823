"""The preprocess stage: tokenizers trained on train only, every split encoded, data/processed read back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import PipelineConfig, PreprocessConfig
from pipeline.data import arrow_text
from pipeline.data.processed import ProcessedData, load_processed
from pipeline.errors import PipelineError
from pipeline.network.tokenization import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    clean_text,
    decode_ids,
    encode_texts,
    train_tokenizer,
)
from pipeline.params_file import config_from_dict
from pipeline.paths import PREPARED_DIR, PROCESSED_DIR
from pipeline.stages import prepare, preprocess

SOURCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee!", "Die Frau, die lacht, trinkt Kaffee."]
TARGETS = ["A man rides a bike.", "Two dogs play in the snow!", "The woman, who laughs, drinks coffee."]


@pytest.fixture(autouse=True)
def _in_tmp_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def tsv_corpus(folder: Path, test_rows: list[tuple[str, str]] | None = None) -> str:
    """A small de-en corpus; the test split may hold words the training split never shows."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = list(zip(SOURCES, TARGETS, strict=True))
    train = [(f"{s} Nummer {i}", f"{t} number {i}") for i in range(30) for s, t in pairs]
    validation = [("Ein Hund spielt.", "A dog plays.")]
    test = test_rows or [("Ein Mann trinkt Kaffee.", "A man drinks coffee.")]
    for name, rows in (("train", train), ("dev", validation), ("test", test)):
        lines = ["de\ten", *(f"{s}\t{t}" for s, t in rows)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def config(source: str, **preprocess_keys) -> PipelineConfig:
    return config_from_dict(
        {
            "data": {"source": source, "src_lang": "de", "tgt_lang": "en"},
            "preprocess": {"vocab_size": 300, **preprocess_keys},
        }
    )


def prepare_and_preprocess(cfg: PipelineConfig) -> None:
    prepare.run(cfg)
    preprocess.run(cfg)


def ids_of(processed: ProcessedData, split: str, side: str) -> list[list[int]]:
    encoded = processed.encoded(split)
    return [getattr(encoded, side)(i).tolist() for i in range(len(encoded))]


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_every_split_is_encoded_without_special_tokens_and_decodes_back(tmp_path, kind):
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus"), tokenizer=kind))
    processed = load_processed()
    assert len(processed.encoded("train")) == processed.pairs("train") == 90
    for name in ("train", "validation", "test"):
        for ids in (*ids_of(processed, name, "src"), *ids_of(processed, name, "tgt")):
            assert ids and not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    train_src, train_tgt = arrow_text.read_texts(PREPARED_DIR / "train.arrow")
    assert decode_ids(processed.src_tokenizer, ids_of(processed, "train", "src")) == train_src
    assert decode_ids(processed.tgt_tokenizer, ids_of(processed, "train", "tgt")) == train_tgt
    sources, references = processed.texts("test")
    assert decode_ids(processed.tgt_tokenizer, ids_of(processed, "test", "tgt")) == references
    assert len(sources) == processed.pairs("test") == 1
    # Flat, memory-mapped arrays in the narrowest dtype the vocabulary allows.
    encoded = processed.encoded("train")
    assert isinstance(encoded.src_ids, np.memmap) and encoded.src_ids.dtype == np.uint16
    assert processed.meta["id_dtype"] == "uint16"


def test_meta_records_languages_vocab_sizes_pairs_and_unk_rates(tmp_path):
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus"), tokenizer="word"))
    meta = json.loads((PROCESSED_DIR / "meta.json").read_text())
    processed = load_processed()
    assert meta["src_lang"] == "de" and meta["tgt_lang"] == "en"
    assert meta["tokenizer"] == "word" and meta["joint_vocab"] is False
    assert meta["src_vocab_size"] == processed.src_tokenizer.get_vocab_size() == processed.src_vocab_size
    assert meta["tgt_vocab_size"] == processed.tgt_tokenizer.get_vocab_size()
    assert meta["pairs"] == {"train": 90, "validation": 1, "test": 1}
    assert set(meta["unk_rate"]["test"]) == {"src", "tgt"}


def test_tokenizers_see_training_text_only(tmp_path):
    unseen = [("Ein Zebra trinkt Kaffee.", "A zebra drinks coffee.")]
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus", unseen), tokenizer="word"))
    processed = load_processed()
    meta = processed.meta
    assert meta["unk_rate"]["train"] == {"src": 0.0, "tgt": 0.0}
    assert meta["unk_rate"]["test"]["src"] > 0 and meta["unk_rate"]["test"]["tgt"] > 0
    assert UNK_ID in ids_of(processed, "test", "src")[0]


def test_joint_vocabulary_saves_one_tokenizer_under_both_names(tmp_path):
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus"), joint_vocab=True))
    src_file, tgt_file = PROCESSED_DIR / "src_tokenizer.json", PROCESSED_DIR / "tgt_tokenizer.json"
    assert src_file.read_bytes() == tgt_file.read_bytes()
    processed = load_processed()
    assert processed.meta["joint_vocab"] is True
    assert processed.src_vocab_size == processed.tgt_vocab_size
    # The source tokenizer knows target-side text too: that is what a joint vocabulary is for.
    assert UNK_ID not in processed.src_tokenizer.encode("Two dogs play", add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_tokenizer_round_trip_reproduces_cleaned_text(kind):
    raw = [
        "  Cafe\u0301 au lait,  s'il vous plaît ! ",
        "C'est l'été (2024) : 3,5 °C…",
        "«Oui» — dit-il.\tNon?",
    ]
    cleaned = [clean_text(text) for text in raw]
    tokenizer = train_tokenizer(cleaned, PreprocessConfig(tokenizer=kind, vocab_size=500))
    assert decode_ids(tokenizer, encode_texts(tokenizer, cleaned)) == cleaned


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_a_character_never_seen_in_training_survives_a_round_trip_with_byte_fallback(byte_fallback):
    """Trained on text without a capital Z or an emoji: with byte fallback they come back as they were,
    without it they become <unk> and vanish from the output."""
    training = ["der hund fährt schnell .", "ein kleiner hund läuft über die straße ."] * 20
    tokenizer = train_tokenizer(training, PreprocessConfig(vocab_size=120, byte_fallback=byte_fallback))
    unseen = "der hund fährt Zebra 🦓 ."
    ids = encode_texts(tokenizer, [unseen])
    assert (UNK_ID in ids[0]) is not byte_fallback
    assert (decode_ids(tokenizer, ids) == [unseen]) is byte_fallback


def test_missing_prepared_data_asks_for_prepare_and_writes_nothing():
    expected = r"data/prepared not found: run `python -m pipeline prepare` first"
    with pytest.raises(PipelineError, match=expected):
        preprocess.run(config("builtin"))
    assert not PROCESSED_DIR.exists()


def test_prepared_data_for_other_languages_is_refused_and_earlier_output_kept(tmp_path):
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus")))
    meta_before = (PROCESSED_DIR / "meta.json").read_text()
    prepare.run(config_from_dict({"data": {"builtin": {"n_pairs": 50}}}))  # en->art now
    with pytest.raises(PipelineError, match=r"holds en->art but params say de->en"):
        preprocess.run(config(tsv_corpus(tmp_path / "corpus")))
    assert (PROCESSED_DIR / "meta.json").read_text() == meta_before
    assert load_processed().pairs("train") == 90


def test_load_processed_reports_missing_and_incomplete_output(tmp_path):
    expected = r"data/processed not found: run `python -m pipeline preprocess` first"
    with pytest.raises(PipelineError, match=expected):
        load_processed()
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus")))
    shutil.rmtree(PROCESSED_DIR / "encoded")
    with pytest.raises(PipelineError, match=r"incomplete \(missing encoded\)"):
        load_processed()
    assert PREPARED_DIR.is_dir()


def test_tokenizer_sample_trains_on_a_seeded_subset_of_training_pairs(tmp_path):
    corpus = tsv_corpus(tmp_path / "corpus")
    prepare_and_preprocess(config(corpus, tokenizer="word", tokenizer_sample=2))
    sampled = load_processed()
    first_vocab = sampled.src_tokenizer.get_vocab()
    assert sampled.meta["tokenizer_sample"] == 2
    # Two pairs cannot show every training word: the rest of train is now partly unknown.
    assert sampled.meta["unk_rate"]["train"]["src"] > 0
    preprocess.run(config(corpus, tokenizer="word", tokenizer_sample=2))
    assert load_processed().src_tokenizer.get_vocab() == first_vocab, "the sample is seeded"
    preprocess.run(config(corpus, tokenizer="word", tokenizer_sample=10_000))  # more than train: all of it
    assert load_processed().meta["unk_rate"]["train"] == {"src": 0.0, "tgt": 0.0}


def test_encoding_does_not_depend_on_the_batch_size(tmp_path, monkeypatch):
    """Batches bound memory; the encoded arrays are the same bytes whatever their size."""
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus")))
    whole = {path.name: path.read_bytes() for path in (PROCESSED_DIR / "encoded" / "train").iterdir()}
    monkeypatch.setattr(arrow_text, "BATCH_ROWS", 7)
    prepare_and_preprocess(config(tsv_corpus(tmp_path / "corpus")))
    batched = {path.name: path.read_bytes() for path in (PROCESSED_DIR / "encoded" / "train").iterdir()}
    assert batched == whole


@pytest.mark.slow
def test_a_million_character_line_is_dropped_by_prepare_and_preprocess_stays_fast(tmp_path) -> None:
    """One whitespace-free "word" of 1M characters passes any token count; BPE training on it ran for
    over 10 minutes. data.max_chars drops it (its own reason in prepare_stats) before preprocess sees it."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, write_params

    folder = tmp_path / "corpus"
    folder.mkdir()
    english = [f"the house number {i} is red ." for i in range(200)]
    german = [f"das haus nummer {i} ist rot ." for i in range(200)]
    english[100], german[100] = "A" * 1_000_000, "data:" + "B" * 999_995
    (folder / "train.en").write_text("\n".join(english) + "\n")
    (folder / "train.de").write_text("\n".join(german) + "\n")
    data = {"source": str(folder), "src_lang": "en", "tgt_lang": "de"}
    write_params(tmp_path, {"data": data, "preprocess": {"vocab_size": 200}})
    for stage in ("prepare", "preprocess"):
        # A bound far above the seconds it takes, far below the hang it was: a regression fails, not hangs.
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", stage],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "reports" / "prepare_stats.json").read_text())
    assert stats["dropped"]["train"]["too_many_chars"] == 1
    assert load_processed(tmp_path / "data" / "processed").pairs("train") < 200


BAD_COLUMNS = {
    "other-columns": ([("en", pa.string()), ("de", pa.string())], {"en": ["a"], "de": ["b"]}),
    "int-column": ([("src", pa.int64()), ("tgt", pa.string())], {"src": [1], "tgt": ["b"]}),
    "null-values": ([("src", pa.string()), ("tgt", pa.string())], {"src": ["a", "c"], "tgt": ["b", None]}),
}


def _break_prepared(case: str) -> None:
    folder = PREPARED_DIR
    if case == "no-corpus-json":
        (folder / "corpus.json").unlink()
    elif case == "no-validation-split":
        (folder / "validation.arrow").unlink()
    elif case in BAD_COLUMNS:  # an Arrow file written by something else: it reads, but not as text pairs
        writer = arrow_text.TextPairWriter(folder / "train.arrow", pa.schema(BAD_COLUMNS[case][0]))
        writer.write(**BAD_COLUMNS[case][1])
        writer.close()
    else:  # a truncated Arrow file: a copy cut short, a full disk
        data = (folder / "train.arrow").read_bytes()
        (folder / "train.arrow").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-corpus-json", r"data/prepared is incomplete \(no corpus.json\)"),
        ("no-validation-split", r"data/prepared has no validation split \(validation.arrow\)"),
        ("truncated-arrow", r"cannot read data/prepared/train.arrow: "),
        ("other-columns", r"data/prepared/train.arrow: no column 'src' \(columns: en, de\); expected"),
        ("int-column", r"data/prepared/train.arrow: column 'src' holds int64, expected strings"),
        ("null-values", r"data/prepared/train.arrow: column 'tgt' has 1 null value\(s\); expected text"),
    ],
)
def test_a_corrupt_prepared_folder_is_one_message_and_keeps_the_previous_processed_data(
    case: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main
    from tests.helpers import write_params

    write_params(Path.cwd(), {"data": {"builtin": {"n_pairs": 400}}, "preprocess": {"vocab_size": 200}})
    assert main(["prepare"]) == 0 and main(["preprocess"]) == 0
    before = {path: path.read_bytes() for path in sorted(PROCESSED_DIR.rglob("*")) if path.is_file()}
    _break_prepared(case)

    assert main(["preprocess"]) == 2

    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1, error
    assert {path: path.read_bytes() for path in sorted(PROCESSED_DIR.rglob("*")) if path.is_file()} == before


def test_the_ray_encoder_cuts_blocks_at_split_changes_and_gives_each_split_its_own_rows_in_order() -> None:
    """The Ray engine encodes every split in one stream (one actor pool for the stage): a block that holds
    the end of one split and the start of the next is cut there, a split with no rows gets none, a split
    asked for out of order or after a split left half read is refused rather than given another split's
    rows, and `close()` ends the stream between splits. (The stream itself
    runs on Ray in test_ray_data and test_multinode, whose files must equal the local engine's.)"""
    from pipeline.data.ray_encode import SPLIT_COLUMN, SplitsInOrder, _by_split

    block = pa.table({SPLIT_COLUMN: pa.array([0, 0, 2, 2, 2], pa.int8()), "n": [1, 2, 3, 4, 5]})
    assert [(index, piece.column("n").to_pylist()) for index, piece in _by_split(block)] == [
        (0, [1, 2]),
        (2, [3, 4, 5]),
    ]

    started = []

    def stream():
        started.append(True)
        yield from [(0, "train-1"), (0, "train-2"), (2, "test-1")]

    encoder = SplitsInOrder(["train", "validation", "test"], stream)
    assert list(encoder("train")) == ["train-1", "train-2"] and started == [True]
    assert list(encoder("validation")) == []
    assert list(encoder("test")) == ["test-1"] and started == [True]
    with pytest.raises(ValueError, match="asked for split 'train'"):
        encoder("train")
    with pytest.raises(ValueError, match="asked for split 'test'"):
        SplitsInOrder(["train", "test"], stream)("test")

    # A split left half read: the next split's call says so, rather than taking no rows.
    half_read = SplitsInOrder(["train", "validation", "test"], stream)
    assert next(half_read("train")) == "train-1"
    with pytest.raises(RuntimeError, match="split 'train' was not read to its end"):
        list(half_read("validation"))

    # Closed between splits (the driver failed writing one): the stream ends there, its `finally` runs.
    ended = []

    def guarded():
        try:
            yield from [(0, "train-1"), (1, "validation-1")]
        finally:
            ended.append(True)

    closed = SplitsInOrder(["train", "validation"], guarded)
    assert list(closed("train")) == ["train-1"] and ended == []
    closed.close()
    assert ended == [True]
