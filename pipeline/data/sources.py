"""Read a parallel corpus from `data.source` into memory, as (source, target) pairs per canonical split.

Three kinds of source, picked by the value of `data.source`:

* `builtin`: the synthetic corpus of `pipeline.data.builtin_corpus` (training pairs only).
* `hf:<dataset>[:<config>]`: a Hugging Face dataset, loaded with `datasets.load_dataset`, or with
  `datasets.load_from_disk` when `<dataset>` is a folder written by `save_to_disk`. Either a `translation`
  column of `{lang: text}` (wmt16 style) or one column per language (bentrevett/multi30k style).
* a local folder of `{split}.{lang}` plain-text pairs (Moses / Multi30k convention, optionally `.gz`),
  `{split}.tsv` (header row of language codes) or `{split}.jsonl` (objects keyed by language).

Every problem with the input is a `PipelineError` that names the file and line (or the dataset, split and
row), raised while loading, so the prepare stage can refuse bad data before it writes anything.
Text is returned exactly as stored (apart from the line ending); cleaning is `pipeline.data.cleaning`'s job.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from pipeline.config import SPLITS, DataConfig
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

# Names a source may use for the canonical splits when `data.split_names` leaves them unset.
VALIDATION_ALIASES = ("validation", "valid", "val", "dev")
TEST_ALIAS = "test"


@dataclass(frozen=True)
class RawSplit:
    """The pairs of one split and where they came from (quoted in later error messages)."""

    pairs: list[Pair]
    origin: str


@dataclass(frozen=True)
class RawCorpus:
    """Pairs per canonical split: always "train"; "validation" and "test" when the source has them."""

    source: str
    src_lang: str
    tgt_lang: str
    splits: dict[str, RawSplit]


def load_corpus(config: DataConfig) -> RawCorpus:
    """Load the corpus named by `config.source`; `config.max_examples` keeps the first N training pairs.

    The cap applies in source order, before cleaning, so fewer pairs may remain after filtering. Local files
    are still read to the end, so a line-count mismatch or bad byte further down is reported all the same.
    """
    if config.source == "builtin":
        splits = _load_builtin(config)
    elif config.source.startswith("hf:"):
        splits = _load_hf(config)
    else:
        splits = _load_folder(config)
    for name, split in splits.items():
        logger.info("loaded %d %s pairs from %s", len(split.pairs), name, split.origin)
    return RawCorpus(config.source, config.src_lang, config.tgt_lang, splits)


# --------------------------------------------------------------------------------------------- split names


def resolve_split_names(
    available: Collection[str], split_names: Mapping[str, str], where: str
) -> dict[str, str]:
    """Map canonical split -> the source's name for it, from `data.split_names` or by convention.

    Train must exist. A validation/test split that `split_names` names must exist too; an unnamed one is
    auto-detected and simply absent when the source has none (prepare then carves it out of train).
    """
    resolved: dict[str, str] = {}
    for canonical in SPLITS:
        if canonical in split_names:
            name = split_names[canonical]
            if name not in available:
                raise PipelineError(
                    f"data.split_names.{canonical} is {name!r}, but {where} has no such split "
                    f"(found: {_listing(available)})"
                )
            resolved[canonical] = name
            continue
        detected = _detect_split(canonical, available, where)
        if detected is not None:
            resolved[canonical] = detected
    if "train" not in resolved:
        raise PipelineError(
            f"{where} has no training split named 'train' (found: {_listing(available)}); "
            "set data.split_names.train"
        )
    by_name: dict[str, str] = {}
    for canonical, name in resolved.items():
        if name in by_name:
            raise PipelineError(
                f"{where}: split {name!r} would serve as both {by_name[name]} and {canonical}; "
                "set data.split_names to tell them apart"
            )
        by_name[name] = canonical
    return resolved


def _detect_split(canonical: str, available: Collection[str], where: str) -> str | None:
    if canonical == "train":
        return "train" if "train" in available else None
    if canonical == "validation":
        candidates = [name for name in VALIDATION_ALIASES if name in available]
    elif TEST_ALIAS in available:
        candidates = [TEST_ALIAS]
    else:
        # Multi30k names its test sets test_2016_flickr, test_2017_mscoco, ...: take one only if unique.
        candidates = sorted(name for name in available if name.startswith(TEST_ALIAS))
    if len(candidates) > 1:
        raise PipelineError(
            f"{where} has several candidate {canonical} splits: {', '.join(candidates)}; "
            f"choose one with data.split_names.{canonical}"
        )
    return candidates[0] if candidates else None


def _listing(names: Collection[str]) -> str:
    return ", ".join(sorted(names)) or "nothing"


def _cap(config: DataConfig, canonical: str) -> int | None:
    return config.max_examples if canonical == "train" else None


# ------------------------------------------------------------------------------------------------- builtin


def _load_builtin(config: DataConfig) -> dict[str, RawSplit]:
    from pipeline.data.builtin_corpus import generate_corpus

    if config.split_names:
        logger.warning("data.split_names is ignored: the builtin corpus has one split, train")
    n_pairs = config.builtin.n_pairs
    if config.max_examples is not None:
        # generate_corpus(n) is a prefix of generate_corpus(m) for n < m: capping here equals "first N".
        n_pairs = min(n_pairs, config.max_examples)
    origin = f"builtin corpus (n_pairs={n_pairs}, seed={config.builtin.seed})"
    return {"train": RawSplit(generate_corpus(n_pairs, config.builtin.seed), origin)}


# ------------------------------------------------------------------------------------------ Hugging Face


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:<dataset>[:<config>]` -> (dataset, config). A path that exists is taken whole, colons and all."""
    rest = source[3:]
    if ":" not in rest or Path(rest).exists():
        return rest, None
    name, _, subset = rest.rpartition(":")
    return name, subset or None


def _load_hf(config: DataConfig) -> dict[str, RawSplit]:
    name, subset = parse_hf_source(config.source)
    dataset = _open_hf_dataset(name, subset)
    described = f"hf:{name}" + (f":{subset}" if subset else "")
    resolved = resolve_split_names(list(dataset), config.split_names, f"dataset {described}")
    splits = {}
    for canonical, split_name in resolved.items():
        where = f"dataset {described}, split {split_name!r}"
        split = dataset[split_name]
        cap = _cap(config, canonical)
        if cap is not None and cap < len(split):
            split = split.select(range(cap))
        splits[canonical] = RawSplit(_hf_pairs(split, config.src_lang, config.tgt_lang, where), where)
    return splits


def _open_hf_dataset(name: str, subset: str | None) -> Mapping[str, Any]:
    """A DatasetDict-like mapping of split name -> Dataset; a lone Dataset counts as the train split."""
    import datasets

    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not path.exists():
        # Without this, datasets would ask the Hub about a path and retry for ~30 s before failing.
        raise PipelineError(f"data.source {name!r}: no such folder")
    try:
        if _is_saved_to_disk(path):
            if subset is not None:
                raise PipelineError(
                    f"{name} was written by save_to_disk and has no configs; drop ':{subset}'"
                )
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(name, subset)
    except PipelineError:
        raise
    # datasets raises many types here (ConnectionError, FileNotFoundError, ValueError, ...).
    except Exception as error:
        shown = name + (f" (config {subset!r})" if subset else "")
        raise PipelineError(
            f"could not load Hugging Face dataset {shown}: {type(error).__name__}: {error}"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if not isinstance(loaded, datasets.DatasetDict):
        raise PipelineError(f"dataset {name}: expected a DatasetDict, got {type(loaded).__name__}")
    return loaded


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _hf_pairs(split: Any, src_lang: str, tgt_lang: str, where: str) -> list[Pair]:
    columns = list(split.column_names)
    if src_lang in columns and tgt_lang in columns:
        sources, targets = list(split[src_lang]), list(split[tgt_lang])
    elif "translation" in columns:
        sources, targets = _translation_column(list(split["translation"]), src_lang, tgt_lang, where)
    else:
        raise PipelineError(
            f"{where}: no columns {src_lang!r} and {tgt_lang!r} and no 'translation' column; "
            f"columns found: {', '.join(columns)} (check data.src_lang / data.tgt_lang)"
        )
    for row, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise PipelineError(f"{where}, row {row}: expected two strings, got {src!r} and {tgt!r}")
    return list(zip(sources, targets, strict=True))


def _translation_column(rows: list[Any], src_lang: str, tgt_lang: str, where: str) -> tuple[list, list]:
    sources, targets = [], []
    for row, entry in enumerate(rows):
        if not isinstance(entry, dict) or entry.get(src_lang) is None or entry.get(tgt_lang) is None:
            found = (
                ", ".join(k for k, v in entry.items() if v is not None) if isinstance(entry, dict) else entry
            )
            raise PipelineError(
                f"{where}, row {row}: the 'translation' column has no {src_lang!r}/{tgt_lang!r} "
                f"(languages found: {found}; check data.src_lang / data.tgt_lang)"
            )
        sources.append(entry[src_lang])
        targets.append(entry[tgt_lang])
    return sources, targets


# ---------------------------------------------------------------------------------------------- local folder


@dataclass(frozen=True)
class _SplitFiles:
    """The file(s) holding one split in a local folder: two parallel text files, or one tsv/jsonl file."""

    kind: str  # "text" | "tsv" | "jsonl"
    paths: tuple[Path, ...]

    @property
    def origin(self) -> str:
        return " + ".join(str(path) for path in self.paths)


def _load_folder(config: DataConfig) -> dict[str, RawSplit]:
    folder = Path(config.source).expanduser()
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
    readers: dict[str, Callable[[_SplitFiles, str, str, int | None], list[Pair]]] = {
        "text": _read_text_pair,
        "tsv": _read_tsv,
        "jsonl": _read_jsonl,
    }
    splits = {}
    for canonical, stem in resolved.items():
        files = found[stem]
        pairs = readers[files.kind](files, config.src_lang, config.tgt_lang, _cap(config, canonical))
        splits[canonical] = RawSplit(pairs, files.origin)
    return splits


def _missing_train_message(folder: Path, config: DataConfig, found: Mapping[str, _SplitFiles]) -> str:
    src, tgt = config.src_lang, config.tgt_lang
    expected = (
        f"{folder}/train.{src} and {folder}/train.{tgt} (optionally .gz), "
        f"{folder}/train.tsv or {folder}/train.jsonl"
    )
    present = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return (
        f"no training split in {folder} for {src}-{tgt}: expected {expected}; "
        f"splits found: {_listing(found)}; files present: {', '.join(present[:20]) or 'none'}"
    )


def _split_name_and_kind(filename: str, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    """`train.de.gz` -> ("train", "de"); `dev.tsv` -> ("dev", "tsv"); anything else -> None (ignored)."""
    name = filename[: -len(".gz")] if filename.endswith(".gz") else filename
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or suffix not in (src_lang, tgt_lang, "tsv", "jsonl"):
        return None
    return stem, suffix


def _scan_folder(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, _SplitFiles]:
    by_stem: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(folder.iterdir()):
        parsed = _split_name_and_kind(path.name, src_lang, tgt_lang) if path.is_file() else None
        if parsed is not None:
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
    if sum((has_text, "tsv" in files, "jsonl" in files)) > 1:
        raise PipelineError(
            f"{folder}: split {stem!r} is stored more than once "
            f"({', '.join(p.name for p in every)}); keep one format"
        )
    if "tsv" in files:
        return _SplitFiles("tsv", (files["tsv"][0],))
    if "jsonl" in files:
        return _SplitFiles("jsonl", (files["jsonl"][0],))
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
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise PipelineError(
                        f"{path}:{number}: invalid UTF-8 ({error.reason} at byte {error.start} of the line)"
                    ) from None
                text = text.removesuffix("\n").removesuffix("\r")
                yield number, text.removeprefix("\ufeff") if number == 1 else text
    except (OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def _read_text_pair(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> list[Pair]:
    src_path, tgt_path = files.paths
    pairs: list[Pair] = []
    n_src = n_tgt = 0
    for src_line, tgt_line in zip_longest(read_lines(src_path), read_lines(tgt_path)):
        n_src = src_line[0] if src_line is not None else n_src
        n_tgt = tgt_line[0] if tgt_line is not None else n_tgt
        # Past the end of the shorter file, keep counting so the message gives both totals.
        if src_line is not None and tgt_line is not None and (cap is None or len(pairs) < cap):
            pairs.append((src_line[1], tgt_line[1]))
    if n_src != n_tgt:
        raise PipelineError(
            f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}; "
            "line N of one must translate line N of the other"
        )
    return pairs


def _read_tsv(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> list[Pair]:
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
    src_col, tgt_col = columns.index(src_lang), columns.index(tgt_lang)
    pairs: list[Pair] = []
    for number, text in lines:
        if not text.strip():
            continue  # blank lines (e.g. a trailing one) carry no pair
        fields = text.split("\t")
        if len(fields) != len(columns):
            raise PipelineError(
                f"{path}:{number}: expected {len(columns)} tab-separated fields like the header, "
                f"found {len(fields)}"
            )
        if cap is None or len(pairs) < cap:
            pairs.append((fields[src_col], fields[tgt_col]))
    return pairs


def _read_jsonl(files: _SplitFiles, src_lang: str, tgt_lang: str, cap: int | None) -> list[Pair]:
    (path,) = files.paths
    pairs: list[Pair] = []
    for number, text in read_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise PipelineError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
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
        if cap is None or len(pairs) < cap:
            pairs.append((src, tgt))
    return pairs


__all__ = ["RawCorpus", "RawSplit", "load_corpus", "parse_hf_source", "read_lines", "resolve_split_names"]
