"""Stage `prepare`: corpus -> cleaned train/validation/test pairs (data/prepared, reports/prepare_stats.json).

Everything is loaded and checked in memory first; nothing is written unless the whole corpus passed.
data/prepared is a `datasets.DatasetDict` (splits train/validation/test, string columns `src`, `tgt`) saved
with `save_to_disk`, plus `corpus.json` naming the source and languages so the next stage can tell when
data/prepared was made for another language pair.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json
from pipeline.config import PipelineConfig
from pipeline.data.cleaning import PreparedCorpus, clean_corpus, prepare_stats
from pipeline.data.sources import RawCorpus, load_corpus

logger = logging.getLogger(__name__)

CORPUS_INFO = "corpus.json"


def run(config: PipelineConfig) -> None:
    corpus = load_corpus(config.data)
    prepared = clean_corpus(corpus, config.data)
    stats = prepare_stats(corpus, prepared)
    save_prepared(prepared, corpus, paths.PREPARED_DIR)
    write_json(paths.PREPARE_STATS, stats)
    logger.info(_summary(corpus, prepared))


def save_prepared(prepared: PreparedCorpus, corpus: RawCorpus, target: Path) -> None:
    import datasets

    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    splits = {
        name: datasets.Dataset.from_dict(
            {"src": [src for src, _ in pairs], "tgt": [tgt for _, tgt in pairs]}, features=features
        )
        for name, pairs in prepared.splits.items()
    }
    with atomic_dir(target) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        write_json(
            tmp / CORPUS_INFO,
            {
                "source": corpus.source,
                "src_lang": corpus.src_lang,
                "tgt_lang": corpus.tgt_lang,
                "pairs": {name: len(pairs) for name, pairs in prepared.splits.items()},
            },
        )


def _summary(corpus: RawCorpus, prepared: PreparedCorpus) -> str:
    sizes = " / ".join(
        f"{name} {len(pairs):,}" + (" (carved)" if name in prepared.carved else "")
        for name, pairs in prepared.splits.items()
    )
    totals: dict[str, int] = {}
    for reasons in prepared.dropped.values():
        for reason, count in reasons.items():
            totals[reason] = totals.get(reason, 0) + count
    dropped = ", ".join(f"{count:,} {reason}" for reason, count in totals.items() if count) or "none"
    return (
        f"prepared {corpus.source} ({corpus.src_lang}->{corpus.tgt_lang}): {sizes} pairs; "
        f"dropped: {dropped} -> {paths.PREPARED_DIR}"
    )
