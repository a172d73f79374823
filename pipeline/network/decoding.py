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
    # Masked without asking the host whether any row is at its limit: no device sync.
    not_eos = torch.arange(log_probs.size(-1), device=log_probs.device) != EOS_ID
    return log_probs.masked_fill(at_limit.unsqueeze(1) & not_eos, float("-inf"))


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
        self.active_ids = list(range(batch))  # `active` on the host
        memory, state = model.encode(src, src_lengths)
        rows = torch.arange(batch, device=self.device).repeat_interleave(k)
        self.memory, self.state = select_rows(memory, rows), select_state(state, rows)
        self.tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=self.device)
        # All k beams start identical: only the first is live, or the search would keep k copies of it.
        self.scores = torch.full((batch, k), float("-inf"), device=self.device)
        self.scores[:, 0] = 0.0
        self.history = torch.zeros((batch, k, 0), dtype=torch.long, device=self.device)
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]  # best first, <= k
        self.worst_kept = [float("-inf")] * batch  # the k-th finished score, or -inf

    def run(self) -> list[list[int]]:
        length = 0
        while self.active_ids:
            length += 1  # tokens generated so far, including the one chosen now
            self._step(length)
        return [hypotheses[0][1] if hypotheses else [] for hypotheses in self.finished]

    def _step(self, length: int) -> None:
        """One token for every live beam. The host reads the device once a step (twice on a step where
        hypotheses finish, for their tokens): what ended, with which scores, and what still runs."""
        k, n_active = self.k, len(self.active_ids)
        penalty = ((5.0 + length) / 6.0) ** self.alpha
        logits, self.state = self.model.decode_step(self.tokens, self.state, self.memory)
        at_limit = self.limits[self.active] <= length
        log_probs = next_token_log_probs(logits, at_limit.repeat_interleave(k))
        vocab = log_probs.size(-1)
        candidates = (self.scores.unsqueeze(-1) + log_probs.view(n_active, k, vocab)).view(
            n_active, k * vocab
        )
        n_candidates = min(2 * k, k * vocab)
        cand_scores, cand_ids = candidates.topk(n_candidates, dim=1)  # best first
        cand_beams, cand_tokens = cand_ids // vocab, cand_ids % vocab
        is_eos = cand_tokens == EOS_ID
        hits = is_eos[:, :k] & torch.isfinite(cand_scores[:, :k])
        # The k best candidates that are not </s> go on (there are at least k of the 2k).
        rank_key = is_eos.long() * n_candidates + torch.arange(n_candidates, device=self.device)
        chosen = rank_key.argsort(dim=1)[:, :k]
        previous_history = self.history
        self.scores = cand_scores.gather(1, chosen)
        beams = cand_beams.gather(1, chosen)
        new_tokens = cand_tokens.gather(1, chosen)
        self.history = torch.cat(
            [
                previous_history.gather(1, beams.unsqueeze(-1).expand(-1, -1, previous_history.size(2))),
                new_tokens.unsqueeze(-1),
            ],
            dim=2,
        )
        offsets = (torch.arange(n_active, device=self.device) * k).unsqueeze(1)
        self.state = select_state(self.state, (beams + offsets).view(-1))
        self.tokens = new_tokens.view(-1)
        # One transfer: per sentence its k hits, their scores and beams, the best live score, the limit.
        summary = torch.cat(
            [
                hits.float(),
                cand_scores[:, :k],
                cand_beams[:, :k].float(),
                self.scores[:, :1],
                at_limit[:, None],
            ],
            dim=1,
        ).tolist()
        self._keep_finished(summary, previous_history, penalty)
        # Done: at the length limit (every hypothesis ended there), or no live one can beat the k-th finished.
        keep = [
            position
            for position, row in enumerate(summary)
            if not (row[3 * k + 1] or row[3 * k] / penalty <= self.worst_kept[self.active_ids[position]])
        ]
        if len(keep) < n_active:
            self._drop(keep)

    def _keep_finished(self, summary: list[list[float]], history: Tensor, penalty: float) -> None:
        """Hypotheses ended by one of the k best candidates being </s>, kept with their penalised score."""
        k = self.k
        found = [
            (position, rank, int(row[2 * k + rank]))
            for position, row in enumerate(summary)
            for rank in range(k)
            if row[rank]
        ]
        if not found:
            return
        positions = torch.tensor([position for position, _, _ in found], device=self.device)
        beams = torch.tensor([beam for _, _, beam in found], device=self.device)
        all_ids = history[positions, beams].tolist()
        for (position, rank, _), ids in zip(found, all_ids, strict=True):
            sentence = self.active_ids[position]
            hypotheses = self.finished[sentence]
            hypotheses.append((summary[position][k + rank] / penalty, ids))
            hypotheses.sort(key=lambda pair: -pair[0])  # stable: the earlier of equal scores stays first
            del hypotheses[k:]
            if len(hypotheses) == k:
                self.worst_kept[sentence] = hypotheses[-1][0]

    def _drop(self, keep: list[int]) -> None:
        """Only the sentences still searching stay in the batch."""
        self.active_ids = [self.active_ids[position] for position in keep]
        positions = torch.tensor(keep, dtype=torch.long, device=self.device)
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
