"""How translations and models are scored: sacreBLEU and chrF on detokenized text (the way users read the
output), the teacher-forced loss, and a cheap greedy BLEU for per-epoch validation.

Light on purpose: Ray workers import it, so it pulls in no model files, safetensors or `Translator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.base import Metric
from tokenizers import Tokenizer

from pipeline.network.batching import collate, source_tensor
from pipeline.network.decoding import greedy_decode
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq
from pipeline.network.tokenization import decode_ids
from pipeline.network.training_step import sequence_loss

GREEDY_BLEU_BATCH = 128


def _metrics() -> dict[str, Metric]:
    """The corpus metrics by the key their score is reported under; the one place their settings are made,
    so a score and its signature always describe the same computation."""
    # force=True only silences sacrebleu's guess that text with spaced punctuation (as in the built-in
    # corpus) was tokenized by us; both sides are plain text as users write it.
    return {
        "bleu": BLEU(force=True),
        "bleu_lc": BLEU(force=True, lowercase=True),
        "chrf": CHRF(),
    }


@dataclass(frozen=True)
class CorpusScores:
    scores: dict[str, float]  # bleu, bleu_lc, chrf
    # bleu_signature, ...: sacreBLEU's signature of each score, e.g.
    # "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0": what makes a score comparable
    # with a published one (tokenizer, casing, smoothing and sacreBLEU's version).
    signatures: dict[str, str]


def score_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> CorpusScores:
    """sacreBLEU and chrF on detokenized, cased text, and `bleu_lc` (lowercased), the form many published
    results (Multi30k among them) report; each with its signature."""
    hypotheses, references = list(hypotheses), list(references)
    scores, signatures = {}, {}
    for key, metric in _metrics().items():
        result = metric.corpus_score(hypotheses, [references])
        scores[key] = round(result.score, 2)
        signatures[f"{key}_signature"] = f"{result.name}|{metric.get_signature()}"
    return CorpusScores(scores, signatures)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The scores of `score_corpus` alone."""
    return score_corpus(hypotheses, references).scores


def teacher_forced_loss(
    model: torch.nn.Module, split: EncodedSplit, batches: Sequence[np.ndarray], device: torch.device
) -> tuple[float, int]:
    """(summed loss, target tokens) over `batches` of `split`, in eval mode, without label smoothing."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for indices in batches:
            batch = collate(split, indices).to(device)
            total += float(sequence_loss(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out))
            tokens += batch.n_target_tokens
    model.train(was_training)
    return total, tokens


def greedy_bleu(
    model: Seq2Seq, split: EncodedSplit, tokenizer: Tokenizer, device, references: Sequence[str]
) -> float:
    """Greedy BLEU on the first pairs of `split`, one per reference: a cheap per-epoch quality signal.

    Scored like the evaluate stage's BLEU: detokenized hypotheses against `references`, the cleaned text
    of the split (not references rebuilt from token ids, which would lose <unk> pieces and the case a
    lowercasing tokenizer drops, and so flatter the score)."""
    sample = split.head(len(references))
    if len(sample) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    hypotheses: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(sample), GREEDY_BLEU_BATCH):
            indices = range(start, min(start + GREEDY_BLEU_BATCH, len(sample)))
            src, lengths = source_tensor([sample.src(i) for i in indices])
            hypotheses.extend(greedy_decode(model, src.to(device), lengths, max_len=int(src.size(1) * 2 + 5)))
    model.train(was_training)
    return corpus_scores(decode_ids(tokenizer, hypotheses), list(references)[: len(sample)])["bleu"]
