"""Stage `evaluate`: beam search on the test split, sacreBLEU and chrF on detokenized text.

Hypotheses come from the same `Translator` users call, fed the untokenized source text, so the score is
the score of what users get; references are the prepared (cleaned, untokenized) target text.
"""

from __future__ import annotations

import json
import logging

import sacrebleu
import torch

from pipeline import paths
from pipeline.atomic import atomic_file, write_json
from pipeline.config import PipelineConfig
from pipeline.data.batching import EncodedSplit, collate, token_budget_batches
from pipeline.data.encoded import load_processed
from pipeline.errors import PipelineError
from pipeline.model_io import load_model_dir
from pipeline.translator import Translator

logger = logging.getLogger(__name__)


def test_loss(model: torch.nn.Module, split: EncodedSplit) -> float:
    """Teacher-forced cross-entropy per target token (no label smoothing)."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for indices in token_budget_batches(split, 8000, seed=None):
            batch = collate(split, indices)
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    batch.tgt_out.reshape(-1),
                    ignore_index=0,
                    reduction="sum",
                )
            )
            tokens += batch.n_target_tokens
    return total / max(tokens, 1)


def run(config: PipelineConfig) -> None:
    loaded = load_model_dir(paths.MODELS_DIR)
    test = load_processed().splits["test"]
    if not test.src:
        raise PipelineError(f"{paths.PROCESSED_DIR}: the test split is empty")
    settings = config.evaluate
    logger.info("translating %d test sentences (beam %d)", len(test.src), settings.beam_size)
    translator = Translator(
        loaded, length_penalty=settings.length_penalty, max_len_ratio=settings.max_len_ratio
    )
    hypotheses = translator.translate(
        list(test.src), beam_size=settings.beam_size, batch_size=settings.batch_size
    )
    references = list(test.tgt)
    metrics = {
        # Both sides are plain text as users write it; "force" only silences sacrebleu's guess that text
        # with spaced punctuation (as in the built-in corpus) was tokenized by us.
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references], force=True).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "test_loss": round(test_loss(loaded.model, EncodedSplit.from_lists(test.src_ids, test.tgt_ids)), 4),
        "n_test": len(references),
        "beam_size": settings.beam_size,
    }
    write_json(paths.METRICS, metrics)
    with atomic_file(paths.SAMPLES) as handle:
        for source, hypothesis, reference in list(zip(test.src, hypotheses, references, strict=True))[
            : settings.n_samples
        ]:
            handle.write(
                json.dumps({"source": source, "hypothesis": hypothesis, "reference": reference}) + "\n"
            )
    _log_to_train_run(metrics)
    logger.info(
        "test BLEU %.2f, chrF %.2f over %d sentences", metrics["bleu"], metrics["chrf"], metrics["n_test"]
    )


def _log_to_train_run(metrics: dict[str, float]) -> None:
    """The evaluate metrics belong to the run that trained the model (reports/train_run.json)."""
    if not paths.TRAIN_RUN.is_file():
        return
    run_id = json.loads(paths.TRAIN_RUN.read_text(encoding="utf-8")).get("mlflow_run_id")
    if run_id:
        from pipeline import tracking

        tracking.log_metrics(
            run_id, {f"test_{k}" if not k.startswith("test") else k: v for k, v in metrics.items()}
        )
        tracking.log_artifact(run_id, paths.SAMPLES)
