"""Batched greedy decoding and batched beam search for any `Seq2Seq`.

Both take an encoded source batch (ids + </s>, padded, with lengths; see `network.batching.source_tensor`)
and return, per sentence, the generated target ids without <s> and </s>. Each sentence stops at its own
</s> or at its own length limit, `floor(max_len_ratio * source_length) + 5` generated tokens (</s>
included), optionally capped by a fixed `max_len`.

Beam search scores a finished hypothesis y of n tokens (</s> included) by its log-probability divided by
the GNMT length penalty (Wu et al. 2016): score(y) = log p(y|x) / ((5 + n) / 6) ** length_penalty.
length_penalty = 0 ranks by raw log-probability (favouring short output); 1 is close to a per-token
average. The search rule is the one of Hugging Face's BeamSearchScorer: at each step the 2k best
extensions are ranked; an </s> among the first k finishes a hypothesis, and the first k that are not </s>
go on. A sentence is done when it has k finished hypotheses and its best live hypothesis, scored as if it
ended now, does not beat the worst of them (exact for length_penalty = 0, where scores can only fall; a
standard heuristic otherwise), or when it reaches its length limit (live hypotheses then count as
finished). With k = 1 this is exactly greedy decoding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipeline.network.model import Seq2Seq, select_rows, select_state
from pipeline.network.tokenization import BOS_ID, EOS_ID


def max_lengths(
    src_lengths: Tensor, max_len_ratio: float | None = 2.0, max_len: int | None = None
) -> list[int]:
    """Per-sentence limit on generated tokens (</s> included): ratio * source length + 5, max_len at most."""
    if max_len_ratio is None and max_len is None:
        raise ValueError("give max_len_ratio, max_len or both")
    limits = []
    for n in src_lengths.tolist():
        limit = int(max_len_ratio * n) + 5 if max_len_ratio is not None else max_len
        limits.append(max(1, limit if max_len is None else min(limit, max_len)))
    return limits


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd while decoding; the caller's mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def greedy_decode(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    *,
    max_len_ratio: float | None = 2.0,
    max_len: int | None = None,
) -> list[list[int]]:
    """y_t = argmax p(y | y_<t, x) for every sentence of the batch at once."""
    limits = max_lengths(src_lengths, max_len_ratio, max_len)
    with _evaluating(model):
        memory, state = model.encode(src, src_lengths)
        limit = torch.tensor(limits, device=src.device)
        tokens = torch.full((src.size(0),), BOS_ID, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        generated = []
        for step in range(max(limits)):
            logits, state = model.decode_step(tokens, state, memory)
            tokens = logits.argmax(dim=-1)
            generated.append(tokens)
            finished |= (tokens == EOS_ID) | (limit <= step + 1)
            if bool(finished.all()):
                break
        rows = torch.stack(generated, dim=1).tolist()
    return [_until_eos(row[:n]) for row, n in zip(rows, limits, strict=True)]


def _length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_len_ratio: float | None = 2.0,
    max_len: int | None = None,
) -> list[list[int]]:
    """The k best-scoring translations per sentence are searched in one batch of B*k decoder rows."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    limits = max_lengths(src_lengths, max_len_ratio, max_len)
    batch, k, device = src.size(0), beam_size, src.device
    with _evaluating(model):
        memory, state = model.encode(src, src_lengths)
        # Row b*k + j of every decoder tensor is beam j of sentence b.
        rows = torch.arange(batch, device=device).repeat_interleave(k)
        memory, state = select_rows(memory, rows), select_state(state, rows)
        offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # [B,1]
        tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
        # All k beams start identical: only the first is live, or the search would keep k copies of it.
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        history = torch.zeros((batch, k, 0), dtype=torch.long, device=device)  # tokens so far per beam
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]  # best first, at most k
        worst_kept = torch.full((batch,), float("-inf"))  # k-th finished score, -inf until there are k
        done = [False] * batch

        def keep(sentence: int, score: float, ids: list[int]) -> None:
            hypotheses = finished[sentence]
            hypotheses.append((score, ids))
            hypotheses.sort(key=lambda pair: -pair[0])  # stable: the earlier of equal scores stays first
            del hypotheses[k:]
            if len(hypotheses) == k:
                worst_kept[sentence] = hypotheses[-1][0]

        for step in range(max(limits)):
            length = step + 1  # tokens generated so far, including the one chosen now
            penalty = _length_penalty(length, length_penalty)
            logits, state = model.decode_step(tokens, state, memory)
            vocab = logits.size(-1)
            log_probs = torch.log_softmax(logits.float(), dim=-1).view(batch, k, vocab)
            candidates = (scores.unsqueeze(-1) + log_probs).view(batch, k * vocab)
            n_candidates = min(2 * k, k * vocab)
            cand_scores, cand_ids = candidates.topk(n_candidates, dim=1)  # best first
            cand_beams, cand_tokens = cand_ids // vocab, cand_ids % vocab
            is_eos = cand_tokens == EOS_ID

            # 1. </s> among the k best candidates: a finished hypothesis.
            eos_hits = (is_eos[:, :k] & torch.isfinite(cand_scores[:, :k])).nonzero().tolist()
            if eos_hits:
                eos_scores, eos_beams = cand_scores.tolist(), cand_beams.tolist()
                for sentence, rank in eos_hits:
                    if not done[sentence]:
                        ids = history[sentence, eos_beams[sentence][rank]].tolist()
                        keep(sentence, eos_scores[sentence][rank] / penalty, ids)

            # 2. The k best candidates that are not </s> go on (there are at least k of the 2k).
            rank_key = is_eos.long() * n_candidates + torch.arange(n_candidates, device=device)
            chosen = rank_key.argsort(dim=1)[:, :k]  # [B,k]
            scores = cand_scores.gather(1, chosen)
            beams = cand_beams.gather(1, chosen)
            new_tokens = cand_tokens.gather(1, chosen)
            history = history.gather(1, beams.unsqueeze(-1).expand(-1, -1, history.size(2)))
            history = torch.cat([history, new_tokens.unsqueeze(-1)], dim=2)
            state = select_state(state, (beams + offsets).view(-1))
            tokens = new_tokens.view(-1)

            # 3. Which sentences are done? (Scores are sorted: beam 0 is the best live hypothesis.)
            best_live = (scores[:, 0] / penalty).cpu()
            cannot_improve = (best_live <= worst_kept).tolist()
            for sentence in range(batch):
                if done[sentence]:
                    continue
                if length >= limits[sentence]:
                    live_scores = scores[sentence].tolist()
                    for beam, ids in enumerate(history[sentence].tolist()):
                        if math.isfinite(live_scores[beam]):
                            keep(sentence, live_scores[beam] / penalty, ids)
                    done[sentence] = True
                elif cannot_improve[sentence]:
                    done[sentence] = True
            if all(done):
                break
    return [hypotheses[0][1] if hypotheses else [] for hypotheses in finished]


def decode_batch(
    model: Seq2Seq,
    src: Tensor,
    src_lengths: Tensor,
    *,
    beam_size: int,
    length_penalty: float = 1.0,
    max_len_ratio: float | None = 2.0,
    max_len: int | None = None,
) -> list[list[int]]:
    """Beam search, or the cheaper greedy loop when beam_size is 1 (the same output)."""
    if beam_size == 1:
        return greedy_decode(model, src, src_lengths, max_len_ratio=max_len_ratio, max_len=max_len)
    return beam_search(
        model,
        src,
        src_lengths,
        beam_size=beam_size,
        length_penalty=length_penalty,
        max_len_ratio=max_len_ratio,
        max_len=max_len,
    )
