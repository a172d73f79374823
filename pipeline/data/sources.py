"""Open a parallel corpus from `data.source` as streams of (source, target) pairs per canonical split.

Three kinds of source, picked by the value of `data.source`:

* `builtin`: the synthetic corpus of `pipeline.data.builtin_corpus` (training pairs only).
* `hf:<dataset>[:<config>]`: a Hugging Face dataset, loaded with `datasets.load_dataset`, or with
  `datasets.load_from_disk` when `<dataset>` is a folder written by `save_to_disk`. Either a `translation`
  column of `{lang: text}` (wmt16 style) or one column per language (bentrevett/multi30k style).
* a local folder of `{split}.{lang}` plain-text pairs (Moses / Multi30k convention, optionally `.gz`),
  `{split}.tsv` (header row of language codes) or `{split}.jsonl` (objects keyed by language).

The Hugging Face loader is `pipeline.data.hf_source`, the local-folder readers `pipeline.data.folder_source`;
this module holds the entry point `load_corpus`, the corpus types and the split-name resolution both use.

Pairs are streamed, never held as a list: a corpus of any size costs one read buffer. What can be checked
up front (folders, file names, headers, split names, a Hub dataset's columns) is checked by `load_corpus`;
a problem further down a file (a bad byte, a malformed line, a line-count mismatch) is a `PipelineError`
naming the file and line (or the dataset, split and row), raised while the prepare stage reads the stream
into a temporary folder that it then discards, so bad data never leaves an output behind.
Text is returned exactly as stored (apart from the line ending); cleaning is `pipeline.data.cleaning`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import paths
from pipeline.config import SPLITS, DataConfig, source_path
from pipeline.data.builtin_corpus import iter_corpus
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

# Names a source may use for the canonical splits when `data.split_names` leaves them unset.
VALIDATION_ALIASES = ("validation", "valid", "val", "dev")
TEST_ALIAS = "test"


@dataclass(frozen=True)
class RawSplit:
    """The pairs of one split, read once as a stream, and where they came from (quoted in messages)."""

    pairs: Iterable[Pair]
    origin: str


@dataclass(frozen=True)
class HubVersion:
    """Which version of a Hugging Face dataset was read, in the fields MLflow's HuggingFaceDatasetSource
    names (path, config_name, revision), with each split's `datasets` fingerprint."""

    path: str
    config_name: str | None
    revision: str | None  # a Hub commit; None for a folder written by save_to_disk
    fingerprints: dict[str, str]

    def record(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "config_name": self.config_name,
            "revision": self.revision,
            "fingerprint": dict(self.fingerprints),
        }


@dataclass(frozen=True)
class RawCorpus:
    """Pairs per canonical split: always "train"; "validation" and "test" when the source has them."""

    source: str
    src_lang: str
    tgt_lang: str
    splits: dict[str, RawSplit]
    hub: HubVersion | None = None  # set for hf: sources


def load_corpus(config: DataConfig) -> RawCorpus:
    """Open the corpus named by `config.source`; `config.max_examples` keeps the first N training pairs.

    The cap applies in source order, before cleaning, so fewer pairs may remain after filtering. Local files
    are still read to the end, so a line-count mismatch or bad byte further down is reported all the same.
    """
    # The two readers are imported here, not at the top: each imports this module for its types (and only
    # the hf: source loads `datasets`).
    hub = None
    if config.source == "builtin":
        splits = _load_builtin(config)
    elif config.source.startswith("hf:"):
        from pipeline.data.hf_source import load_hf_splits

        splits, hub = load_hf_splits(config)
    else:
        from pipeline.data.folder_source import load_folder_splits

        splits = load_folder_splits(config)
        _warn_if_unversioned(config.source)
    for name, split in splits.items():
        logger.info("reading %s pairs from %s", name, split.origin)
    return RawCorpus(config.source, config.src_lang, config.tgt_lang, splits, hub)


def _warn_if_unversioned(source: str) -> None:
    """dvc.yaml lists corpus/ as prepare's dependency: a folder elsewhere is read, but DVC never hashes it."""
    if not source_path(source).resolve().is_relative_to(paths.CORPUS_DIR.resolve()):
        logger.warning(
            "data.source %s is outside %s/, which dvc.yaml lists as prepare's dependency: "
            "dvc status and dvc repro will not see edits to it (see %s/README.md)",
            source,
            paths.CORPUS_DIR,
            paths.CORPUS_DIR,
        )


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
                    f"(found: {split_listing(available)})"
                )
            resolved[canonical] = name
            continue
        detected = _detect_split(canonical, available, where)
        if detected is not None:
            resolved[canonical] = detected
    if "train" not in resolved:
        raise PipelineError(
            f"{where} has no training split named 'train' (found: {split_listing(available)}); "
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


def split_listing(names: Collection[str]) -> str:
    return ", ".join(sorted(names)) or "nothing"


def split_cap(config: DataConfig, canonical: str) -> int | None:
    return config.max_examples if canonical == "train" else None


# ------------------------------------------------------------------------------------------------- builtin


def _load_builtin(config: DataConfig) -> dict[str, RawSplit]:
    if config.split_names:
        logger.warning("data.split_names is ignored: the builtin corpus has one split, train")
    n_pairs = config.builtin.n_pairs
    if config.max_examples is not None:
        # iter_corpus(n) is a prefix of iter_corpus(m) for n < m: capping here equals "first N".
        n_pairs = min(n_pairs, config.max_examples)
    builtin = config.builtin
    origin = f"builtin corpus (n_pairs={n_pairs}, seed={builtin.seed})"
    return {"train": RawSplit(iter_corpus(n_pairs, builtin.seed, builtin.sentences_per_pair), origin)}


__all__ = [
    "HubVersion",
    "Pair",
    "RawCorpus",
    "RawSplit",
    "load_corpus",
    "resolve_split_names",
    "split_cap",
    "split_listing",
]
