"""Stage `register`: models/ -> a registered model version, the champion gate, reports/registry.json.

- Idempotent: a version is tagged with a content hash of the model files (weights, config, tokenizers,
  decoding settings). Registering the same files again finds that version instead of adding one; a version
  whose gate never finished (no decision tag) is finished instead.
- Every new version takes the alias `challenger`; `champion` moves as `tracking.gate` decides. BLEU is only
  comparable on the same test sentences, so each version carries a hash of the test split it was scored
  on; when the champion's differs, the champion is downloaded and re-scored on the current split first
  (with the evaluate settings the candidate's BLEU was measured with), and the re-score kept as a tag.
- Lineage: tags on the version say which commit, data, config and run produced it, and why the gate
  decided what it did; reports/registry.json repeats the decision for DVC.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import paths
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.files import read_json_object, write_json
from pipeline.network.model_files import load_model_dir
from pipeline.network.translator import translate_and_score
from pipeline.tracking import candidate as candidates
from pipeline.tracking import gate, lineage, registry, runs, store
from pipeline.tracking.candidate import Candidate

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_DECISION = "gate_decision"
TAG_REASON = "gate_reason"
TAG_GATE_CHAMPION = "gate_champion_version"
TAG_GATE_CHAMPION_BLEU = "gate_champion_bleu"
TAG_GATE_METRIC = "gate_metric"  # bleu, or bleu_lc when either model writes lowercase only
RESCORED_TAG_PREFIX = "bleu_on_test_"  # + test hash prefix: a champion's re-score, kept so it runs once
REGISTERED_MODEL_DESCRIPTION = "Encoder-decoder translation models from the seq2seq pipeline"


def run(config: PipelineConfig) -> None:
    store.check_tracking_store()
    with tempfile.TemporaryDirectory() as staging:
        model_dir = candidates.stage_model_dir(paths.MODELS_DIR, _as_evaluated(config), Path(staging))
        report = register(config, candidates.load_candidate(model_dir))
    write_json(paths.REGISTRY_REPORT, report)
    logger.info(
        "%s version %s: %s (%s); aliases %s -> %s",
        report["model_name"],
        report["version"],
        report["decision"],
        report["reason"],
        ", ".join(report["aliases"]) or "none",
        paths.REGISTRY_REPORT,
    )


def _as_evaluated(config: PipelineConfig) -> EvaluateConfig:
    """The decoding settings the test scores were measured with: params.yaml's, with the length penalty
    the evaluate stage chose when it searched one (`evaluate.length_penalty_search`)."""
    chosen = read_json_object(paths.METRICS, "run `python -m pipeline evaluate` first").get("length_penalty")
    if isinstance(chosen, int | float) and not isinstance(chosen, bool):
        return config.evaluate.model_copy(update={"length_penalty": float(chosen)})
    return config.evaluate


def register(config: PipelineConfig, candidate: Candidate) -> dict[str, Any]:
    """Register the candidate (at most once), run the gate; returns the report."""
    name = config.register.model_name
    existing = registry.find_model_version(name, candidates.TAG_CONTENT_HASH, candidate.content_hash)
    if existing is not None and TAG_DECISION in existing.tags:
        reason = (
            f"version {existing.version} already holds these model files (content hash "
            f"{candidate.content_hash[:12]}); its gate decision was: {existing.tags[TAG_DECISION]}, "
            f"{existing.tags.get(TAG_REASON, '')}"
        )
        return _report(name, existing.version, candidate, "unchanged", gate.Decision(False, reason), False)
    version = existing or _create_version(config, candidate)
    champion = _champion_score(config, name, str(version.version), candidate)
    metric = champion.metric if champion is not None else "bleu"
    decision = gate.decide(
        str(version.version), candidate.score(metric), champion, config.register.min_improvement
    )
    _apply(name, str(version.version), decision)
    outcome = "promoted" if decision.promote else "rejected"
    return _report(name, version.version, candidate, outcome, decision, existing is None)


def _create_version(config: PipelineConfig, candidate: Candidate) -> ModelVersion:
    """Log the model into its run and register it; the gate's tags come later, once it has decided."""
    run_id = _run_for_model(config, candidate)
    with tempfile.TemporaryDirectory() as code_dir:
        info = registry.log_pyfunc_model(
            run_id,
            candidates.LOGGED_MODEL_NAME,
            signature=registry.model_signature(
                int(candidate.decoding["beam_size"]), candidates.BEAM_SIZE_PARAM
            ),
            **candidates.pyfunc_parts(candidate, Path(code_dir)),
        )
    name = config.register.model_name
    registry.ensure_registered_model(name, REGISTERED_MODEL_DESCRIPTION)
    version = registry.create_model_version(
        name,
        info,
        run_id,
        tags=candidates.version_tags(config, candidate),
        description=candidates.version_description(config, candidate),
    )
    runs.set_tags(run_id, {"registered_model_version": f"{name}/{version.version}"})
    return version


def _run_for_model(config: PipelineConfig, candidate: Candidate) -> str:
    """The train run from reports/train_run.json if this store has it, else a register run of its own."""
    if candidate.train_run is not None:
        run_id = candidate.train_run.mlflow_run_id
        if runs.existing_run(run_id):
            return run_id
        logger.warning("train run %s is not in this MLflow store: logging into a register run", run_id)
    run_key = f"register-{candidate.content_hash[:16]}"
    return runs.get_or_create_run(
        lineage.experiment_name(config),
        run_key=run_key,
        run_name=run_key,
        tags=lineage.lineage_tags("register", config),
        params=lineage.config_params(config, ("data", "preprocess", "model")),
    )


def _champion_score(
    config: PipelineConfig, name: str, version: str, candidate: Candidate
) -> gate.ChampionScore | None:
    """The champion's score on the candidate's test split, in the metric the gate compares (lowercase BLEU
    when either model writes lowercase only): its own tag if scored there, else a re-score."""
    number = registry.model_aliases(name).get(CHAMPION)
    if number is None:
        return None
    if number == version:  # an interrupted gate had already moved the alias: nothing to compare
        return gate.ChampionScore(number, candidate.bleu, rescored=False)
    champion = registry.get_model_version(name, number)
    metric = gate.gate_metric(candidate.lowercases, champion.tags.get(candidates.TAG_LOWERCASE) == "true")
    own_tag = lineage.metric_tag(metric)
    if champion.tags.get(candidates.TAG_TEST_HASH) == candidate.test_hash and own_tag in champion.tags:
        return gate.ChampionScore(number, float(champion.tags[own_tag]), rescored=False, metric=metric)
    cache_tag = f"{RESCORED_TAG_PREFIX}{candidate.test_hash[:16]}" + ("_lc" if metric == "bleu_lc" else "")
    if cache_tag not in champion.tags:
        score = _rescore(config, name, number, candidate)[metric]
        registry.set_version_tags(name, number, {cache_tag: str(score)})
        return gate.ChampionScore(number, score, rescored=True, metric=metric)
    return gate.ChampionScore(number, float(champion.tags[cache_tag]), rescored=True, metric=metric)


def _rescore(config: PipelineConfig, name: str, version: str, candidate: Candidate) -> dict[str, float]:
    """Download a registered version and compute its scores on the candidate's test split."""
    n_test = len(candidate.test_sources)
    logger.info("re-scoring %s version %s on the current test split (%d sentences)", name, version, n_test)
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download_model_dir(
            f"models:/{name}/{version}", Path(tmp), candidates.MODEL_DIR_ARTIFACT
        )
        loaded = load_model_dir(folder)
    sources, references = candidate.test_sources, candidate.test_references
    return translate_and_score(loaded, sources, references, config.evaluate)[1].scores


def _apply(name: str, version: str, decision: gate.Decision) -> None:
    """Aliases first, decision tags last: a version without a decision tag is one the gate never finished."""
    registry.set_alias(name, CHALLENGER, version)
    if decision.promote:
        registry.set_alias(name, CHAMPION, version)
    tags = {TAG_DECISION: "promoted" if decision.promote else "rejected", TAG_REASON: decision.reason}
    if decision.champion_version is not None:
        tags[TAG_GATE_CHAMPION] = decision.champion_version
        tags[TAG_GATE_CHAMPION_BLEU] = str(decision.champion_bleu)
        tags[TAG_GATE_METRIC] = decision.metric
    registry.set_version_tags(name, version, tags)


def _report(
    name: str,
    version: int | str,
    candidate: Candidate,
    outcome: str,
    decision: gate.Decision,
    new_version: bool,
) -> dict[str, Any]:
    aliases = registry.model_aliases(name)
    compared_with = decision.champion_version
    return {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "aliases": sorted(alias for alias, number in aliases.items() if number == str(version)),
        "champion_version": int(aliases[CHAMPION]) if CHAMPION in aliases else None,
        "decision": outcome,
        "reason": decision.reason,
        "new_version": new_version,
        "challenger_bleu": candidate.bleu,
        "gate_metric": decision.metric,
        "champion_bleu": decision.champion_bleu,
        "champion_rescored": decision.rescored,
        "compared_with_version": None if compared_with is None else int(compared_with),
        "content_hash": candidate.content_hash,
        "test_data_hash": candidate.test_hash,
    }
