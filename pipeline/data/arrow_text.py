"""Text pairs on disk as Arrow IPC stream files: columns `src` and `tgt` (strings), written batch by batch.

The stream format is the one `datasets` writes, so `datasets.Dataset.from_file(path)` opens these files too.
Streaming reads go through a plain file, one batch in memory at a time: a memory map would leave every page
read so far resident (and counted in the process's RSS) until the whole file is closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from pipeline.errors import PipelineError

SCHEMA = pa.schema([("src", pa.string()), ("tgt", pa.string())])
BATCH_ROWS = 20_000  # pairs per record batch: a few MB of text, the unit every reader and writer works in


class TextPairWriter:
    """Buffers pairs and writes them as record batches of exactly BATCH_ROWS (the last one shorter);
    `close()` returns the pair count. Batch boundaries depend on the rows alone, not on how they arrived,
    so every engine that writes the same rows in the same order writes the same bytes."""

    def __init__(self, path: Path, schema: pa.Schema = SCHEMA) -> None:
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def write(self, **columns: Sequence) -> None:
        self.write_batch(pa.record_batch([columns[name] for name in self.schema.names], schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Arrow rows with this schema's columns (e.g. a filtered batch of another file), re-cut."""
        if batch.num_rows:
            rows = batch.select(self.schema.names).cast(self.schema)
            self._pending.extend(rows.to_batches() if isinstance(rows, pa.Table) else [rows])
            self._pending_rows += batch.num_rows
        if self._pending_rows >= BATCH_ROWS:
            self._flush(final=False)

    def close(self) -> int:
        self._flush(final=True)
        self._writer.close()
        self._sink.close()
        return self.rows

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema).combine_chunks()
        whole = table.num_rows if final else table.num_rows - table.num_rows % BATCH_ROWS
        for start in range(0, whole, BATCH_ROWS):
            for batch in table.slice(start, min(BATCH_ROWS, whole - start)).to_batches():
                self._writer.write_batch(batch)
        self.rows += whole
        rest = table.slice(whole)
        self._pending, self._pending_rows = rest.to_batches(), rest.num_rows


def open_pairs(path: Path) -> pa.Table:
    """The whole file as a memory-mapped table (no copy); PipelineError naming the file when unreadable."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowException) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def iter_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The file's record batches in order, each read when it is reached and freed when the caller drops it."""
    try:
        with pa.OSFile(str(path), "rb") as source:
            yield from pa.ipc.open_stream(source)
    except (OSError, pa.ArrowException) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def check_text_columns(path: Path, pairs: pa.RecordBatch | pa.Table | None = None) -> None:
    """`pairs` (default: the file's schema alone) has the string columns `src` and `tgt`, without nulls;
    a PipelineError naming the file and the column otherwise (a file written by something else, or by an
    older layout), rather than a KeyError or a TypeError from the tokenizer."""
    if pairs is None:
        try:
            with pa.OSFile(str(path), "rb") as source:
                schema = pa.ipc.open_stream(source).schema
        except (OSError, pa.ArrowException) as error:
            raise PipelineError(f"cannot read {path}: {error}") from None
    else:
        schema = pairs.schema
    for name in SCHEMA.names:
        if name not in schema.names:
            raise PipelineError(
                f"{path}: no column {name!r} (columns: {', '.join(schema.names) or 'none'});"
                " expected the string columns src and tgt"
            )
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PipelineError(f"{path}: column {name!r} holds {kind}, expected strings")
        if pairs is not None and pairs.column(name).null_count:
            raise PipelineError(
                f"{path}: column {name!r} has {pairs.column(name).null_count} null value(s);"
                " expected text in every row"
            )


def iter_text_batches(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    """(sources, targets) per record batch as Python strings: the batch is the only copy made."""
    for batch in iter_batches(path):
        check_text_columns(path, batch)
        yield batch.column("src").to_pylist(), batch.column("tgt").to_pylist()


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    """A whole (small: validation or test) file as two lists of strings."""
    table = open_pairs(path)
    check_text_columns(path, table)
    return table.column("src").to_pylist(), table.column("tgt").to_pylist()
