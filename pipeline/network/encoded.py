"""An encoded split in a shape that ships and maps cheaply: four flat numpy arrays (ids and offsets per side).

Not a list of lists: `ray.put` stores flat arrays zero-copy, so every worker on every node reads the same
bytes without a shared disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def _flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets
