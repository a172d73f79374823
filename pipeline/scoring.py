"""How translations and models are scored, in one place: training's validation, evaluate, the registry.

BLEU and chrF are sacreBLEU's on detokenized text, the way users read the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F

from pipeline.config import EvaluateConfig
from pipeline.data.batching import EncodedSplit, collate
from pipeline.data.tokenization import PAD_ID
from pipeline.model_io import LoadedModel
from pipeline.translator import Translator


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the non-padding target tokens (callers divide by the token count)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


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


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    # force=True only silences sacrebleu's guess that text with spaced punctuation (as in the built-in
    # corpus) was tokenized by us; both sides are plain text as users write it.
    return {
        "bleu": round(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], force=True).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score, 2),
    }


def translate_and_score(
    loaded: LoadedModel, sources: Sequence[str], references: Sequence[str], settings: EvaluateConfig
) -> tuple[list[str], dict[str, float]]:
    """Beam search with the evaluate settings, then BLEU and chrF: what evaluate and the gate both use."""
    translator = Translator(
        loaded, length_penalty=settings.length_penalty, max_len_ratio=settings.max_len_ratio
    )
    hypotheses = translator.translate(
        list(sources), beam_size=settings.beam_size, batch_size=settings.batch_size
    )
    return hypotheses, corpus_scores(hypotheses, references)
