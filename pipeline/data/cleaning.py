"""Normalise text, drop pairs a model should not learn from, and carve validation/test splits when missing.

Policy, and why:

* Every split gets the same text normalisation (Unicode NFC, control characters removed, whitespace runs
  collapsed to one space, ends stripped) and loses pairs with an empty side: an empty reference cannot be
  scored and an empty source cannot be translated.
* Only training pairs are filtered by length (`data.max_chars` characters; `data.max_tokens`,
  `data.max_length_ratio`, counted in whitespace tokens) and de-duplicated. A validation or test split
  that the source provides is kept otherwise whole, so BLEU stays comparable with published figures on
  the same test set.
* Training pairs that also occur (after normalisation) in the validation or test split are dropped from
  train, never from the evaluation split: otherwise the model is scored on sentences it memorised.
* A split the source lacks is carved from the cleaned, de-duplicated training pairs with a shuffle seeded
  by `data.seed`, so carved splits never share a pair with train and the same input gives the same split.

Memory is bounded by a batch, not by the corpus: pairs stream from the source through the policy into
Arrow files. What must see the whole corpus (de-duplication, the overlap filter, carving, length
percentiles) keeps 8 bytes of pair digest and 8 bytes of lengths per pair, in numpy arrays. Training pairs
go to a temporary file on the first pass; the second pass reads it back batch by batch and writes each
pair to its final split.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import SPLITS, DataConfig
from pipeline.data.arrow_text import BATCH_ROWS, TextPairWriter, iter_batches
from pipeline.data.prepared import SPLIT_FILE
from pipeline.data.sources import Pair, RawCorpus
from pipeline.errors import PipelineError
from pipeline.network.tokenization import clean_text

logger = logging.getLogger(__name__)

DROP_REASONS = ("empty", "too_many_chars", "too_long", "length_ratio", "duplicate", "in_eval_split")
EVAL_DROP_REASONS = ("empty",)  # the only filter evaluation splits get (see above)
# Below this many pairs a carved validation or test split is noise rather than a measurement: warn.
MIN_CARVED_PAIRS = 100
_CLEANED_TRAIN = ".train-cleaned.arrow"  # first-pass training pairs, removed once the splits are written


def n_tokens(text: str) -> int:
    """Whitespace tokens of cleaned text (the unit of `data.max_tokens` and the length statistics)."""
    return len(text.split()) if text else 0


def pair_digest(src: str, tgt: str) -> int:
    """8 bytes that stand for a cleaned pair in de-duplication (collisions: ~1 in 10^8 at 10^6 pairs)."""
    # Cleaned text has no control characters, so "\0" cannot occur inside either side.
    data = f"{src}\0{tgt}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class PreparedCorpus:
    """Where the cleaned splits were written and what happened on the way."""

    pairs: dict[str, int]  # pairs per split written
    loaded: dict[str, int]  # pairs per split as the source gave them (carved splits: absent)
    # split -> reason -> pairs dropped; every reason that applies to the split, zeros included
    dropped: dict[str, dict[str, int]]
    carved: tuple[str, ...]  # splits carved out of train because the source had none
    lengths: dict[str, dict[str, dict[str, int]]]  # split -> "src"/"tgt" -> length percentiles


@dataclass
class _CleanedSplit:
    """First-pass bookkeeping for one split: per-pair digests and lengths, in growing numpy chunks."""

    loaded: int = 0
    written: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    digests: list[np.ndarray] = field(default_factory=list)
    src_len: list[np.ndarray] = field(default_factory=list)
    tgt_len: list[np.ndarray] = field(default_factory=list)

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(digests, source lengths, target lengths), joined once the first pass is over."""
        return (
            np.concatenate(self.digests) if self.digests else np.zeros(0, np.uint64),
            np.concatenate(self.src_len) if self.src_len else np.zeros(0, np.int32),
            np.concatenate(self.tgt_len) if self.tgt_len else np.zeros(0, np.int32),
        )


def clean_corpus(corpus: RawCorpus, config: DataConfig, folder: Path) -> PreparedCorpus:
    """Apply the policy in the module docstring, writing folder/{split}.arrow for every canonical split.

    PipelineError (before anything is final: the caller writes into a temporary folder) when the source
    is bad or a split ends up empty.
    """
    dropped = {
        name: dict.fromkeys(DROP_REASONS if name == "train" else EVAL_DROP_REASONS, 0) for name in SPLITS
    }
    cleaned: dict[str, _CleanedSplit] = {}
    for name, raw in corpus.splits.items():
        target = folder / (_CLEANED_TRAIN if name == "train" else SPLIT_FILE.format(split=name))
        cleaned[name] = _clean_into(raw.pairs, config if name == "train" else None, target)
        dropped[name].update(cleaned[name].reasons)
        if name != "train" and not cleaned[name].written:
            raise PipelineError(_empty_split_message(name, corpus, cleaned[name], dropped[name]))

    digests, src_len, tgt_len = cleaned["train"].arrays
    eval_digests = [cleaned[name].arrays[0] for name in ("validation", "test") if name in cleaned]
    keep, reasons = dedupe_mask(digests, np.concatenate(eval_digests) if eval_digests else digests[:0])
    dropped["train"].update(reasons)
    if not keep.any():
        raise PipelineError(_empty_split_message("train", corpus, cleaned["train"], dropped["train"]))

    carved = tuple(name for name in ("validation", "test") if name not in corpus.splits)
    labels = np.full(len(keep), -1, dtype=np.int8)  # per first-pass pair: index into SPLITS, -1 dropped
    labels[keep] = carve_assignment(int(keep.sum()), carved, config)
    pairs = _write_train_and_carved(folder, labels)
    lengths = {}
    for index, name in enumerate(SPLITS):
        if name in carved or name == "train":
            chosen = labels == index
            lengths[name] = {
                "src": length_percentiles(src_len[chosen]),
                "tgt": length_percentiles(tgt_len[chosen]),
            }
        else:
            _, src, tgt = cleaned[name].arrays
            lengths[name] = {"src": length_percentiles(src), "tgt": length_percentiles(tgt)}
            pairs[name] = cleaned[name].written
    loaded = {name: split.loaded for name, split in cleaned.items()}
    return PreparedCorpus({name: pairs[name] for name in SPLITS}, loaded, dropped, carved, lengths)


def _clean_into(pairs: Iterable[Pair], filters: DataConfig | None, target: Path) -> _CleanedSplit:
    """First pass over one split: normalise, filter, write the kept pairs, keep their digests and lengths."""
    result = _CleanedSplit()
    writer = TextPairWriter(target)
    stream: Iterator[Pair] = iter(pairs)
    try:
        while chunk := list(islice(stream, BATCH_ROWS)):
            result.loaded += len(chunk)
            sources, targets = zip(*chunk, strict=True)
            batch = clean_batch(sources, targets, filters)
            result.reasons.update(batch.reasons())
            writer.write(src=batch.sources, tgt=batch.targets)
            result.digests.append(batch.digests)
            result.src_len.append(batch.src_len)
            result.tgt_len.append(batch.tgt_len)
    finally:
        result.written = writer.close()
    return result


@dataclass(frozen=True)
class CleanedBatch:
    """One batch through the per-pair policy: a drop code for every input pair (-1 kept, else the index
    in DROP_REASONS), and the kept pairs' cleaned text, digests and whitespace-token lengths."""

    codes: np.ndarray  # int8, one per input pair
    sources: list[str]
    targets: list[str]
    digests: np.ndarray  # uint64, one per kept pair
    src_len: np.ndarray  # int32
    tgt_len: np.ndarray  # int32

    def reasons(self) -> Counter[str]:
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(DROP_REASONS))
        return Counter(
            {reason: int(count) for reason, count in zip(DROP_REASONS, counts, strict=True) if count}
        )


def clean_batch(sources: Sequence[str], targets: Sequence[str], filters: DataConfig | None) -> CleanedBatch:
    """The per-pair part of the policy, for a batch: normalise, then drop by `drop_reason`. Both engines
    (the local stream and Ray Data's map tasks) call this, so they clean alike."""
    codes = np.full(len(sources), -1, dtype=np.int8)
    kept_src, kept_tgt = [], []
    for position, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        src, tgt = clean_text(src), clean_text(tgt)
        reason = drop_reason((src, tgt), filters)
        if reason is not None:
            codes[position] = DROP_REASONS.index(reason)
            continue
        kept_src.append(src)
        kept_tgt.append(tgt)
    return CleanedBatch(
        codes,
        kept_src,
        kept_tgt,
        np.fromiter(map(pair_digest, kept_src, kept_tgt), dtype=np.uint64, count=len(kept_src)),
        np.fromiter(map(n_tokens, kept_src), dtype=np.int32, count=len(kept_src)),
        np.fromiter(map(n_tokens, kept_tgt), dtype=np.int32, count=len(kept_tgt)),
    )


def drop_reason(pair: Pair, filters: DataConfig | None) -> str | None:
    """Why a cleaned pair is dropped (None: kept); length filters only when `filters` is given."""
    if not pair[0] or not pair[1]:
        return "empty"
    if filters is None:
        return None
    if max(len(pair[0]), len(pair[1])) > filters.max_chars:
        return "too_many_chars"
    shorter, longer = sorted((n_tokens(pair[0]), n_tokens(pair[1])))
    if longer > filters.max_tokens:
        return "too_long"
    if longer / shorter > filters.max_length_ratio:
        return "length_ratio"
    return None


def dedupe_mask(digests: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, Counter[str]]:
    """Which training pairs to keep: the first occurrence of each, and none that an evaluation split has."""
    in_eval = np.isin(digests, held_out)
    candidates = np.flatnonzero(~in_eval)
    _, first = np.unique(digests[candidates], return_index=True)
    keep = np.zeros(len(digests), dtype=bool)
    keep[candidates[first]] = True
    reasons = Counter({"in_eval_split": int(in_eval.sum()), "duplicate": int(len(candidates) - len(first))})
    return keep, reasons


def carve_assignment(n_pairs: int, missing: tuple[str, ...], config: DataConfig) -> np.ndarray:
    """For each of n_pairs kept training pairs, the index in SPLITS of the split it goes to.

    A seeded random `{split}_fraction` (at least one pair) goes to each missing split, the rest stays in
    train; pairs keep their order within every split, so the result depends only on the input and
    `data.seed`.
    """
    assignment = np.zeros(n_pairs, dtype=np.int8)  # SPLITS.index("train") == 0
    if not missing:
        return assignment
    fractions = {"validation": config.validation_fraction, "test": config.test_fraction}
    sizes = {name: max(1, round(n_pairs * fractions[name])) for name in missing}
    if n_pairs - sum(sizes.values()) < 1:
        raise PipelineError(
            f"only {n_pairs} training pairs remain after cleaning: too few to carve "
            f"{' and '.join(missing)} split(s) out of them; use a larger corpus"
        )
    tiny = {name: size for name, size in sizes.items() if size < MIN_CARVED_PAIRS}
    if tiny:
        logger.warning(
            "carved %s out of %d training pairs: scores on fewer than %d sentences vary by several points"
            " from one seed to the next; use a larger corpus or larger data.*_fraction",
            " and ".join(
                f"{size} {name} pair(s) (data.{name}_fraction={fractions[name]:g})"
                for name, size in tiny.items()
            ),
            n_pairs,
            MIN_CARVED_PAIRS,
        )
    order = np.random.default_rng(config.seed).permutation(n_pairs)
    start = 0
    for name in missing:
        assignment[order[start : start + sizes[name]]] = SPLITS.index(name)
        start += sizes[name]
    return assignment


def _write_train_and_carved(folder: Path, labels: np.ndarray) -> dict[str, int]:
    """Second pass: the first-pass training file, batch by batch, split by `labels` into the final files."""
    cleaned = folder / _CLEANED_TRAIN
    targets = {index: name for index, name in enumerate(SPLITS) if (labels == index).any() or name == "train"}
    writers = {
        index: TextPairWriter(folder / SPLIT_FILE.format(split=name)) for index, name in targets.items()
    }
    start = 0
    for batch in iter_batches(cleaned):
        batch_labels = labels[start : start + batch.num_rows]
        start += batch.num_rows
        for index, writer in writers.items():
            writer.write_batch(batch.filter(pa.array(batch_labels == index)))
    counts = {targets[index]: writer.close() for index, writer in writers.items()}
    cleaned.unlink()
    return counts


def _empty_split_message(name: str, corpus: RawCorpus, split: _CleanedSplit, dropped: dict[str, int]) -> str:
    counts = ", ".join(f"{reason}={count}" for reason, count in dropped.items() if count) or "none"
    hint = " (see data.max_chars, data.max_tokens and data.max_length_ratio)" if name == "train" else ""
    return (
        f"the {name} split is empty after cleaning: {split.loaded} pairs loaded from "
        f"{corpus.splits[name].origin}, dropped by reason: {counts}{hint}"
    )


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max by the nearest-rank method (an actual length, so integers)."""
    return counted_percentiles(np.bincount(np.asarray(lengths, dtype=np.int64)))


def counted_percentiles(counts: np.ndarray) -> dict[str, int]:
    """`length_percentiles` from a histogram (counts[n]: how many have length n): exact, and a histogram
    adds up across batches and processes, so no process keeps one length per pair."""
    total = int(counts.sum()) if len(counts) else 0
    if not total:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    cumulative = np.cumsum(counts)

    def rank(p: float) -> int:
        return int(np.searchsorted(cumulative, max(1, math.ceil(p / 100 * total))))

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": int(np.flatnonzero(counts)[-1])}


def prepare_stats(corpus: RawCorpus, prepared: PreparedCorpus) -> dict:
    """The prepare report: nested dicts of numbers, which `dvc metrics show` flattens to dotted keys."""
    return {
        "source": corpus.source,
        "hub": corpus.hub.record() if corpus.hub else None,
        "src_lang": corpus.src_lang,
        "tgt_lang": corpus.tgt_lang,
        "pairs": prepared.pairs,
        "loaded": {name: prepared.loaded.get(name, 0) for name in SPLITS},
        "carved": {name: name in prepared.carved for name in ("validation", "test")},
        "dropped": prepared.dropped,
        "dropped_total": sum(sum(reasons.values()) for reasons in prepared.dropped.values()),
        "length": prepared.lengths,
    }
