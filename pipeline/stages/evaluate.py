"""Stage `evaluate`: beam search on the test split, sacreBLEU and chrF on detokenized text.

Hypotheses come from the same `Translator` users call, fed the untokenized source text, so the score is
the score of what users get; references are the prepared (cleaned, untokenized) target text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline import paths
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.data.processed import ProcessedData, load_processed
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, outputs_together, write_json
from pipeline.network.batching import token_budget_batches
from pipeline.network.model_files import LoadedModel, load_model_dir
from pipeline.network.scoring import teacher_forced_loss
from pipeline.network.translator import translate_and_score
from pipeline.tracking import runs, store
from pipeline.tracking.lineage import metric_tag
from pipeline.tracking.train_run import TrainRun, read_train_run

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    # The run the scores are logged to, read before any work: a broken record must not cost a decoded test
    # set, nor leave new metrics.json and samples.jsonl behind an error.
    train_run = read_train_run()
    if train_run is not None:
        store.check_tracking_store()
    loaded = load_model_dir(paths.MODELS_DIR)
    processed = load_processed(splits=("validation", "test"))
    sources, references = processed.texts("test")
    if not sources:
        raise PipelineError(f"{paths.PROCESSED_DIR}: the test split is empty")
    settings, search = _chosen_length_penalty(loaded, processed, config.evaluate)
    logger.info("translating %d test sentences (beam %d)", len(sources), settings.beam_size)
    hypotheses, scored = translate_and_score(loaded, sources, references, settings)
    split = processed.encoded("test")
    loss, tokens = teacher_forced_loss(  # where translate_and_score left the model
        loaded.model,
        split,
        token_budget_batches(split, 8000, seed=None),
        next(loaded.model.parameters()).device,
    )
    metrics = {
        **scored.scores,
        "test_loss": round(loss / max(tokens, 1), 4),
        "n_test": len(references),
        "beam_size": settings.beam_size,
        "length_penalty": settings.length_penalty,
        **search,
        # Strings: `dvc metrics show` leaves them out, the registered version's tags keep them.
        **scored.signatures,
    }
    with outputs_together():
        write_json(paths.METRICS, metrics)
        _write_samples(list(zip(sources, hypotheses, references, strict=True))[: settings.n_samples])
    if train_run is not None:
        _log_to_train_run(train_run, metrics)
    logger.info(
        "test BLEU %.2f, chrF %.2f over %d sentences", metrics["bleu"], metrics["chrf"], metrics["n_test"]
    )


def _chosen_length_penalty(
    loaded: LoadedModel, processed: ProcessedData, settings: EvaluateConfig
) -> tuple[EvaluateConfig, dict[str, Any]]:
    """`evaluate.length_penalty_search`: the penalty with the best BLEU on the first validation sentences,
    and each candidate's BLEU there (recorded beside the test scores); the settings as they are without."""
    if not settings.length_penalty_search:
        return settings, {}
    sources, references = processed.texts("validation")
    sources, references = sources[: settings.search_sentences], references[: settings.search_sentences]
    by_penalty = {}
    for alpha in settings.length_penalty_search:
        trial = settings.model_copy(update={"length_penalty": alpha})
        by_penalty[alpha] = translate_and_score(loaded, sources, references, trial)[1].scores["bleu"]
        logger.info(
            "length penalty %g: validation BLEU %.2f (%d sentences)", alpha, by_penalty[alpha], len(sources)
        )
    best = max(by_penalty, key=lambda alpha: (by_penalty[alpha], -abs(alpha - settings.length_penalty)))
    search = {f"validation_bleu_length_penalty_{alpha:g}": bleu for alpha, bleu in by_penalty.items()}
    return settings.model_copy(update={"length_penalty": best}), search


def _write_samples(samples: list[tuple[str, str, str]]) -> None:
    with atomic_file(paths.SAMPLES) as handle:
        for source, hypothesis, reference in samples:
            handle.write(
                json.dumps({"source": source, "hypothesis": hypothesis, "reference": reference}) + "\n"
            )


def _log_to_train_run(train_run: TrainRun, metrics: dict[str, float | int | str]) -> None:
    """The evaluate metrics belong to the run that trained the model (reports/train_run.json): the numbers
    as metrics, the sacreBLEU signatures as tags, named as the registered version's tags are."""
    run_id = train_run.mlflow_run_id
    named = {metric_tag(key): value for key, value in metrics.items()}
    runs.log_metrics(run_id, {key: value for key, value in named.items() if not isinstance(value, str)})
    runs.set_tags(run_id, {key: value for key, value in named.items() if isinstance(value, str)})
    runs.log_artifact(run_id, paths.SAMPLES)
