"""The prepare stage end to end: each source kind -> data/prepared + prepare_stats.json, or nothing at all."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from pipeline.config import PipelineConfig
from pipeline.data.arrow_text import read_texts
from pipeline.data.cleaning import DROP_REASONS
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict
from pipeline.paths import PREPARE_STATS, PREPARED_DIR
from pipeline.stages import prepare

REPO = Path(__file__).resolve().parents[1]
MULTI30K = Path(__file__).resolve().parents[2] / "shared/data/multi30k"

PAIRS = [(f"das Haus Nummer {i} .", f"the house number {i} .") for i in range(40)]


@pytest.fixture(autouse=True)
def _in_tmp_project(tmp_path, monkeypatch):
    # Stages write relative paths (data/prepared, reports/...): run each test in its own project root.
    monkeypatch.chdir(tmp_path)


def config(source: str | Path, **data) -> PipelineConfig:
    return config_from_dict({"data": {"source": str(source), "src_lang": "de", "tgt_lang": "en", **data}})


def write_lines(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_text_folder(folder: Path, suffix: str = "") -> str:
    write_lines(folder / f"train.de{suffix}", [s for s, _ in PAIRS])
    write_lines(folder / f"train.en{suffix}", [t for _, t in PAIRS])
    return str(folder)


def write_tsv_folder(folder: Path) -> str:
    write_lines(folder / "train.tsv", ["en\tde", *(f"{t}\t{s}" for s, t in PAIRS)])
    return str(folder)


def write_jsonl_folder(folder: Path) -> str:
    write_lines(folder / "train.jsonl", [json.dumps({"de": s, "en": t}) for s, t in PAIRS])
    return str(folder)


def write_hf_translation(folder: Path) -> str:
    rows = {"translation": [{"de": s, "en": t} for s, t in PAIRS]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return f"hf:{folder}"


def write_hf_columns(folder: Path) -> str:
    columns = {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(folder))
    return f"hf:{folder}"


def read_prepared() -> dict[str, list[tuple[str, str]]]:
    files = {path.stem: path for path in PREPARED_DIR.glob("*.arrow")}
    return {name: list(zip(*read_texts(path), strict=True)) for name, path in files.items()}


def assert_no_outputs() -> None:
    assert not PREPARED_DIR.exists()
    assert not PREPARE_STATS.exists()
    assert not list(PREPARED_DIR.parent.glob(".prepared*")), "a temporary folder was left behind"


def test_builtin_corpus_is_prepared_into_three_string_splits_with_stats():
    prepare.run(config_from_dict({"data": {"builtin": {"n_pairs": 200}}}))
    assert sorted(read_prepared()) == ["test", "train", "validation"]
    for name in ("train", "validation", "test"):
        # Arrow stream files in the format `datasets` writes: it opens them as they are.
        split = datasets.Dataset.from_file(str(PREPARED_DIR / f"{name}.arrow"))
        assert split.features == datasets.Features(
            {"src": datasets.Value("string"), "tgt": datasets.Value("string")}
        )
    assert not (PREPARED_DIR / ".train-cleaned.arrow").exists()
    stats = json.loads(PREPARE_STATS.read_text())
    assert stats["pairs"] == {"train": 180, "validation": 10, "test": 10}
    assert stats["carved"] == {"validation": True, "test": True}
    assert set(stats["dropped"]["train"]) == set(DROP_REASONS)
    assert set(stats["length"]["train"]["src"]) == {"p50", "p90", "p99", "max"}
    info = json.loads((PREPARED_DIR / "corpus.json").read_text())
    assert (info["src_lang"], info["tgt_lang"]) == ("en", "art")


@pytest.mark.parametrize(
    "make_source",
    [
        write_text_folder,
        lambda folder: write_text_folder(folder, ".gz"),
        write_tsv_folder,
        write_jsonl_folder,
        write_hf_translation,
        write_hf_columns,
    ],
    ids=["text", "text-gz", "tsv", "jsonl", "hf-translation-column", "hf-language-columns"],
)
def test_each_source_kind_is_prepared_end_to_end(tmp_path, make_source):
    source = make_source(tmp_path / "corpus")
    prepare.run(config(source, validation_fraction=0.1, test_fraction=0.1))
    splits = read_prepared()
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [32, 4, 4]
    assert sorted(pair for pairs in splits.values() for pair in pairs) == sorted(PAIRS)


@pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k test data not found at {MULTI30K}")
def test_real_multi30k_folder_is_prepared_with_its_own_validation_and_test_splits():
    prepare.run(config(MULTI30K, max_examples=300))
    stats = json.loads(PREPARE_STATS.read_text())
    assert stats["loaded"] == {"train": 300, "validation": 1014, "test": 1000}
    assert stats["pairs"]["validation"] == 1014
    assert stats["pairs"]["test"] == 1000
    assert 290 <= stats["pairs"]["train"] <= 300
    assert stats["carved"] == {"validation": False, "test": False}


def test_multi30k_layout_of_another_language_pair_needs_only_source_and_languages(tmp_path):
    folder = tmp_path / "fr-cs"
    for stem, n in (("train", 30), ("val", 3), ("test_2016_flickr", 4)):
        write_lines(folder / f"{stem}.fr.gz", [f"la maison {stem} {i} ." for i in range(n)])
        write_lines(folder / f"{stem}.cs.gz", [f"dům {stem} {i} ." for i in range(n)])
    prepare.run(config_from_dict({"data": {"source": str(folder), "src_lang": "fr", "tgt_lang": "cs"}}))
    splits = read_prepared()
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [30, 3, 4]
    assert splits["test"][0] == ("la maison test_2016_flickr 0 .", "dům test_2016_flickr 0 .")


def test_any_two_text_columns_work_as_the_two_sides_a_summarisation_corpus(tmp_path):
    """The README's example: a jsonl of documents and their summaries, no language codes anywhere."""
    folder = tmp_path / "news-summaries"
    folder.mkdir()
    for split, n in (("train", 20), ("validation", 2), ("test", 3)):
        rows = [
            {"document": f"story {split} {i} : " + "word " * 80, "summary": f"story {i} ."} for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"source": str(folder), "src_lang": "document", "tgt_lang": "summary"}
    prepare.run(config_from_dict({"data": {**data, "max_tokens": 200, "max_length_ratio": 50}}))
    splits = read_prepared()
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [20, 2, 3]
    assert splits["test"][1] == ("story test 1 : " + " ".join(["word"] * 80), "story 1 .")


# ---------------------------------------------------------------------------------------------- bad input


def write_mismatched(folder: Path) -> None:
    write_lines(folder / "train.de", ["a", "b"])
    write_lines(folder / "train.en", ["a"])


def write_bad_utf8(folder: Path) -> None:
    write_lines(folder / "train.en", ["a", "b"])
    (folder / "train.de").write_bytes(b"a\n\xff\xfe\n")


def write_val_only(folder: Path) -> None:
    write_lines(folder / "val.de", ["a"])
    write_lines(folder / "val.en", ["a"])


def write_all_too_long(folder: Path) -> None:
    write_lines(folder / "train.de", ["eins zwei drei vier"] * 3)
    write_lines(folder / "train.en", ["one two three four"] * 3)


def write_jsonl_line(line: str):
    def write(folder: Path) -> None:
        (folder / "train.jsonl").write_text('{"en": "fine", "de": "gut"}\n' + line + "\n")

    return write


BAD_CORPORA = {
    "lone-surrogate": (
        write_jsonl_line('{"en": "x\\ud800", "de": "y"}'),
        r"train\.jsonl:2: 'en' holds an unpaired surrogate escape \(\\ud800\)",
    ),
    "deeply-nested": (
        write_jsonl_line('{"en": ' + "[" * 100_000 + "]" * 100_000 + ', "de": "y"}'),
        r"train\.jsonl:2: not usable JSON \(nested too deeply\)",
    ),
    "huge-integer": (
        write_jsonl_line('{"en": ' + "9" * 5000 + ', "de": "y"}'),
        r"train\.jsonl:2: not usable JSON \(Exceeds the limit \(4300 digits\)",
    ),
    "line-counts": (write_mismatched, r"train\.de has 2 lines, .*train\.en has 1"),
    "invalid-utf8": (write_bad_utf8, r"train\.de:2: invalid UTF-8"),
    "missing-train": (write_val_only, r"no training split .*train\.de and .*train\.en"),
    "empty-after-filtering": (write_all_too_long, r"train split is empty after cleaning: .*too_long=3"),
}


@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_bad_corpus_is_refused_before_anything_is_written(tmp_path, case):
    write, expected = BAD_CORPORA[case]
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder)
    with pytest.raises(PipelineError, match=expected):
        prepare.run(config(folder, max_tokens=3))
    assert_no_outputs()


@pytest.mark.parametrize("case", list(BAD_CORPORA))
def test_bad_corpus_leaves_an_earlier_complete_output_intact(tmp_path, case):
    good = write_text_folder(tmp_path / "good")
    prepare.run(config(good))
    before, stats_before = read_prepared(), PREPARE_STATS.read_text()
    write, expected = BAD_CORPORA[case]
    (tmp_path / "bad").mkdir()
    write(tmp_path / "bad")
    with pytest.raises(PipelineError, match=expected):
        prepare.run(config(tmp_path / "bad", max_tokens=3))
    assert read_prepared() == before
    assert PREPARE_STATS.read_text() == stats_before
    assert sorted(p.name for p in PREPARED_DIR.parent.iterdir()) == ["prepared"]  # no temporary leftovers


def test_unknown_source_scheme_is_refused_by_config_validation():
    with pytest.raises(PipelineError, match=r"data\.source: .*unknown source scheme in 's3://x'"):
        config("s3://x")
    assert_no_outputs()


def test_bad_parameter_is_refused_naming_its_key():
    with pytest.raises(PipelineError, match=r"model\.dropout: .*got 1\.5"):
        config_from_dict({"model": {"dropout": 1.5}})
    assert_no_outputs()


@pytest.mark.slow
def test_cli_exits_2_naming_the_bad_key_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: builtin\nmodel:\n  dropout: 1.5\n")
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pipeline", "prepare"]
    env = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert "model.dropout" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_outputs()


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder whatever its permissions")
def test_a_source_folder_that_cannot_be_listed_is_one_message(tmp_path):
    folder = write_text_folder(tmp_path / "locked")
    folder.chmod(0)
    try:
        with pytest.raises(
            PipelineError, match=r"cannot list data.source folder .*locked: Permission denied"
        ):
            prepare.run(config(folder))
    finally:
        folder.chmod(0o755)
    assert_no_outputs()
