"""The prepare stage's cleaning as a Ray Data pipeline: the policy of `pipeline.data.cleaning`, the same
files, spread over every core of every node.

    read (the project's own readers, one stream per split) -> clean and filter (map tasks, `clean_batch`)
    -> de-duplicate and drop train/eval overlap (a hash-partitioned group-by on the pair digest)
    -> the seeded split (`carve_assignment`) -> data/prepared/{split}.arrow, in input order

Every row carries its position in the source (`index`), so the choice between duplicates is the local
engine's: the first occurrence (the smallest index) is kept. The driver holds numbers, never text it keeps:
the evaluation splits' digests (8 bytes a pair), a keep flag and a split label per training pair (the
seeded permutation that carves the splits needs them all, as in the local engine) and length histograms.
Text streams through it batch by batch on the way into the files it writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.aggregate import Count, Min

from pipeline.config import SPLITS, DataConfig
from pipeline.data.arrow_text import BATCH_ROWS, TextPairWriter
from pipeline.data.cleaning import (
    DROP_REASONS,
    EVAL_DROP_REASONS,
    PreparedCorpus,
    _CleanedSplit,
    _empty_split_message,
    carve_assignment,
    clean_batch,
    counted_percentiles,
)
from pipeline.data.prepared import SPLIT_FILE
from pipeline.data.ray_blocks import ordered_execution, read_stream, task_errors_as_pipeline_errors
from pipeline.data.sources import RawCorpus, load_corpus
from pipeline.errors import PipelineError

# Rows per block: the unit a map task cleans. Smaller than BATCH_ROWS so a corpus of a few blocks'
# worth still spreads over several cores.
BLOCK_ROWS = 5_000
_RAW = pa.schema([("index", pa.int64()), ("src", pa.string()), ("tgt", pa.string())])
_CLEANED = pa.schema(
    [
        ("index", pa.int64()),
        ("code", pa.int8()),  # -1 kept, else the index in DROP_REASONS
        ("src", pa.string()),  # "" for a dropped pair
        ("tgt", pa.string()),
        ("digest", pa.uint64()),
        ("src_len", pa.int32()),
        ("tgt_len", pa.int32()),
    ]
)


def clean_corpus_ray(corpus: RawCorpus, config: DataConfig, folder: Path) -> PreparedCorpus:
    """`cleaning.clean_corpus` on Ray Data (a Ray session must be up): the same files in `folder`, the same
    PreparedCorpus, the same PipelineError for a bad line or an empty split."""
    worker_config = _worker_config(corpus, config)
    dropped = {
        name: dict.fromkeys(DROP_REASONS if name == "train" else EVAL_DROP_REASONS, 0) for name in SPLITS
    }
    tallies: dict[str, _Tally] = {}
    with ordered_execution(), task_errors_as_pipeline_errors():
        # Train first, as the local engine reads it: a bad line in two splits is reported alike.
        train = _cleaned(worker_config, "train", config).materialize()  # cleaned once, read twice
        for name in ("validation", "test"):
            if name in corpus.splits:
                cleaned = _cleaned(worker_config, name, None)
                tallies[name] = _write_labelled(cleaned, {0: folder / SPLIT_FILE.format(split=name)}, None)
                dropped[name].update(tallies[name].reasons)
                if not tallies[name].written.get(0):
                    raise PipelineError(_empty_message(name, corpus, tallies[name], dropped[name]))
        held_out = np.concatenate([tallies[name].digests for name in tallies] or [np.zeros(0, np.uint64)])
        keep, candidates, filtered = _first_occurrences(train, held_out)
        dropped["train"].update(filtered)
        passed = int(train.count()) - sum(filtered.values())
        dropped["train"].update(
            {"in_eval_split": passed - candidates, "duplicate": candidates - int(keep.sum())}
        )
        if not keep.any():
            loaded = _Tally(loaded=int(train.count()))
            raise PipelineError(_empty_message("train", corpus, loaded, dropped["train"]))
        carved = tuple(name for name in ("validation", "test") if name not in corpus.splits)
        labels = np.full(len(keep), -1, dtype=np.int8)
        labels[keep] = carve_assignment(int(keep.sum()), carved, config)
        present = [i for i, name in enumerate(SPLITS) if name == "train" or (labels == i).any()]
        targets = {i: folder / SPLIT_FILE.format(split=SPLITS[i]) for i in present}
        tallies["train"] = _write_labelled(train, targets, labels)
    return _prepared(corpus, tallies, dropped, carved)


def _worker_config(corpus: RawCorpus, config: DataConfig) -> DataConfig:
    """The config a read task opens the source with: a Hub dataset pinned to the commit the driver
    resolved, so every task reads the version that is recorded and asks the Hub nothing."""
    if corpus.hub is not None and corpus.hub.revision:
        return config.model_copy(update={"revision": corpus.hub.revision})
    return config


def _read_split(config: DataConfig, name: str) -> Callable[[], Iterator[pa.Table]]:
    """The read task: the split through the project's own readers (their errors name file and line)."""

    def read() -> Iterator[pa.Table]:
        pairs = iter(load_corpus(config).splits[name].pairs)
        start = 0
        while chunk := list(islice(pairs, BATCH_ROWS)):
            sources, targets = zip(*chunk, strict=True)
            index = np.arange(start, start + len(chunk), dtype=np.int64)
            yield pa.table([index, list(sources), list(targets)], schema=_RAW)
            start += len(chunk)

    return read


def _cleaned(config: DataConfig, name: str, filters: DataConfig | None) -> ray.data.Dataset:
    raw = read_stream(_read_split(config, name), f"Read{name.capitalize()}Pairs", BLOCK_ROWS)
    return raw.map_batches(
        _clean_block, fn_kwargs={"filters": filters}, batch_format="pyarrow", batch_size=None
    )


def _clean_block(block: pa.Table, filters: DataConfig | None) -> pa.Table:
    """One block through `clean_batch`; dropped pairs stay as rows (code >= 0, no text) to be counted."""
    batch = clean_batch(block.column("src").to_pylist(), block.column("tgt").to_pylist(), filters)
    kept = batch.codes < 0
    n = len(batch.codes)
    src = np.full(n, "", dtype=object)
    tgt = np.full(n, "", dtype=object)
    src[kept], tgt[kept] = batch.sources, batch.targets
    digests, src_len, tgt_len = np.zeros(n, np.uint64), np.zeros(n, np.int32), np.zeros(n, np.int32)
    digests[kept], src_len[kept], tgt_len[kept] = batch.digests, batch.src_len, batch.tgt_len
    columns = [block.column("index"), batch.codes, src, tgt, digests, src_len, tgt_len]
    return pa.table(
        [pa.array(column, type=f.type) for column, f in zip(columns, _CLEANED, strict=True)], schema=_CLEANED
    )


def _candidates(block: pa.Table, held_out: np.ndarray) -> pa.Table:
    """The pairs that passed the filters and occur in no evaluation split: (digest, index)."""
    codes, digests = block.column("code").to_numpy(), block.column("digest").to_numpy()
    chosen = (codes < 0) & ~np.isin(digests, held_out)
    return pa.table({"digest": digests[chosen], "index": block.column("index").to_numpy()[chosen]})


def _first_occurrences(train: ray.data.Dataset, held_out: np.ndarray) -> tuple[np.ndarray, int, Counter[str]]:
    """(keep flag per training pair, candidates before de-duplication, drops by the per-pair filters).

    A group-by on the digest, hash-partitioned over the cluster, finds each distinct pair's first index;
    the driver receives one index per distinct pair, never the text."""
    codes = np.zeros(len(DROP_REASONS), np.int64)
    for batch in train.select_columns(["code"]).iter_batches(batch_format="numpy", batch_size=None):
        column = batch["code"]
        codes += np.bincount(column[column >= 0], minlength=len(DROP_REASONS))
    keep = np.zeros(int(train.count()), dtype=bool)
    candidates = 0
    distinct = train.map_batches(_candidates, fn_kwargs={"held_out": held_out}, batch_format="pyarrow")
    partitions = max(1, min(64, train.num_blocks()))
    grouped = distinct.groupby("digest", num_partitions=partitions).aggregate(Min("index"), Count())
    for batch in grouped.iter_batches(batch_format="numpy", batch_size=None):
        keep[batch["min(index)"]] = True
        candidates += int(batch["count()"].sum())
    filtered = Counter({reason: int(n) for reason, n in zip(DROP_REASONS, codes, strict=True) if n})
    return keep, candidates, filtered


@dataclass
class _Tally:
    """What the driver learns while it writes a split: counts and histograms, never text it keeps."""

    loaded: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    written: dict[int, int] = field(default_factory=dict)
    src_hist: dict[int, np.ndarray] = field(default_factory=dict)
    tgt_hist: dict[int, np.ndarray] = field(default_factory=dict)
    digest_parts: list[np.ndarray] = field(default_factory=list)

    @property
    def digests(self) -> np.ndarray:
        return np.concatenate(self.digest_parts) if self.digest_parts else np.zeros(0, np.uint64)

    def add_lengths(self, label: int, src_len: np.ndarray, tgt_len: np.ndarray) -> None:
        for hists, lengths in ((self.src_hist, src_len), (self.tgt_hist, tgt_len)):
            counts = np.bincount(lengths)
            old = hists.get(label, np.zeros(0, np.int64))
            size = max(len(old), len(counts))
            hists[label] = np.pad(old, (0, size - len(old))) + np.pad(counts, (0, size - len(counts)))


def _write_labelled(cleaned: ray.data.Dataset, targets: dict[int, Path], labels: np.ndarray | None) -> _Tally:
    """Stream the cleaned rows in order into one file per label (labels by row index; None: every kept
    row is label 0), counting drops and lengths on the way."""
    tally = _Tally()
    writers = {label: TextPairWriter(path) for label, path in targets.items()}
    try:
        for batch in cleaned.iter_batches(batch_format="pyarrow", batch_size=None):
            codes = batch.column("code").to_numpy()
            tally.loaded += len(codes)
            tally.reasons.update(
                {DROP_REASONS[code]: int(n) for code, n in enumerate(np.bincount(codes[codes >= 0])) if n}
            )
            row_labels = (
                np.where(codes < 0, 0, -1) if labels is None else labels[batch.column("index").to_numpy()]
            )
            if labels is None:
                tally.digest_parts.append(batch.column("digest").to_numpy()[codes < 0])
            src_len, tgt_len = batch.column("src_len").to_numpy(), batch.column("tgt_len").to_numpy()
            for label, writer in writers.items():
                chosen = row_labels == label
                if chosen.any():
                    writer.write_batch(batch.filter(pa.array(chosen)).select(["src", "tgt"]))
                    tally.add_lengths(label, src_len[chosen], tgt_len[chosen])
    finally:
        tally.written = {label: writer.close() for label, writer in writers.items()}
    return tally


def _empty_message(name: str, corpus: RawCorpus, tally: _Tally, dropped: dict[str, int]) -> str:
    return _empty_split_message(name, corpus, _CleanedSplit(loaded=tally.loaded), dropped)


def _prepared(
    corpus: RawCorpus, tallies: dict[str, _Tally], dropped: dict[str, dict[str, int]], carved: tuple[str, ...]
) -> PreparedCorpus:
    pairs, lengths = {}, {}
    train = tallies["train"]
    for index, name in enumerate(SPLITS):
        tally, label = (train, index) if name == "train" or name in carved else (tallies[name], 0)
        pairs[name] = tally.written.get(label, 0)
        lengths[name] = {
            "src": counted_percentiles(tally.src_hist.get(label, np.zeros(0, np.int64))),
            "tgt": counted_percentiles(tally.tgt_hist.get(label, np.zeros(0, np.int64))),
        }
    loaded = {name: tallies[name].loaded for name in corpus.splits}
    return PreparedCorpus(pairs, loaded, dropped, carved, lengths)
