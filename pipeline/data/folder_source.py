"""A local folder as the source: (source, target) pairs per split from the split files it holds.

Each split is `{split}.{lang}` plain-text pairs (Moses / Multi30k convention, optionally `.gz`),
`{split}.tsv` (header row of language codes), `{split}.jsonl` (objects keyed by language) or
`{split}.parquet` (a string column per language, or a `translation` struct column). Problems are
`PipelineError`s naming the file and line (the row, for Parquet).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig, source_path
from pipeline.data.sources import Pair, RawSplit, resolve_split_names, split_cap, split_listing
from pipeline.errors import PipelineError
from pipeline.files import not_a_regular_file

PARQUET_BATCH_ROWS = 20_000  # rows in memory at a time: a few MB of text


@dataclass(frozen=True)
class _SplitFiles:
    """The file(s) holding one split in a local folder: two parallel text files, or one tsv/jsonl file."""

    kind: str  # "text" | "tsv" | "jsonl" | "parquet"
    paths: tuple[Path, ...]

    @property
    def origin(self) -> str:
        return " + ".join(str(path) for path in self.paths)


def load_folder_splits(config: DataConfig) -> dict[str, RawSplit]:
    folder = source_path(config.source)
    if not folder.exists():
        raise PipelineError(
            f"data.source {config.source!r}: no such folder "
            "(expected 'builtin', 'hf:<dataset>[:<config>]' or a folder of split files)"
        )
    if not folder.is_dir():
        raise PipelineError(
            f"data.source {config.source!r} is a file; give the folder that holds the split files"
        )
    found = _scan_folder(folder, config.src_lang, config.tgt_lang)
    where = f"folder {folder} ({config.src_lang}-{config.tgt_lang})"
    if "train" not in found and "train" not in config.split_names:
        raise PipelineError(_missing_train_message(folder, config, found))
    resolved = resolve_split_names(list(found), config.split_names, where)
    readers: dict[str, Callable[[_SplitFiles, str, str, int | None], Iterator[Pair]]] = {
        "text": _read_text_pair,
        "tsv": _read_tsv,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
    }
    splits = {}
    for canonical, stem in resolved.items():
        files = found[stem]
        pairs = readers[files.kind](files, config.src_lang, config.tgt_lang, split_cap(config, canonical))
        splits[canonical] = RawSplit(pairs, files.origin)
    return splits


def _missing_train_message(folder: Path, config: DataConfig, found: Mapping[str, _SplitFiles]) -> str:
    src, tgt = config.src_lang, config.tgt_lang
    expected = (
        f"{folder}/train.{src} and {folder}/train.{tgt} (optionally .gz), "
        f"{folder}/train.tsv, {folder}/train.jsonl or {folder}/train.parquet"
    )
    present = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return (
        f"no training split in {folder} for {src}-{tgt}: expected {expected}; "
        f"splits found: {split_listing(found)}; files present: {', '.join(present[:20]) or 'none'}"
    )


def _split_name_and_kind(filename: str, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    """`train.de.gz` -> ("train", "de"); `dev.tsv` -> ("dev", "tsv"); anything else -> None (ignored)."""
    name = filename[: -len(".gz")] if filename.endswith(".gz") else filename
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or suffix not in (src_lang, tgt_lang, "tsv", "jsonl", "parquet"):
        return None
    if suffix == "parquet" and name != filename:
        raise PipelineError(
            f"{filename}: a Parquet file compresses its own pages; store it as {name}, not gzipped"
        )
    return stem, suffix


def _scan_folder(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, _SplitFiles]:
    by_stem: dict[str, dict[str, list[Path]]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise PipelineError(f"cannot list data.source folder {folder}: {error.strerror}") from None
    for path in entries:
        parsed = _split_name_and_kind(path.name, src_lang, tgt_lang)
        if parsed is not None:
            # Named like a split file but not one: say what it is, rather than leave it out and then
            # blame its partner ("has no parallel file") or the folder ("no training split").
            kind = not_a_regular_file(path)
            if kind:
                raise PipelineError(f"{path} is {kind}, not a regular file: replace it with the split's file")
            stem, suffix = parsed
            by_stem.setdefault(stem, {}).setdefault(suffix, []).append(path)
    found = {}
    for stem, files in by_stem.items():
        found[stem] = _split_files(folder, stem, files, src_lang, tgt_lang)
    return found


def _split_files(
    folder: Path, stem: str, files: dict[str, list[Path]], src_lang: str, tgt_lang: str
) -> _SplitFiles:
    every = [path for paths in files.values() for path in paths]
    duplicated = [paths for paths in files.values() if len(paths) > 1]
    if duplicated:
        raise PipelineError(f"{folder}: both {duplicated[0][0].name} and {duplicated[0][1].name}; keep one")
    has_text = src_lang in files or tgt_lang in files
    if sum((has_text, "tsv" in files, "jsonl" in files, "parquet" in files)) > 1:
        raise PipelineError(
            f"{folder}: split {stem!r} is stored more than once "
            f"({', '.join(p.name for p in every)}); keep one format"
        )
    if "tsv" in files:
        return _SplitFiles("tsv", (files["tsv"][0],))
    if "jsonl" in files:
        return _SplitFiles("jsonl", (files["jsonl"][0],))
    if "parquet" in files:
        return _SplitFiles("parquet", (files["parquet"][0],))
    for lang in (src_lang, tgt_lang):
        if lang not in files:
            present = every[0].name
            raise PipelineError(
                f"{folder}: {present} has no parallel file {stem}.{lang} (or {stem}.{lang}.gz)"
            )
    return _SplitFiles("text", (files[src_lang][0], files[tgt_lang][0]))


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, streaming; strict UTF-8; gzip when the name ends in .gz.

    Lines end at b"\\n" only (not at the other characters `str.splitlines` breaks on, such as U+2028 or
    \\x85), so a stray separator inside a sentence cannot shift one side of a parallel corpus.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            yield from decode_lines(handle, str(path))
    except (OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def decode_lines(handle: Iterable[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a binary stream (a file, stdin), strictly UTF-8, without its
    line end or a leading byte-order mark; a bad byte is a PipelineError naming `name` and the line."""
    for number, raw in enumerate(handle, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PipelineError(
                f"{name}:{number}: invalid UTF-8 ({error.reason} at byte {error.start} of the line)"
            ) from None
        text = text.removesuffix("\n").removesuffix("\r")
        yield number, text.removeprefix("\ufeff") if number == 1 else text


def _read_text_pair(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> Iterator[Pair]:
    src_path, tgt_path = files.paths
    return _text_pairs(src_path, tgt_path, cap)


def _text_pairs(src_path: Path, tgt_path: Path, cap: int | None) -> Iterator[Pair]:
    n_src = n_tgt = n_pairs = 0
    for src_line, tgt_line in zip_longest(read_lines(src_path), read_lines(tgt_path)):
        n_src = src_line[0] if src_line is not None else n_src
        n_tgt = tgt_line[0] if tgt_line is not None else n_tgt
        # Past the end of the shorter file, keep counting so the message gives both totals.
        if src_line is not None and tgt_line is not None and (cap is None or n_pairs < cap):
            n_pairs += 1
            yield src_line[1], tgt_line[1]
    if n_src != n_tgt:
        raise PipelineError(
            f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}; "
            "line N of one must translate line N of the other"
        )


def _read_tsv(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> Iterator[Pair]:
    """Checks the header now; the rows are read as the returned stream is."""
    (path,) = files.paths
    lines = read_lines(path)
    header = next(lines, None)
    if header is None:
        raise PipelineError(f"{path}: empty file; expected a header row such as '{src_lang}\\t{tgt_lang}'")
    columns = header[1].split("\t")
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in columns]
    if missing:
        raise PipelineError(
            f"{path}:1: header has no column {' or '.join(map(repr, missing))}; "
            f"columns found: {', '.join(columns)}"
        )
    twice = [lang for lang in (src_lang, tgt_lang) if columns.count(lang) > 1]
    if twice:
        raise PipelineError(
            f"{path}:1: header has column {twice[0]!r} {columns.count(twice[0])} times; "
            "name each column once, so it is clear which one to read"
        )
    return _tsv_rows(path, lines, len(columns), columns.index(src_lang), columns.index(tgt_lang), cap)


def _tsv_rows(
    path: Path, lines: Iterator[tuple[int, str]], n_columns: int, src_col: int, tgt_col: int, cap: int | None
) -> Iterator[Pair]:
    n_pairs = 0
    for number, text in lines:
        if not text.strip():
            continue  # blank lines (e.g. a trailing one) carry no pair
        fields = text.split("\t")
        if len(fields) != n_columns:
            raise PipelineError(
                f"{path}:{number}: expected {n_columns} tab-separated fields like the header, "
                f"found {len(fields)}"
            )
        if cap is None or n_pairs < cap:
            n_pairs += 1
            yield fields[src_col], fields[tgt_col]


def _read_jsonl(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> Iterator[Pair]:
    (path,) = files.paths
    n_pairs = 0
    for number, text in read_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise PipelineError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        except (ValueError, RecursionError) as error:  # an integer of >4300 digits; nesting too deep
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
            raise PipelineError(f"{path}:{number}: not usable JSON ({reason})") from None
        if isinstance(record, dict) and isinstance(record.get("translation"), dict):
            record = record["translation"]  # the Hugging Face `translation` shape, one object per line
        if not isinstance(record, dict):
            raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        src, tgt = record.get(src_lang), record.get(tgt_lang)
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise PipelineError(
                f"{path}:{number}: expected string values for {src_lang!r} and {tgt_lang!r}; "
                f"keys found: {', '.join(record) or 'none'}"
            )
        for lang, value in ((src_lang, src), (tgt_lang, tgt)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:  # "\ud800" escapes a lone surrogate: no character at all
                raise PipelineError(
                    f"{path}:{number}: {lang!r} holds an unpaired surrogate escape"
                    f" (\\u{ord(value[error.start]):04x}), which is not text"
                ) from None
        if cap is None or n_pairs < cap:
            n_pairs += 1
            yield src, tgt


def _read_parquet(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> Iterator[Pair]:
    """Checks the schema now; the rows are read as the returned stream is, one record batch at a time."""
    (path,) = files.paths
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise PipelineError(f"cannot read {path}: not a Parquet file ({error})") from None
    struct = _parquet_layout(path, parquet.schema_arrow, src_lang, tgt_lang)
    return _parquet_rows(path, parquet, struct, (src_lang, tgt_lang), cap)


def _parquet_layout(path: Path, schema: pa.Schema, src_lang: str, tgt_lang: str) -> bool:
    """True when the languages are fields of a `translation` struct (the Hugging Face shape), False when
    they are top-level columns; a missing language or a column that is not text names the file."""
    struct = src_lang not in schema.names and tgt_lang not in schema.names and "translation" in schema.names
    if struct:
        copies = schema.names.count("translation")
        if copies > 1:
            raise PipelineError(f"{path}: column translation appears {copies} times; keep one")
        kind = schema.field("translation").type
        if not pa.types.is_struct(kind):
            raise PipelineError(f"{path}: column 'translation' holds {kind}, expected a struct of languages")
        columns = list(kind)
    else:
        columns = list(schema)
    fields = {field.name: field.type for field in columns}
    prefix = "translation." if struct else ""
    for lang in (src_lang, tgt_lang):
        # Arrow keeps both of two same-named columns, and then cannot say which one a name means.
        copies = sum(field.name == lang for field in columns)
        if copies > 1:
            raise PipelineError(
                f"{path}: column {prefix}{lang} appears {copies} times; keep one column per language"
            )
        if lang not in fields:
            raise PipelineError(
                f"{path}: no column {prefix}{lang} (columns: {', '.join(fields) or 'none'});"
                " expected a string column per language, or a translation struct of them"
            )
        if not (pa.types.is_string(fields[lang]) or pa.types.is_large_string(fields[lang])):
            raise PipelineError(f"{path}: column {prefix}{lang} holds {fields[lang]}, expected strings")
    return struct


def _parquet_rows(
    path: Path, parquet: pq.ParquetFile, struct: bool, langs: tuple[str, str], cap: int | None
) -> Iterator[Pair]:
    """(source, target) per row, a record batch in memory at a time; rows are counted from 1, as lines."""
    first_row = 1
    n_pairs = 0
    try:
        batches = parquet.iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=["translation"] if struct else list(langs)
        )
        for batch in batches:
            table = pa.Table.from_batches([batch])
            if struct:  # translation.de, translation.en -> de, en
                flat = table.flatten()
                table = flat.rename_columns([name.removeprefix("translation.") for name in flat.column_names])
            sides = [_parquet_texts(path, table, lang, first_row) for lang in langs]
            for src, tgt in zip(*sides, strict=True):
                if cap is not None and n_pairs >= cap:
                    return
                n_pairs += 1
                yield src, tgt
            first_row += batch.num_rows
    except (OSError, pa.ArrowException) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def _parquet_texts(path: Path, table: pa.Table, lang: str, first_row: int) -> list[str]:
    """One language's column of a batch as Python strings; a null or a bad byte names its row (Arrow
    does not check that a Parquet file's strings are UTF-8)."""
    column = table.column(lang)
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise PipelineError(f"{path}: row {row}: {lang!r} is null; expected text in every row")
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for offset, raw in enumerate(column.cast(pa.binary()).to_pylist()):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PipelineError(
                    f"{path}: row {first_row + offset}: {lang!r} is invalid UTF-8"
                    f" ({error.reason} at byte {error.start})"
                ) from None
        raise


__all__ = ["decode_lines", "load_folder_splits", "read_lines"]
