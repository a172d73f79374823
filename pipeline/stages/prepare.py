"""Stage `prepare`: corpus -> cleaned train/validation/test pairs.

Writes data/prepared (`pipeline.data.prepared`), reports/prepare_stats.json (everything: pairs loaded and
kept, drops by reason, length percentiles) and reports/prepare_metrics.json (the headline figures that
`dvc metrics show` and `dvc exp show` list). Everything is loaded and checked in memory first; nothing is
written unless the whole corpus passed.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.data.cleaning import PreparedCorpus, clean_corpus, prepare_stats
from pipeline.data.prepared import save_prepared
from pipeline.data.sources import RawCorpus, load_corpus
from pipeline.files import write_json

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    corpus = load_corpus(config.data)
    prepared = clean_corpus(corpus, config.data)
    stats = prepare_stats(corpus, prepared)
    save_prepared(prepared, corpus, paths.PREPARED_DIR)
    write_json(paths.PREPARE_STATS, stats)
    write_json(paths.PREPARE_METRICS, headline_metrics(stats))
    logger.info(_summary(corpus, prepared))


def headline_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """Pairs per split and pairs dropped: the columns worth comparing across experiments."""
    return {"pairs": stats["pairs"], "dropped_total": stats["dropped_total"]}


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
