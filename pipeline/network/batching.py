"""Length-bucketed token-budget batches of an `EncodedSplit`, and the padded tensors a model takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.network.encoded import EncodedSplit
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID

# Sort within windows of this many batches: enough to group similar lengths (little padding),
# small enough that batch composition still changes from epoch to epoch.
_BUCKET_WINDOW_BATCHES = 50


def token_budget_batches(
    split: EncodedSplit, max_tokens: int, seed: int | None, length_buckets: int = 1
) -> list[np.ndarray]:
    """Index batches whose padded target size (sentences x longest target+1) stays within max_tokens.

    seed=None gives a deterministic length-sorted order (evaluation); otherwise the order is shuffled,
    bucketed by length within windows, and the batch order shuffled again. With `length_buckets` N over 1,
    batches of max_tokens / N are cut that way and every N consecutive ones (after the shuffle) joined into
    one: a training update then mixes N ranges of sentence length, as fairseq's updates mix one length-
    bucketed batch per GPU, instead of holding sentences of one length only.
    """
    tgt_cost = split.tgt_lengths() + 1  # the decoder predicts every target token plus </s>
    src_len = split.src_lengths()
    if seed is None:
        order = np.lexsort((src_len, tgt_cost))
        return _cut_batches(order, tgt_cost, max_tokens)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split))
    mean_cost = max(1.0, float(tgt_cost.mean()))
    window = max(1, int(_BUCKET_WINDOW_BATCHES * max_tokens / length_buckets / mean_cost))
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        order[start : start + window] = chunk[np.lexsort((src_len[chunk], tgt_cost[chunk]))]
    batches = _cut_batches(order, tgt_cost, max(1, max_tokens // length_buckets))
    rng.shuffle(batches)
    if length_buckets == 1:
        return batches
    return [np.concatenate(batches[i : i + length_buckets]) for i in range(0, len(batches), length_buckets)]


def _cut_batches(order: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for position, index in enumerate(order):
        candidate = max(longest, int(cost[index]))
        if position > start and candidate * (position - start + 1) > max_tokens:
            batches.append(order[start:position])
            start, candidate = position, int(cost[index])
        longest = candidate
    if start < len(order):
        batches.append(order[start:])
    return batches


def update_shares(batch: np.ndarray, rank: int, world_size: int, accumulate: int) -> list[np.ndarray | None]:
    """This rank's micro-batches of one global batch: the batch is cut into `world_size x accumulate`
    shares of (nearly) equal sentence counts, the same cut whatever the rank, and each rank takes
    `accumulate` consecutive ones. None for a share that is empty (a global batch of fewer sentences than
    shares): the rank must still take part in the gradient all-reduce (see `micro_batches`)."""
    shares = np.array_split(batch, world_size * accumulate)[rank * accumulate : (rank + 1) * accumulate]
    return [share if len(share) else None for share in shares]


def target_tokens(split: EncodedSplit, indices: np.ndarray) -> int:
    """The target tokens a batch is scored on (every target token and </s>), from the lengths alone."""
    return int(split.tgt_lengths()[indices].sum()) + len(indices)


def padded_length(longest: int, multiple: int) -> int:
    """`longest` rounded up to a multiple of `multiple`: a small fixed set of shapes, so kernels, compiled
    graphs and allocator blocks are reused from batch to batch."""
    return -(-longest // multiple) * multiple


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] source ids + </s>, padded
    src_lengths: torch.Tensor  # [B] on CPU (pack_padded_sequence wants them there)
    tgt_in: torch.Tensor  # [B, T] <s> + target
    tgt_out: torch.Tensor  # [B, T] target + </s>
    n_target_tokens: int
    # A stand-in for an empty share: it runs forward and backward like any micro-batch, so that DDP
    # all-reduces on this rank too, but its loss is multiplied by 0 and its tokens are not counted.
    placeholder: bool = False

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device),
            self.src_lengths,
            self.tgt_in.to(device),
            self.tgt_out.to(device),
            self.n_target_tokens,
            self.placeholder,
        )


def collate(split: EncodedSplit, indices: np.ndarray, pad_multiple: int = 1) -> Batch:
    """The padded tensors of a batch; source and target widths rounded up to `pad_multiple`."""
    sources = [split.src(i) for i in indices]
    targets = [split.tgt(i) for i in indices]
    src_len = padded_length(max(len(s) for s in sources) + 1, pad_multiple)
    tgt_len = padded_length(max(len(t) for t in targets) + 1, pad_multiple)
    src = np.full((len(indices), src_len), PAD_ID, dtype=np.int64)
    tgt_in = np.full((len(indices), tgt_len), PAD_ID, dtype=np.int64)
    tgt_out = np.full((len(indices), tgt_len), PAD_ID, dtype=np.int64)
    for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
        src[row, : len(source)] = source
        src[row, len(source)] = EOS_ID
        tgt_in[row, 0] = BOS_ID
        tgt_in[row, 1 : len(target) + 1] = target
        tgt_out[row, : len(target)] = target
        tgt_out[row, len(target)] = EOS_ID
    lengths = torch.tensor([len(s) + 1 for s in sources], dtype=torch.int64)
    n_tokens = sum(len(t) + 1 for t in targets)
    return Batch(
        torch.from_numpy(src), lengths, torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), n_tokens
    )


def micro_batches(
    split: EncodedSplit, batch: np.ndarray, rank: int, world_size: int, accumulate: int, pad_multiple: int
) -> list[Batch]:
    """This rank's micro-batches of the global batch `batch`, collated (see `update_shares`). An empty
    share becomes a placeholder of the batch's first sentence (as fairseq's dummy batch): DDP launches its
    all-reduce only on ranks whose wrapper ran forward, so every rank must run one for every micro-batch."""
    shares = update_shares(batch, rank, world_size, accumulate)
    return [
        collate(split, share, pad_multiple) if share is not None else placeholder(split, batch, pad_multiple)
        for share in shares
    ]


def placeholder(split: EncodedSplit, batch: np.ndarray, pad_multiple: int) -> Batch:
    """A one-sentence micro-batch that counts for nothing (see `Batch.placeholder`)."""
    stand_in = collate(split, batch[:1], pad_multiple)
    stand_in.n_target_tokens, stand_in.placeholder = 0, True
    return stand_in


def real_token_mask(lengths: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """[B, width] True at each row's first lengths[b] positions, the real tokens: what attention may read.

    From the lengths, not from the ids, so the padding's content never matters."""
    return torch.arange(width, device=device) < lengths.to(device).unsqueeze(1)


def source_tensor(sources: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded source ids (+ </s>) and lengths, the encoder's input format, for decoding."""
    src_len = max(len(s) for s in sources) + 1
    src = np.full((len(sources), src_len), PAD_ID, dtype=np.int64)
    for row, source in enumerate(sources):
        src[row, : len(source)] = source
        src[row, len(source)] = EOS_ID
    return torch.from_numpy(src), torch.tensor([len(s) + 1 for s in sources], dtype=torch.int64)
