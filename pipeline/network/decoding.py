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
standard heuristic otherwise), or when it reaches its length limit. With k = 1 this is exactly greedy
decoding.

As in fairseq: <pad> and <s> are never generated (their log-probabilities are -inf), and at its length
limit a hypothesis must end, with </s> and its probability: the last step offers </s> only, so a cut
hypothesis is scored as the complete sentence it becomes. A sentence that is done leaves the batch: its
rows are dropped from the decoder's state, so the remaining ones decode faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipeline.network.model import Seq2Seq, select_rows, select_state
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID


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


def next_token_log_probs(logits: Tensor, at_limit: Tensor) -> Tensor:
    """log p(y_t | ...) [N,V] as the search may use it: never <pad> or <s>; only </s> for rows at their
    length limit (`at_limit` [N] bool), so a hypothesis cut there still ends, with its </s> scored."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs[:, PAD_ID] = float("-inf")
    log_probs[:, BOS_ID] = float("-inf")
    if bool(at_limit.any()):
        eos = log_probs[:, EOS_ID].clone()
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, EOS_ID] = eos[at_limit]
    return log_probs


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
            tokens = next_token_log_probs(logits, limit <= step + 1).argmax(dim=-1)
            generated.append(tokens)
            finished |= (tokens == EOS_ID) | (limit <= step + 1)
            if bool(finished.all()):
                break
        rows = torch.stack(generated, dim=1).tolist()
    return [_until_eos(row[:n]) for row, n in zip(rows, limits, strict=True)]


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
    with _evaluating(model):
        search = _BeamSearch(
            model,
            src,
            src_lengths,
            beam_size,
            length_penalty,
            max_lengths(src_lengths, max_len_ratio, max_len),
        )
        return search.run()


class _BeamSearch:
    """The search's state for the sentences still being decoded (`active`, original indices): their beams'
    scores, tokens and decoder rows; row a*k + j of every decoder tensor is beam j of active sentence a."""

    def __init__(
        self, model: Seq2Seq, src: Tensor, src_lengths: Tensor, k: int, alpha: float, limits: list[int]
    ) -> None:
        self.model, self.k, self.alpha, self.device = model, k, alpha, src.device
        batch = src.size(0)
        self.limits = torch.tensor(limits, device=self.device)
        self.active = torch.arange(batch, device=self.device)
        memory, state = model.encode(src, src_lengths)
        rows = torch.arange(batch, device=self.device).repeat_interleave(k)
        self.memory, self.state = select_rows(memory, rows), select_state(state, rows)
        self.tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=self.device)
        # All k beams start identical: only the first is live, or the search would keep k copies of it.
        self.scores = torch.full((batch, k), float("-inf"), device=self.device)
        self.scores[:, 0] = 0.0
        self.history = torch.zeros((batch, k, 0), dtype=torch.long, device=self.device)
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]  # best first, <= k
        self.worst_kept = torch.full((batch,), float("-inf"), device=self.device)  # k-th finished, or -inf

    def run(self) -> list[list[int]]:
        length = 0
        while len(self.active):
            length += 1  # tokens generated so far, including the one chosen now
            self._step(length)
        return [hypotheses[0][1] if hypotheses else [] for hypotheses in self.finished]

    def _step(self, length: int) -> None:
        k, n_active = self.k, len(self.active)
        penalty = ((5.0 + length) / 6.0) ** self.alpha
        logits, self.state = self.model.decode_step(self.tokens, self.state, self.memory)
        at_limit = (self.limits[self.active] <= length).repeat_interleave(k)
        log_probs = next_token_log_probs(logits, at_limit)
        vocab = log_probs.size(-1)
        candidates = (self.scores.unsqueeze(-1) + log_probs.view(n_active, k, vocab)).view(
            n_active, k * vocab
        )
        n_candidates = min(2 * k, k * vocab)
        cand_scores, cand_ids = candidates.topk(n_candidates, dim=1)  # best first
        cand_beams, cand_tokens = cand_ids // vocab, cand_ids % vocab
        is_eos = cand_tokens == EOS_ID
        self._keep_finished(
            is_eos[:, :k] & torch.isfinite(cand_scores[:, :k]), cand_scores, cand_beams, penalty
        )
        # The k best candidates that are not </s> go on (there are at least k of the 2k).
        rank_key = is_eos.long() * n_candidates + torch.arange(n_candidates, device=self.device)
        chosen = rank_key.argsort(dim=1)[:, :k]
        self.scores = cand_scores.gather(1, chosen)
        beams = cand_beams.gather(1, chosen)
        new_tokens = cand_tokens.gather(1, chosen)
        self.history = torch.cat(
            [
                self.history.gather(1, beams.unsqueeze(-1).expand(-1, -1, self.history.size(2))),
                new_tokens.unsqueeze(-1),
            ],
            dim=2,
        )
        offsets = (torch.arange(n_active, device=self.device) * k).unsqueeze(1)
        self.state = select_state(self.state, (beams + offsets).view(-1))
        self.tokens = new_tokens.view(-1)
        # Done: at the length limit (every hypothesis ended there), or no live one can beat the k-th finished.
        done = (self.limits[self.active] <= length) | (
            self.scores[:, 0] / penalty <= self.worst_kept[self.active]
        )
        if bool(done.any()):
            self._drop(~done)

    def _keep_finished(self, hits: Tensor, cand_scores: Tensor, cand_beams: Tensor, penalty: float) -> None:
        """Hypotheses ended by one of the k best candidates being </s>, kept with their penalised score."""
        found = hits.nonzero().tolist()
        if not found:
            return
        scores, beams, active = cand_scores.tolist(), cand_beams.tolist(), self.active.tolist()
        for position, rank in found:
            sentence = active[position]
            ids = self.history[position, beams[position][rank]].tolist()
            hypotheses = self.finished[sentence]
            hypotheses.append((scores[position][rank] / penalty, ids))
            hypotheses.sort(key=lambda pair: -pair[0])  # stable: the earlier of equal scores stays first
            del hypotheses[self.k :]
            if len(hypotheses) == self.k:
                self.worst_kept[sentence] = hypotheses[-1][0]

    def _drop(self, keep: Tensor) -> None:
        """Only the sentences still searching stay in the batch."""
        positions = keep.nonzero().squeeze(1)
        rows = (positions.unsqueeze(1) * self.k + torch.arange(self.k, device=self.device)).view(-1)
        self.active = self.active[positions]
        self.scores, self.history = self.scores[positions], self.history[positions]
        self.tokens = self.tokens[rows]
        self.memory, self.state = select_rows(self.memory, rows), select_state(self.state, rows)


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
