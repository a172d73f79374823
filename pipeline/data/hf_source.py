"""The `hf:<dataset>[:<config>]` source: a Hugging Face dataset as (source, target) pairs per split.

Loaded with `datasets.load_dataset`, or with `datasets.load_from_disk` when `<dataset>` is a folder written
by `save_to_disk`. Either a `translation` column of `{lang: text}` (wmt16 style) or one column per language
(bentrevett/multi30k style). Problems are `PipelineError`s naming the dataset, split and row.

Pairs are read from the dataset's Arrow files (the Hub cache or the saved folder) one batch at a time,
through a plain file handle rather than the memory map `datasets` opens (a map would keep every page read
resident until the end): `hf:wmt14:de-en` (4.5 M pairs) costs a batch of memory, not a copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from huggingface_hub import HfApi

from pipeline.config import DataConfig, source_path
from pipeline.data.arrow_text import BATCH_ROWS, iter_batches
from pipeline.data.sources import HubVersion, Pair, RawSplit, resolve_split_names, split_cap
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:<dataset>[:<config>]` -> (dataset, config). A path that exists is taken whole, colons and all."""
    rest = source[3:]
    if ":" not in rest or Path(rest).exists():
        return rest, None
    name, _, subset = rest.rpartition(":")
    return name, subset or None


def load_hf_splits(config: DataConfig) -> tuple[dict[str, RawSplit], HubVersion]:
    """The splits, and the version read: the pinned `data.revision`, else the commit the Hub names now."""
    name, subset = parse_hf_source(config.source)
    revision = resolve_revision(name, config.revision)
    dataset = _open_hf_dataset(name, subset, revision)
    described = f"hf:{name}" + (f":{subset}" if subset else "")
    resolved = resolve_split_names(list(dataset), config.split_names, f"dataset {described}")
    splits = {}
    for canonical, split_name in resolved.items():
        where = f"dataset {described}, split {split_name!r}"
        cap = split_cap(config, canonical)
        pairs = _hf_pairs(dataset[split_name], config.src_lang, config.tgt_lang, where, cap)
        splits[canonical] = RawSplit(pairs, where)
    if revision is None and not _is_local(name):  # offline: the commit the cache holds
        revision = _cached_revision(dataset)
    fingerprints = {canonical: str(dataset[split]._fingerprint) for canonical, split in resolved.items()}
    return splits, HubVersion(name, subset, revision, fingerprints)


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or source_path(name).exists()


def resolve_revision(name: str, revision: str | None) -> str | None:
    """The Hub commit to load: `revision` when it is one already, else what the Hub resolves it (or the
    default branch) to now, so prepare reads and records one fixed version even while the Hub moves.
    None for a local folder, and when the Hub cannot be asked (offline: the cached copy is read)."""
    if _is_local(name) or (revision is not None and _COMMIT.fullmatch(revision)):
        return revision
    try:
        return HfApi().dataset_info(name, revision=revision).sha
    # huggingface_hub raises its own errors, requests' and OfflineModeIsEnabled; datasets reports them
    # better, with the cache as a fallback, when it loads the dataset itself.
    except Exception as error:
        logger.info("could not resolve the Hub revision of %s (%s): reading what datasets finds", name, error)
        return revision


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _cached_revision(dataset: Mapping[str, Any]) -> str | None:
    """The commit in the cache path (…/<dataset>/<config>/<version>/<commit>/…arrow), where there is one."""
    for split in dataset.values():
        for entry in split.cache_files:
            for part in reversed(Path(entry["filename"]).parts):
                if _COMMIT.fullmatch(part):
                    return part
    return None


def _open_hf_dataset(name: str, subset: str | None, revision: str | None = None) -> Mapping[str, Any]:
    """A DatasetDict-like mapping of split name -> Dataset; a lone Dataset counts as the train split."""
    path = source_path(name)
    if _is_local(name) and not path.exists():
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
            loaded = datasets.load_dataset(name, subset, revision=revision)
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


def _hf_pairs(split: Any, src_lang: str, tgt_lang: str, where: str, cap: int | None) -> Iterator[Pair]:
    """Checks the columns now; the first `cap` rows are read, batch by batch, as the returned stream is."""
    columns = list(split.column_names)
    if src_lang in columns and tgt_lang in columns:
        return _stream_pairs(split, where, cap, lambda batch: (batch[src_lang], batch[tgt_lang]))
    if "translation" in columns:
        languages = _translation_languages(split)
        if languages is not None and not {src_lang, tgt_lang} <= set(languages):
            raise PipelineError(
                f"{where}: the 'translation' column has no {src_lang!r}/{tgt_lang!r} "
                f"(languages found: {', '.join(languages)}; check data.src_lang / data.tgt_lang)"
            )

        def translation(batch: Any) -> tuple[Any, Any]:
            struct = batch["translation"]
            if isinstance(struct, pa.ChunkedArray):  # a Table's column; a RecordBatch's is an Array
                struct = struct.combine_chunks()
            return struct.field(src_lang), struct.field(tgt_lang)

        return _stream_pairs(split, where, cap, translation)
    raise PipelineError(
        f"{where}: no columns {src_lang!r} and {tgt_lang!r} and no 'translation' column; "
        f"columns found: {', '.join(columns)} (check data.src_lang / data.tgt_lang)"
    )


def _translation_languages(split: Any) -> list[str] | None:
    """The language fields of a `translation` struct column; None when not a struct (checked per row)."""
    feature = split.features["translation"]
    languages = getattr(feature, "languages", None)  # datasets.Translation
    if languages:
        return list(languages)
    return list(feature) if isinstance(feature, dict) else None


def _arrow_batches(split: Any) -> Iterator[Any]:
    """The split's rows in order, an Arrow batch at a time: straight from its cache files when it is
    exactly their contents (as `load_dataset` and `load_from_disk` give it), else through `datasets`."""
    files = [Path(entry["filename"]) for entry in split.cache_files]
    if files and getattr(split, "_indices", None) is None and len(split) == split.data.num_rows:
        for path in files:
            yield from iter_batches(path)
    else:  # selected, shuffled or in memory: let datasets resolve the rows
        yield from split.with_format("arrow").iter(batch_size=BATCH_ROWS)


def _stream_pairs(split: Any, where: str, cap: int | None, pick: Any) -> Iterator[Pair]:
    row = 0
    for batch in _arrow_batches(split):
        if cap is not None and row + batch.num_rows > cap:
            batch = batch.slice(0, cap - row)
        sources, targets = (column.to_pylist() for column in pick(batch))
        for offset, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            if not isinstance(src, str) or not isinstance(tgt, str):
                raise PipelineError(
                    f"{where}, row {row + offset}: expected two strings, got {src!r} and {tgt!r}"
                )
        yield from zip(sources, targets, strict=True)
        row += len(sources)
        if cap is not None and row >= cap:
            return


__all__ = ["load_hf_splits", "parse_hf_source"]
