"""Corpus sources: builtin, Hugging Face datasets (saved on disk or data files) and local folders."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import datasets
import pytest

from pipeline.config import DataConfig
from pipeline.data.builtin_corpus import generate_corpus
from pipeline.data.hf_source import parse_hf_source
from pipeline.data.sources import RawCorpus, RawSplit, load_corpus
from pipeline.errors import PipelineError

PAIRS = [("ein Haus", "a house"), ("zwei Hunde", "two dogs"), ("Guten Tag !", "Good day !")]


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_text_split(folder: Path, stem: str, pairs, src="de", tgt="en", gz=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / f"{stem}.{src}", [s for s, _ in pairs], gz)
    write_lines(folder / f"{stem}.{tgt}", [t for _, t in pairs], gz)


def data_config(source: str | Path, **overrides) -> DataConfig:
    return DataConfig(
        source=str(source),
        src_lang=overrides.pop("src_lang", "de"),
        tgt_lang=overrides.pop("tgt_lang", "en"),
        **overrides,
    )


def read_corpus(config: DataConfig) -> RawCorpus:
    """`load_corpus` with every split's stream read to the end, as prepare reads it (errors included)."""
    corpus = load_corpus(config)
    splits = {name: RawSplit(list(split.pairs), split.origin) for name, split in corpus.splits.items()}
    return RawCorpus(corpus.source, corpus.src_lang, corpus.tgt_lang, splits)


def pairs_of(corpus, split: str) -> list[tuple[str, str]]:
    return corpus.splits[split].pairs


# ------------------------------------------------------------------------------------------------- builtin


def test_builtin_source_gives_generated_training_pairs_only():
    corpus = read_corpus(DataConfig(builtin={"n_pairs": 40, "seed": 5}))
    assert list(corpus.splits) == ["train"]
    assert pairs_of(corpus, "train") == generate_corpus(40, 5)


def test_builtin_max_examples_keeps_the_first_pairs():
    corpus = read_corpus(DataConfig(builtin={"n_pairs": 40, "seed": 5}, max_examples=7))
    assert pairs_of(corpus, "train") == generate_corpus(40, 5)[:7]


# -------------------------------------------------------------------------------------------- Hugging Face


def test_hf_saved_dataset_with_translation_column_loads_every_split(tmp_path):
    def rows(pairs):
        return {"translation": [{"de": s, "en": t} for s, t in pairs]}

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(PAIRS)),
            "validation": datasets.Dataset.from_dict(rows(PAIRS[:1])),
            "test": datasets.Dataset.from_dict(rows(PAIRS[1:])),
        }
    ).save_to_disk(str(tmp_path / "wmt"))
    corpus = read_corpus(data_config(f"hf:{tmp_path / 'wmt'}"))
    assert pairs_of(corpus, "train") == PAIRS
    assert pairs_of(corpus, "validation") == PAIRS[:1]
    assert pairs_of(corpus, "test") == PAIRS[1:]
    assert "split 'validation'" in corpus.splits["validation"].origin


def test_hf_saved_dataset_with_one_column_per_language_and_valid_split_name(tmp_path):
    def columns(pairs):
        return {"en": [t for _, t in pairs], "de": [s for s, _ in pairs]}

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(columns(PAIRS)),
            "valid": datasets.Dataset.from_dict(columns(PAIRS[:2])),
        }
    ).save_to_disk(str(tmp_path / "m30k"))
    corpus = read_corpus(data_config(f"hf:{tmp_path / 'm30k'}", max_examples=2))
    assert pairs_of(corpus, "train") == PAIRS[:2]
    assert pairs_of(corpus, "validation") == PAIRS[:2]
    assert "test" not in corpus.splits


def test_hf_data_files_folder_goes_through_load_dataset(tmp_path, monkeypatch):
    # Keep datasets' download/prepare cache inside tmp_path instead of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "parquet"
    folder.mkdir()
    table = {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]}
    datasets.Dataset.from_dict(table).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict(table).to_parquet(str(folder / "test.parquet"))
    corpus = read_corpus(data_config(f"hf:{folder}"))
    assert pairs_of(corpus, "train") == PAIRS
    assert pairs_of(corpus, "test") == PAIRS


def test_hf_split_names_map_nonstandard_split_names(tmp_path):
    table = {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(table) for name in ("training", "newstest2013", "newstest2014")}
    ).save_to_disk(str(tmp_path / "news"))
    names = {"train": "training", "validation": "newstest2013", "test": "newstest2014"}
    corpus = read_corpus(data_config(f"hf:{tmp_path / 'news'}", split_names=names))
    assert set(corpus.splits) == {"train", "validation", "test"}


def test_hf_missing_language_columns_names_the_columns_found(tmp_path):
    table = datasets.Dataset.from_dict({"source": ["a"], "target": ["b"]})
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(PipelineError, match=r"columns found: source, target"):
        read_corpus(data_config(f"hf:{tmp_path / 'odd'}"))


def test_hf_translation_column_without_the_languages_names_the_languages_found(tmp_path):
    rows = {"translation": [{"fr": "maison", "en": "house"}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "fr"))
    with pytest.raises(PipelineError, match=r"column has no 'de'/'en' \(languages found: fr, en"):
        read_corpus(data_config(f"hf:{tmp_path / 'fr'}"))


def test_hf_dataset_that_cannot_be_loaded_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"could not load Hugging Face dataset .*empty"):
        read_corpus(data_config(f"hf:{tmp_path / 'empty'}"))
    with pytest.raises(PipelineError, match=r"nowhere.*no such folder"):
        read_corpus(data_config(f"hf:{tmp_path / 'nowhere'}"))


def test_hf_source_parses_dataset_and_config():
    assert parse_hf_source("hf:wmt16:de-en") == ("wmt16", "de-en")
    assert parse_hf_source("hf:bentrevett/multi30k") == ("bentrevett/multi30k", None)


# ------------------------------------------------------------------------------------------- local folders


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_text_folder_reads_parallel_files_and_detects_splits(tmp_path, gz):
    write_text_split(tmp_path, "train", PAIRS, gz=gz)
    write_text_split(tmp_path, "dev", PAIRS[:1], gz=gz)
    write_text_split(tmp_path, "test_2016_flickr", PAIRS[1:], gz=gz)
    (tmp_path / "README.md").write_text("not a split\n")
    corpus = read_corpus(data_config(tmp_path))
    assert pairs_of(corpus, "train") == PAIRS
    assert pairs_of(corpus, "validation") == PAIRS[:1]
    assert pairs_of(corpus, "test") == PAIRS[1:]
    assert corpus.splits["train"].origin.endswith(
        "train.de" + (".gz" if gz else "") + " + " + str(tmp_path / ("train.en" + (".gz" if gz else "")))
    )


def test_text_folder_keeps_line_alignment_with_crlf_bom_and_unicode_line_separators(tmp_path):
    # \u2028 and \x85 are line breaks for str.splitlines but not for a parallel corpus.
    (tmp_path / "train.de").write_bytes("\ufeffeins\r\nzwei\u2028drei\x85\r\nvier\n".encode())
    (tmp_path / "train.en").write_bytes(b"one\ntwo three\nfour\n")
    corpus = read_corpus(data_config(tmp_path))
    expected = [("eins", "one"), ("zwei\u2028drei\x85", "two three"), ("vier", "four")]
    assert pairs_of(corpus, "train") == expected


def test_tsv_folder_uses_header_language_columns(tmp_path):
    (tmp_path / "train.tsv").write_text("id\ten\tde\n1\ta house\tein Haus\n\n2\ttwo dogs\tzwei Hunde\n")
    (tmp_path / "valid.tsv").write_text("de\ten\nGuten Tag !\tGood day !\n")
    corpus = read_corpus(data_config(tmp_path))
    assert pairs_of(corpus, "train") == PAIRS[:2]
    assert pairs_of(corpus, "validation") == PAIRS[2:]


def test_jsonl_folder_reads_language_keys_and_translation_objects(tmp_path):
    lines = [json.dumps({"de": s, "en": t}) for s, t in PAIRS[:2]]
    lines.append(json.dumps({"translation": {"de": PAIRS[2][0], "en": PAIRS[2][1]}}))
    write_lines(tmp_path / "train.jsonl", lines, gz=True)
    corpus = read_corpus(data_config(tmp_path))
    assert pairs_of(corpus, "train") == PAIRS


def _string_column(values: list[bytes]):
    """A string column holding these bytes as they are (Arrow checks no UTF-8 on this path)."""
    import pyarrow as pa

    offsets = [0]
    for value in values:
        offsets.append(offsets[-1] + len(value))
    buffer = pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1].to_pybytes())
    return pa.Array.from_buffers(pa.string(), len(values), [None, buffer, pa.py_buffer(b"".join(values))])


def test_parquet_folder_reads_language_columns_and_translation_structs(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import folder_source

    monkeypatch.setattr(folder_source, "PARQUET_BATCH_ROWS", 2)  # several batches and row groups
    train = pa.table(
        {"id": [1, 2, 3], "en": [t for _, t in PAIRS], "de": [s for s, _ in PAIRS]},
        schema=pa.schema([("id", pa.int64()), ("en", pa.large_string()), ("de", pa.string())]),
    )
    pq.write_table(train, tmp_path / "train.parquet", row_group_size=2)
    translations = [{"de": s, "en": t, "fr": "x"} for s, t in PAIRS]
    pq.write_table(pa.table({"translation": translations}), tmp_path / "valid.parquet")
    corpus = read_corpus(data_config(tmp_path, max_examples=2))
    assert pairs_of(corpus, "train") == PAIRS[:2]
    assert pairs_of(corpus, "validation") == PAIRS
    assert corpus.splits["train"].origin == str(tmp_path / "train.parquet")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"de": ["a"], "fr": ["b"]}, r"train\.parquet: no column en \(columns: de, fr\)"),
        ({"translation": [{"de": "a", "fr": "b"}]}, r"train\.parquet: no column translation\.en"),
        ({"de": ["a"], "en": [1]}, r"train\.parquet: column en holds int64, expected strings"),
        ({"de": ["a", "b", "c", None], "en": ["a"] * 4}, r"train\.parquet: row 4: 'de' is null; expected"),
        ({"de": ["a"] * 3, "en": [b"ok", b"ok", b"\xff"]}, r"train\.parquet: row 3: 'en' is invalid UTF-8"),
    ],
    ids=["missing-column", "missing-struct-field", "not-strings", "null", "bad-utf8"],
)
def test_malformed_parquet_names_file_column_and_row(tmp_path, monkeypatch, table, expected):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import folder_source

    monkeypatch.setattr(folder_source, "PARQUET_BATCH_ROWS", 2)  # the bad row is in a later batch
    columns = {
        name: _string_column(values) if values and isinstance(values[0], bytes) else values
        for name, values in table.items()
    }
    pq.write_table(pa.table(columns), tmp_path / "train.parquet", row_group_size=2)
    with pytest.raises(PipelineError, match=expected):
        read_corpus(data_config(tmp_path))


def test_a_file_named_parquet_that_is_not_one_or_is_gzipped_is_refused(tmp_path):
    (tmp_path / "train.parquet").write_text("de\ten\n")
    with pytest.raises(PipelineError, match=r"cannot read .*train\.parquet: not a Parquet file"):
        read_corpus(data_config(tmp_path))
    (tmp_path / "train.parquet").rename(tmp_path / "train.parquet.gz")
    with pytest.raises(PipelineError, match=r"train\.parquet\.gz: a Parquet file compresses its own pages"):
        read_corpus(data_config(tmp_path))


def test_max_examples_caps_training_pairs_but_not_evaluation_splits(tmp_path):
    write_text_split(tmp_path, "train", PAIRS)
    write_text_split(tmp_path, "test", PAIRS)
    corpus = read_corpus(data_config(tmp_path, max_examples=2))
    assert pairs_of(corpus, "train") == PAIRS[:2]
    assert pairs_of(corpus, "test") == PAIRS


def test_other_language_pair_in_multi30k_layout_needs_only_source_and_languages(tmp_path):
    fr_cs = [("une maison", "dům"), ("deux chiens", "dva psi")]
    for stem in ("train", "val", "test_2016_flickr"):
        write_text_split(tmp_path, stem, fr_cs, src="fr", tgt="cs", gz=True)
        write_lines(tmp_path / f"{stem}.en", ["ignored", "ignored", "extra"], gz=True)
    corpus = read_corpus(DataConfig(source=str(tmp_path), src_lang="fr", tgt_lang="cs"))
    assert {name: pairs_of(corpus, name) for name in corpus.splits} == dict.fromkeys(
        ("train", "validation", "test"), fr_cs
    )


# ---------------------------------------------------------------------------------------------- bad input


def test_different_line_counts_name_both_files_and_counts(tmp_path):
    write_lines(tmp_path / "train.de", ["a", "b", "c"])
    write_lines(tmp_path / "train.en", ["a", "b", "c", "d", "e"], gz=True)
    with pytest.raises(PipelineError) as error:
        read_corpus(data_config(tmp_path, max_examples=1))
    message = str(error.value)
    assert f"{tmp_path / 'train.de'} has 3 lines" in message
    assert f"{tmp_path / 'train.en.gz'} has 5" in message


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_invalid_utf8_names_file_and_line(tmp_path, gz):
    write_lines(tmp_path / "train.en", ["one", "two", "three"], gz=gz)
    data = b"eins\nzwei\ndr\xe9i\n"
    path = tmp_path / ("train.de.gz" if gz else "train.de")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(PipelineError, match=rf"{path}:3: invalid UTF-8"):
        read_corpus(data_config(tmp_path))


def test_missing_training_files_name_the_expected_paths(tmp_path):
    write_text_split(tmp_path, "val", PAIRS)
    with pytest.raises(PipelineError) as error:
        read_corpus(data_config(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/train.de and {tmp_path}/train.en" in message
    assert "splits found: val" in message


def test_one_sided_split_names_the_missing_parallel_file(tmp_path):
    write_text_split(tmp_path, "train", PAIRS)
    write_lines(tmp_path / "test.de", ["x"])
    with pytest.raises(PipelineError, match=r"test\.de has no parallel file test\.en"):
        read_corpus(data_config(tmp_path))


@pytest.mark.parametrize(
    ("kind", "described"),
    [
        ("folder", "a folder"),
        ("fifo", r"a FIFO \(named pipe\)"),
        ("symlink-loop", "a symlink loop"),
        ("broken-symlink", "a broken symlink"),
    ],
)
def test_a_split_file_that_is_not_a_file_says_what_it_is(tmp_path, kind, described):
    """Not "train.de has no parallel file train.en": train.en is there, it is just not a file."""
    write_lines(tmp_path / "train.de", ["ein Hund"])
    odd = tmp_path / "train.en"
    if kind == "folder":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)
    elif kind == "symlink-loop":
        odd.symlink_to(odd)
    else:
        odd.symlink_to(tmp_path / "absent.en")
    with pytest.raises(PipelineError) as error:
        read_corpus(data_config(tmp_path))
    assert re.fullmatch(rf"{re.escape(str(odd))} is {described}, not a regular file: .*", str(error.value))
    assert "\n" not in str(error.value)


def test_several_test_candidates_are_refused_with_their_names(tmp_path):
    for stem in ("train", "test_2016_flickr", "test_2017_mscoco"):
        write_text_split(tmp_path, stem, PAIRS)
    expected = r"test_2016_flickr, test_2017_mscoco; choose one with data.split_names.test"
    with pytest.raises(PipelineError, match=expected):
        read_corpus(data_config(tmp_path))
    corpus = read_corpus(data_config(tmp_path, split_names={"test": "test_2017_mscoco"}))
    assert "test_2017_mscoco" in corpus.splits["test"].origin


def test_split_name_that_does_not_exist_is_refused(tmp_path):
    write_text_split(tmp_path, "train", PAIRS)
    with pytest.raises(PipelineError, match=r"data.split_names.validation is 'dev2010'.*found: train"):
        read_corpus(data_config(tmp_path, split_names={"validation": "dev2010"}))


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("train.tsv", "de\ten\nein\tone\nzwei\n", r"train\.tsv:3: expected 2 tab-separated fields"),
        ("train.tsv", "src\ttgt\na\tb\n", r"train\.tsv:1: header has no column 'de' or 'en'; columns found"),
        ("train.tsv", "en\tde\tde\na\tb\tc\n", r"train\.tsv:1: header has column 'de' 2 times; name each"),
        ("train.jsonl", '{"de": "a", "en": "b"}\n{"de": "a", \n', r"train\.jsonl:2: not valid JSON"),
        ("train.jsonl", '{"de": "a", "fr": "b"}\n', r"train\.jsonl:1: expected string .*keys found: de, fr"),
        ("train.jsonl", '["a", "b"]\n', r"train\.jsonl:1: expected a JSON object"),
    ],
    ids=["tsv-fields", "tsv-header", "tsv-header-twice", "jsonl-syntax", "jsonl-keys", "jsonl-array"],
)
def test_malformed_tsv_and_jsonl_lines_name_file_and_line(tmp_path, filename, content, expected):
    (tmp_path / filename).write_text(content)
    with pytest.raises(PipelineError, match=expected):
        read_corpus(data_config(tmp_path))


def test_missing_folder_and_file_source_are_refused(tmp_path):
    with pytest.raises(PipelineError, match=r"no such folder"):
        read_corpus(data_config(tmp_path / "absent"))
    write_lines(tmp_path / "train.de", ["a"])
    with pytest.raises(PipelineError, match=r"is a file"):
        read_corpus(data_config(tmp_path / "train.de"))


def test_corrupt_gzip_is_reported_with_its_path(tmp_path):
    (tmp_path / "train.de.gz").write_bytes(b"this is not gzip")
    write_lines(tmp_path / "train.en", ["a"])
    with pytest.raises(PipelineError, match=rf"cannot read {tmp_path / 'train.de.gz'}"):
        read_corpus(data_config(tmp_path))


def test_split_stored_in_two_formats_is_ambiguous(tmp_path):
    write_text_split(tmp_path, "train", PAIRS)
    (tmp_path / "train.tsv").write_text("de\ten\na\tb\n")
    with pytest.raises(PipelineError, match=r"stored more than once"):
        read_corpus(data_config(tmp_path))


def test_hf_rows_come_in_dataset_order_from_cache_files_or_through_an_index_mapping(tmp_path):
    from pipeline.data.hf_source import _hf_pairs

    table = {"de": [f"satz {i}" for i in range(50)], "en": [f"sentence {i}" for i in range(50)]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "saved"))
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    assert saved.cache_files, "read straight from its Arrow file"
    expected = list(zip(table["de"], table["en"], strict=True))
    assert list(_hf_pairs(saved, "de", "en", "saved", None)) == expected
    assert list(_hf_pairs(saved, "de", "en", "saved", 7)) == expected[:7]
    shuffled = saved.shuffle(seed=0)  # an index mapping over the same file: datasets resolves the order
    assert list(_hf_pairs(shuffled, "de", "en", "shuffled", None)) == list(
        zip(shuffled["de"], shuffled["en"], strict=True)
    )
