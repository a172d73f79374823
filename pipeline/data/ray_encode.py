"""The preprocess stage's encoding on Ray Data: a pool of tokenizer actors (each loads the two tokenizers
once) encodes data/prepared's blocks on every node; the driver writes data/processed in input order through
the same `write_processed` as the local engine, so the files are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from pipeline.data.arrow_text import check_text_columns, iter_batches
from pipeline.data.prepared import PreparedData
from pipeline.data.processed import FlatBatch, SplitEncoder
from pipeline.data.ray_blocks import (
    actor_pool,
    ordered_execution,
    read_stream,
    task_errors_as_pipeline_errors,
)
from pipeline.network.encoded import id_dtype
from pipeline.network.tokenization import encode_texts

BLOCK_ROWS = 5_000  # pairs an actor encodes per call


class TokenizerActor:
    """Holds both tokenizers (from their JSON, shipped once per actor) and encodes a block of pairs."""

    def __init__(self, src_json: str, tgt_json: str) -> None:
        self.src, self.tgt = Tokenizer.from_str(src_json), Tokenizer.from_str(tgt_json)

    def __call__(self, block: pa.Table) -> pa.Table:
        ids = pa.list_(pa.int32())
        return pa.table(
            {
                "src_ids": pa.array(encode_texts(self.src, block.column("src").to_pylist()), type=ids),
                "tgt_ids": pa.array(encode_texts(self.tgt, block.column("tgt").to_pylist()), type=ids),
            }
        )


def ray_encoder(
    prepared: PreparedData, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, actors: int | None = None
) -> SplitEncoder:
    """A `SplitEncoder` for `write_processed` that encodes with `actors` tokenizer actors (default: one per
    CPU of the cluster). A Ray session must be up."""
    dtype = id_dtype(max(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size()))
    _, options = actor_pool(actors)
    jsons = {"src_json": src_tokenizer.to_str(), "tgt_json": tgt_tokenizer.to_str()}

    def encode(split: str) -> Iterator[FlatBatch]:
        path = prepared.split_path(split)
        # Inside the context: a dataset keeps the Ray Data settings of the moment it is made.
        with ordered_execution(), task_errors_as_pipeline_errors():
            text = read_stream(lambda: _checked_tables(path), "ReadPrepared", BLOCK_ROWS)
            encoded = text.map_batches(
                TokenizerActor,
                fn_constructor_kwargs=jsons,
                batch_format="pyarrow",
                batch_size=None,
                **options,
            )
            for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=None):
                src_ids, src_lengths = _flat(batch.column("src_ids"), dtype)
                tgt_ids, tgt_lengths = _flat(batch.column("tgt_ids"), dtype)
                yield src_ids, src_lengths, tgt_ids, tgt_lengths

    return encode


def _checked_tables(path: Path) -> Iterator[pa.Table]:
    """A prepared split's record batches, each checked as the local engine checks them: a null or a
    column that is not text names the file here, in the read task, not as a tokenizer's TypeError in an
    actor."""
    for batch in iter_batches(path):
        check_text_columns(path, batch)
        yield pa.Table.from_batches([batch])


def _flat(column: pa.ChunkedArray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (its values end to end, the length of each list), without Python lists."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values.astype(dtype, copy=False), np.diff(offsets).astype(np.int64)
