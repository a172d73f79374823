"""Stage `prepare`: corpus -> cleaned train/validation/test pairs.

Writes data/prepared (`pipeline.data.prepared`), reports/prepare_stats.json (everything: pairs loaded and
kept, drops by reason, length percentiles) and reports/prepare_metrics.json (the headline figures that
`dvc metrics show` and `dvc exp show` list). The corpus streams through cleaning into a temporary folder,
so memory stays bounded whatever its size and nothing is replaced unless the whole corpus passed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import PipelineConfig
from pipeline.data.cleaning import PreparedCorpus, clean_corpus, prepare_stats
from pipeline.data.prepared import write_corpus_info
from pipeline.data.sources import RawCorpus, load_corpus
from pipeline.files import atomic_dir, outputs_together, write_json

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    corpus = load_corpus(config.data)
    with outputs_together():  # data/prepared and its statistics: all new, or all as they were
        with atomic_dir(paths.PREPARED_DIR) as folder:
            prepared = _clean(corpus, config, folder)
            write_corpus_info(folder, corpus, prepared.pairs)
        stats = prepare_stats(corpus, prepared)
        write_json(paths.PREPARE_STATS, stats)
        write_json(paths.PREPARE_METRICS, headline_metrics(stats))
    logger.info(_summary(corpus, prepared))


def _clean(corpus: RawCorpus, config: PipelineConfig, folder: Path) -> PreparedCorpus:
    """The cleaning policy, by the engine `data.engine` names: the same files either way."""
    if config.data.engine == "local":
        return clean_corpus(corpus, config.data, folder)
    from pipeline.data.ray_prepare import clean_corpus_ray  # Ray only when asked for
    from pipeline.training.ray_session import ray_session

    with ray_session():
        return clean_corpus_ray(corpus, config.data, folder)


def headline_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """Pairs per split and pairs dropped: the columns worth comparing across experiments; for a Hub
    dataset also the version read (revision and fingerprints), so an experiment names its data."""
    headline = {"pairs": stats["pairs"], "dropped_total": stats["dropped_total"]}
    if stats["hub"]:
        headline["hub"] = stats["hub"]
    return headline


def _summary(corpus: RawCorpus, prepared: PreparedCorpus) -> str:
    sizes = " / ".join(
        f"{name} {count:,}" + (" (carved)" if name in prepared.carved else "")
        for name, count in prepared.pairs.items()
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
