"""Normalise text, drop pairs a model should not learn from, and carve validation/test splits when missing.

Policy, and why:

* Every split gets the same text normalisation (Unicode NFC, control characters removed, whitespace runs
  collapsed to one space, ends stripped) and loses pairs with an empty side: an empty reference cannot be
  scored and an empty source cannot be translated.
* Only training pairs are filtered by length (`data.max_tokens`, `data.max_length_ratio`, counted in
  whitespace tokens) and de-duplicated. A validation or test split that the source provides is kept
  otherwise whole, so BLEU stays comparable with published figures on the same test set.
* Training pairs that also occur (after normalisation) in the validation or test split are dropped from
  train, never from the evaluation split: otherwise the model is scored on sentences it memorised.
* A split the source lacks is carved from the cleaned, de-duplicated training pairs with a shuffle seeded
  by `data.seed`, so carved splits never share a pair with train and the same input gives the same split.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.config import SPLITS, DataConfig
from pipeline.data.sources import Pair, RawCorpus
from pipeline.errors import PipelineError
from pipeline.network.tokenization import clean_text

DROP_REASONS = ("empty", "too_long", "length_ratio", "duplicate", "in_eval_split")
EVAL_DROP_REASONS = ("empty",)  # the only filter evaluation splits get (see above)


def n_tokens(text: str) -> int:
    """Whitespace tokens of cleaned text (the unit of `data.max_tokens` and the length statistics)."""
    return len(text.split()) if text else 0


@dataclass(frozen=True)
class PreparedCorpus:
    """Cleaned pairs for train, validation and test, and what happened on the way."""

    splits: dict[str, list[Pair]]
    loaded: dict[str, int]  # pairs per split as the source gave them (carved splits: absent)
    # split -> reason -> pairs dropped; every reason that applies to the split, zeros included
    dropped: dict[str, dict[str, int]]
    carved: tuple[str, ...]  # splits carved out of train because the source had none


def clean_corpus(corpus: RawCorpus, config: DataConfig) -> PreparedCorpus:
    """Apply the policy in the module docstring; PipelineError when a split ends up empty."""
    dropped = {
        name: dict.fromkeys(DROP_REASONS if name == "train" else EVAL_DROP_REASONS, 0) for name in SPLITS
    }
    splits: dict[str, list[Pair]] = {}
    for name, raw in corpus.splits.items():
        kept, reasons = clean_pairs(raw.pairs, config if name == "train" else None)
        dropped[name].update(reasons)
        splits[name] = kept

    eval_pairs = [pair for name in ("validation", "test") for pair in splits.get(name, [])]
    splits["train"], reasons = dedupe_training_pairs(splits["train"], eval_pairs)
    dropped["train"].update(reasons)
    for name in corpus.splits:
        if not splits[name]:
            raise PipelineError(_empty_split_message(name, corpus, dropped[name]))

    carved = tuple(name for name in ("validation", "test") if name not in splits)
    if carved:
        splits.update(carve_splits(splits.pop("train"), carved, config))
    loaded = {name: len(raw.pairs) for name, raw in corpus.splits.items()}
    return PreparedCorpus({name: splits[name] for name in SPLITS}, loaded, dropped, carved)


def clean_pairs(pairs: Iterable[Pair], filters: DataConfig | None) -> tuple[list[Pair], Counter[str]]:
    """Normalise both sides; drop empty pairs, and too long / badly proportioned ones when `filters` given."""
    kept: list[Pair] = []
    reasons: Counter[str] = Counter()
    for src, tgt in pairs:
        pair = (clean_text(src), clean_text(tgt))
        reason = _drop_reason(pair, filters)
        if reason is None:
            kept.append(pair)
        else:
            reasons[reason] += 1
    return kept, reasons


def _drop_reason(pair: Pair, filters: DataConfig | None) -> str | None:
    if not pair[0] or not pair[1]:
        return "empty"
    if filters is None:
        return None
    shorter, longer = sorted((n_tokens(pair[0]), n_tokens(pair[1])))
    if longer > filters.max_tokens:
        return "too_long"
    if longer / shorter > filters.max_length_ratio:
        return "length_ratio"
    return None


def dedupe_training_pairs(
    train: Sequence[Pair], eval_pairs: Iterable[Pair]
) -> tuple[list[Pair], Counter[str]]:
    """Keep the first occurrence of each training pair, and none that also occurs in an evaluation split."""
    held_out = set(eval_pairs)
    seen: set[Pair] = set()
    kept: list[Pair] = []
    reasons: Counter[str] = Counter()
    for pair in train:
        if pair in held_out:
            reasons["in_eval_split"] += 1
        elif pair in seen:
            reasons["duplicate"] += 1
        else:
            seen.add(pair)
            kept.append(pair)
    return kept, reasons


def carve_splits(train: Sequence[Pair], missing: Sequence[str], config: DataConfig) -> dict[str, list[Pair]]:
    """Move a seeded random `{split}_fraction` of `train` into each missing split (at least one pair each).

    Every split keeps the pairs' original order, so the result depends only on the input and `data.seed`.
    """
    fractions = {"validation": config.validation_fraction, "test": config.test_fraction}
    sizes = {name: max(1, round(len(train) * fractions[name])) for name in missing}
    if len(train) - sum(sizes.values()) < 1:
        raise PipelineError(
            f"only {len(train)} training pairs remain after cleaning: too few to carve "
            f"{' and '.join(missing)} split(s) out of them; use a larger corpus"
        )
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    result: dict[str, list[Pair]] = {}
    start = 0
    for name in missing:
        chosen = sorted(order[start : start + sizes[name]])
        result[name] = [train[i] for i in chosen]
        start += sizes[name]
    result["train"] = [train[i] for i in sorted(order[start:])]
    return result


def _empty_split_message(name: str, corpus: RawCorpus, dropped: dict[str, int]) -> str:
    counts = ", ".join(f"{reason}={count}" for reason, count in dropped.items() if count) or "none"
    raw = corpus.splits[name]
    hint = " (see data.max_tokens and data.max_length_ratio)" if name == "train" else ""
    return (
        f"the {name} split is empty after cleaning: {len(raw.pairs)} pairs loaded from {raw.origin}, "
        f"dropped by reason: {counts}{hint}"
    )


def length_percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """p50/p90/p99/max by the nearest-rank method (an actual length, so integers)."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(lengths)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def prepare_stats(corpus: RawCorpus, prepared: PreparedCorpus) -> dict:
    """The prepare report: nested dicts of numbers, which `dvc metrics show` flattens to dotted keys."""
    return {
        "source": corpus.source,
        "src_lang": corpus.src_lang,
        "tgt_lang": corpus.tgt_lang,
        "pairs": {name: len(pairs) for name, pairs in prepared.splits.items()},
        "loaded": {name: prepared.loaded.get(name, 0) for name in SPLITS},
        "carved": {name: name in prepared.carved for name in ("validation", "test")},
        "dropped": prepared.dropped,
        "dropped_total": sum(sum(reasons.values()) for reasons in prepared.dropped.values()),
        "length": {
            name: {
                "src": length_percentiles([n_tokens(src) for src, _ in pairs]),
                "tgt": length_percentiles([n_tokens(tgt) for _, tgt in pairs]),
            }
            for name, pairs in prepared.splits.items()
        },
    }
