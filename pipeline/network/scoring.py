"""How translations and models are scored: sacreBLEU and chrF on detokenized text (the way users read the
output), the teacher-forced loss, and a cheap greedy BLEU for per-epoch validation.

Light on purpose: Ray workers import it, so it pulls in no model files, safetensors or `Translator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
from tokenizers import Tokenizer

from pipeline.network.batching import collate, source_tensor
from pipeline.network.decoding import greedy_decode
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq
from pipeline.network.tokenization import decode_ids
from pipeline.network.training_step import sequence_loss

GREEDY_BLEU_BATCH = 128


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacreBLEU and chrF on detokenized, cased text, and `bleu_lc` (lowercased), the form many published
    results (Multi30k among them) report."""
    hypotheses, references = list(hypotheses), list(references)

    def bleu(lowercase: bool) -> float:
        # force=True only silences sacrebleu's guess that text with spaced punctuation (as in the built-in
        # corpus) was tokenized by us; both sides are plain text as users write it.
        score = sacrebleu.corpus_bleu(hypotheses, [references], force=True, lowercase=lowercase).score
        return round(score, 2)

    return {
        "bleu": bleu(lowercase=False),
        "bleu_lc": bleu(lowercase=True),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
    }


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


def greedy_bleu(model: Seq2Seq, split: EncodedSplit, tokenizer: Tokenizer, device, limit: int) -> float:
    """Greedy BLEU on the first `limit` pairs of `split`: a cheap per-epoch quality signal."""
    sample = split.head(limit)
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
    references = decode_ids(tokenizer, [sample.tgt(i) for i in range(len(sample))])
    return corpus_scores(decode_ids(tokenizer, hypotheses), references)["bleu"]
