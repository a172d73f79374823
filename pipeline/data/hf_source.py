"""The `hf:<dataset>[:<config>]` source: a Hugging Face dataset as (source, target) pairs per split.

Loaded with `datasets.load_dataset`, or with `datasets.load_from_disk` when `<dataset>` is a folder written
by `save_to_disk`. Either a `translation` column of `{lang: text}` (wmt16 style) or one column per language
(bentrevett/multi30k style). Problems are `PipelineError`s naming the dataset, split and row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.sources import Pair, RawSplit, resolve_split_names, split_cap
from pipeline.errors import PipelineError


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:<dataset>[:<config>]` -> (dataset, config). A path that exists is taken whole, colons and all."""
    rest = source[3:]
    if ":" not in rest or Path(rest).exists():
        return rest, None
    name, _, subset = rest.rpartition(":")
    return name, subset or None


def load_hf_splits(config: DataConfig) -> dict[str, RawSplit]:
    name, subset = parse_hf_source(config.source)
    dataset = _open_hf_dataset(name, subset)
    described = f"hf:{name}" + (f":{subset}" if subset else "")
    resolved = resolve_split_names(list(dataset), config.split_names, f"dataset {described}")
    splits = {}
    for canonical, split_name in resolved.items():
        where = f"dataset {described}, split {split_name!r}"
        split = dataset[split_name]
        cap = split_cap(config, canonical)
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


__all__ = ["load_hf_splits", "parse_hf_source"]
