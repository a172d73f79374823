"""The preprocess stage's encoding on Ray Data: a pool of tokenizer actors (each loads the two tokenizers
once) encodes data/prepared's blocks on every node; the driver writes data/processed in input order through
the same `write_processed` as the local engine, so the files are the same.

One pool for the whole stage: the splits are read one after another as one stream, each row tagged with
its split, so the actors start and load the tokenizers once, not once a split (an actor is a process that
imports Ray Data and pyarrow: on a two-node cluster of 6 CPUs, 3 pools cost 18 actor starts where one
costs 6).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from pipeline.config import SPLITS
from pipeline.data.arrow_text import SCHEMA, check_text_columns, iter_batches
from pipeline.data.prepared import PreparedData
from pipeline.data.processed import FlatBatch
from pipeline.data.ray_blocks import (
    actor_pool,
    ordered_execution,
    read_stream,
    task_errors_as_pipeline_errors,
)
from pipeline.network.encoded import id_dtype
from pipeline.network.tokenization import encode_texts

BLOCK_ROWS = 5_000  # pairs an actor encodes per call
SPLIT_COLUMN = "split"  # the row's split, as its index in the stream's splits


class TokenizerActor:
    """Holds both tokenizers (from their JSON, shipped once per actor) and encodes a block of pairs."""

    def __init__(self, src_json: str, tgt_json: str) -> None:
        self.src, self.tgt = Tokenizer.from_str(src_json), Tokenizer.from_str(tgt_json)

    def __call__(self, block: pa.Table) -> pa.Table:
        ids = pa.list_(pa.int32())
        return pa.table(
            {
                SPLIT_COLUMN: block.column(SPLIT_COLUMN),
                "src_ids": pa.array(encode_texts(self.src, block.column("src").to_pylist()), type=ids),
                "tgt_ids": pa.array(encode_texts(self.tgt, block.column("tgt").to_pylist()), type=ids),
            }
        )


def ray_encoder(
    prepared: PreparedData, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, actors: int | None = None
) -> SplitsInOrder:
    """A `SplitEncoder` for `write_processed` that encodes with `actors` tokenizer actors (default: one per
    CPU of the cluster). It is asked for the splits of `prepared` in SPLITS order, as `write_processed`
    asks, and encodes them all in one stream. A Ray session must be up."""
    dtype = id_dtype(max(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size()))
    _, options = actor_pool(actors)
    jsons = {"src_json": src_tokenizer.to_str(), "tgt_json": tgt_tokenizer.to_str()}
    splits = [name for name in SPLITS if name in prepared.pairs]
    paths = [prepared.split_path(name) for name in splits]

    def stream() -> Generator[tuple[int, FlatBatch]]:
        # Inside the context: a dataset keeps the Ray Data settings of the moment it is made.
        with ordered_execution(), task_errors_as_pipeline_errors():
            text = read_stream(lambda: _tagged_tables(paths), "ReadPrepared", BLOCK_ROWS)
            encoded = text.map_batches(
                TokenizerActor,
                fn_constructor_kwargs=jsons,
                batch_format="pyarrow",
                batch_size=None,
                **options,
            )
            for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
                for index, piece in _by_split(batch):
                    src_ids, src_lengths = _flat(piece.column("src_ids"), dtype)
                    tgt_ids, tgt_lengths = _flat(piece.column("tgt_ids"), dtype)
                    yield index, (src_ids, src_lengths, tgt_ids, tgt_lengths)

    return SplitsInOrder(splits, stream)


class SplitsInOrder:
    """A `SplitEncoder` over one stream of (split index, batch): each call takes its split's batches from
    the stream, which starts on the first call and ends with the last split. `close()` ends it early (a
    failure on the driver's side between splits), so Ray Data's execution and settings do not outlive it."""

    def __init__(self, splits: list[str], stream: Callable[[], Generator[tuple[int, FlatBatch]]]) -> None:
        self._splits, self._start = splits, stream
        self._stream: Generator[tuple[int, FlatBatch]] | None = None
        self._next_split = 0
        self._ahead: tuple[int, FlatBatch] | None = None  # the first batch of a later split, taken early

    def __call__(self, split: str) -> Iterator[FlatBatch]:
        expected = self._splits[self._next_split] if self._next_split < len(self._splits) else None
        if split != expected:
            raise ValueError(f"asked for split {split!r}; this encoder gives {self._splits} in that order")
        self._next_split += 1
        return self._batches(self._splits.index(split))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def _batches(self, index: int) -> Iterator[FlatBatch]:
        # The last split reads the stream to its end, which ends the dataset's execution (and its context).
        if self._stream is None:
            self._stream = self._start()
        while True:
            if self._ahead is None:
                self._ahead = next(self._stream, None)
                if self._ahead is None:
                    return
            if self._ahead[0] < index:  # a split's rows left unread would otherwise go to no split at all
                raise RuntimeError(f"split {self._splits[self._ahead[0]]!r} was not read to its end")
            if self._ahead[0] != index:
                return
            batch = self._ahead[1]
            self._ahead = None
            yield batch


def _tagged_tables(paths: list[Path]) -> Iterator[pa.Table]:
    """Every split's record batches, one split after another, each row tagged with its split's index; each
    checked as the local engine checks them: a null or a column that is not text names the file here, in
    the read task, not as a tokenizer's TypeError in an actor."""
    for index, path in enumerate(paths):
        for batch in iter_batches(path):
            check_text_columns(path, batch)
            # The two text columns in one schema: the splits' blocks are cut and joined across files, which
            # may differ in what the local engine accepts too (large strings, other columns).
            table = pa.Table.from_batches([batch]).select(SCHEMA.names).cast(SCHEMA)
            yield table.append_column(SPLIT_COLUMN, pa.array(np.full(len(table), index, np.int8)))


def _by_split(batch: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """A block cut where its split changes (a block may hold the end of one split and the start of the
    next): (split index, rows) in order."""
    labels = batch.column(SPLIT_COLUMN).to_numpy()
    starts = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist()]
    for start, end in zip(starts, [*starts[1:], len(labels)], strict=True):
        if end > start:
            yield int(labels[start]), batch.slice(start, end - start)


def _flat(column: pa.ChunkedArray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (its values end to end, the length of each list), without Python lists."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values.astype(dtype, copy=False), np.diff(offsets).astype(np.int64)
