"""An encoded split in a shape that ships and maps cheaply: four flat numpy arrays (ids and offsets per side).

Not a list of lists: a split of N pairs is `.npy` files that `np.load(mmap_mode="r")` maps without reading,
so a training worker touches only the pages of the batches it trains on, every worker on a machine shares
the same page cache, and `ray.put` ships the arrays zero-copy to workers on other nodes.

On disk (`EncodedSplitWriter` writes it, `EncodedSplit.open` maps it):

    <split>/src_ids.npy  <split>/src_offsets.npy  <split>/tgt_ids.npy  <split>/tgt_offsets.npy

ids are uint16 when the vocabulary fits (half the bytes of int32), offsets int64 with offsets[0] == 0.
"""

from __future__ import annotations

import ast
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import PipelineError

ARRAYS = ("src_ids", "src_offsets", "tgt_ids", "tgt_offsets")


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@dataclass(frozen=True)
class EncodedSplit:
    src_ids: np.ndarray
    src_offsets: np.ndarray
    tgt_ids: np.ndarray
    tgt_offsets: np.ndarray

    @classmethod
    def from_lists(cls, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> EncodedSplit:
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} source but {len(tgt)} target sequences")
        return cls(*_flatten(src), *_flatten(tgt))

    @classmethod
    def open(cls, directory: Path) -> EncodedSplit:
        """Memory-map a split written by `EncodedSplitWriter`; PipelineError when it is missing or corrupt."""
        directory = Path(directory)
        arrays = []
        for name in ARRAYS:
            path = directory / f"{name}.npy"
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except (OSError, ValueError) as error:
                raise PipelineError(f"cannot read {path}: {error}") from None
        split = cls(*arrays)
        for side in ("src", "tgt"):
            ids, offsets = getattr(split, f"{side}_ids"), getattr(split, f"{side}_offsets")
            if len(offsets) != len(split.src_offsets) or len(offsets) == 0 or offsets[-1] != len(ids):
                raise PipelineError(f"{directory}: {side} ids and offsets disagree; run preprocess again")
        return split

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    def src(self, index: int) -> np.ndarray:
        return self.src_ids[self.src_offsets[index] : self.src_offsets[index + 1]]

    def tgt(self, index: int) -> np.ndarray:
        return self.tgt_ids[self.tgt_offsets[index] : self.tgt_offsets[index + 1]]

    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def head(self, n: int) -> EncodedSplit:
        n = min(n, len(self))
        return EncodedSplit(
            self.src_ids[: self.src_offsets[n]],
            self.src_offsets[: n + 1],
            self.tgt_ids[: self.tgt_offsets[n]],
            self.tgt_offsets[: n + 1],
        )

    def in_memory(self) -> EncodedSplit:
        """Plain ndarrays (views of the maps, no copy): what `ray.put` serialises zero-copy."""
        return EncodedSplit(*(np.asarray(getattr(self, name)) for name in ARRAYS))


def _flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def flatten_ids(sequences: Sequence[Sequence[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids end to end as `dtype`, length of each sequence)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter((t for s in sequences for t in s), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


class EncodedSplitWriter:
    """Appends batches of encoded pairs to a split folder; memory stays at one batch plus 8 bytes per pair
    of lengths (the offsets are written at the end)."""

    def __init__(self, directory: Path, dtype: np.dtype) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.dtype = np.dtype(dtype)
        self._ids = {
            side: _GrowingNpy(self.directory / f"{side}_ids.npy", self.dtype) for side in ("src", "tgt")
        }
        self._lengths: dict[str, list[np.ndarray]] = {"src": [], "tgt": []}

    def append(
        self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Add pairs; returns the flat source and target ids just written (e.g. to count <unk>)."""
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} source but {len(tgt)} target sequences")
        return self.append_flat(*flatten_ids(src, self.dtype), *flatten_ids(tgt, self.dtype))

    def append_flat(
        self, src_ids: np.ndarray, src_lengths: np.ndarray, tgt_ids: np.ndarray, tgt_lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`append` for pairs already flat: ids end to end and a length per sentence, per side."""
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError(f"{len(src_lengths)} source but {len(tgt_lengths)} target sequences")
        written = []
        for side, flat, lengths in (("src", src_ids, src_lengths), ("tgt", tgt_ids, tgt_lengths)):
            flat = np.asarray(flat, dtype=self.dtype)
            self._ids[side].append(flat)
            self._lengths[side].append(np.asarray(lengths, dtype=np.int64))
            written.append(flat)
        return written[0], written[1]

    def close(self) -> int:
        """Finish every file; returns the number of pairs written."""
        n_pairs = 0
        for side in ("src", "tgt"):
            self._ids[side].close()
            lengths = np.concatenate(self._lengths[side]) if self._lengths[side] else np.zeros(0, np.int64)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            np.save(self.directory / f"{side}_offsets.npy", offsets)
            n_pairs = len(lengths)
        return n_pairs


class _GrowingNpy:
    """A 1-d `.npy` file written in pieces: a header with room for any length, rewritten on close."""

    _HEADER_BYTES = 128  # multiple of 64 as the format asks; the dict below needs < 100

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.length = path, dtype, 0
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(self._header(0))

    def append(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header(self.length))
        self._file.close()

    def _header(self, length: int) -> bytes:
        described = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (length,),
        }
        text = repr(described)
        assert ast.literal_eval(text) == described
        prefix = b"\x93NUMPY\x01\x00"
        body_bytes = self._HEADER_BYTES - len(prefix) - 2
        body = text.ljust(body_bytes - 1) + "\n"
        return prefix + struct.pack("<H", body_bytes) + body.encode("latin1")
