"""The register stage's logic: log models/ as a pyfunc, register it once, and gate the `champion` alias.

- Idempotent: a version is tagged with a content hash of the model files (weights, config, tokenizers,
  decoding settings). Registering the same files again finds that version instead of adding one.
- Promotion gate: every new version takes the alias `challenger`; `champion` moves to it only when its
  test BLEU beats the champion's by at least `register.min_improvement` (a tie keeps the incumbent). BLEU
  is only comparable on the same test sentences, so each version carries a hash of the test split it was
  scored on; when the champion's differs, the champion is downloaded and re-scored on the current split
  first (with the evaluate stage's decoding settings, the ones the challenger's BLEU was measured with).
- Lineage: tags on the version say which commit, data, config and run produced it, and why the gate
  decided what it did; reports/registry.json repeats the decision for DVC.

The candidate itself (staging and hashing the model folder, its tags and description, logging the pyfunc)
is `pipeline.registry_candidate`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import paths, tracking
from pipeline.atomic import write_json
from pipeline.config import PipelineConfig
from pipeline.data.encoded import ProcessedSplit
from pipeline.registry_candidate import (
    TAG_CONTENT_HASH,
    TAG_TEST_BLEU,
    TAG_TEST_HASH,
    Candidate,
    load_candidate,
    log_pyfunc_model,
    stage_model_dir,
    version_description,
    version_tags,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_DECISION = "gate_decision"
TAG_REASON = "gate_reason"
TAG_GATE_CHAMPION = "gate_champion_version"
TAG_GATE_CHAMPION_BLEU = "gate_champion_bleu"
RESCORED_TAG_PREFIX = "bleu_on_test_"  # + test hash prefix: a champion's re-score, kept so it runs once


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None = None  # the incumbent the candidate was compared with
    champion_bleu: float | None = None
    rescored: bool = False


# ---------------------------------------------------------------------------------------------------------
# Creating the version
# ---------------------------------------------------------------------------------------------------------


def _run_for_model(config: PipelineConfig, candidate: Candidate) -> str:
    """The train run from reports/train_run.json if this store has it, else a register run of its own."""
    client = tracking._client()
    run_id = candidate.train_run.get("mlflow_run_id")
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            logger.warning("train run %s is not in this MLflow store: logging into a register run", run_id)
    run_key = f"register-{candidate.content_hash[:16]}"
    return tracking.get_or_create_run(
        config.tracking.experiment,
        run_key=run_key,
        run_name=run_key,
        tags=tracking.lineage_tags("register"),
        params=tracking.config_params(config, ("data", "preprocess", "model")),
    )


def _ensure_registered_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tracking._client().create_registered_model(
            name, description="GRU encoder-decoder translation models from the seq2seq pipeline"
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def create_version(config: PipelineConfig, candidate: Candidate) -> ModelVersion:
    """Log the model into its run and register it; the gate's tags come later, once it has decided."""
    run_id = _run_for_model(config, candidate)
    info = log_pyfunc_model(run_id, candidate)
    name = config.registry.model_name
    _ensure_registered_model(name)
    version = tracking._client().create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags=version_tags(config, candidate),
        description=version_description(config, candidate),
    )
    tracking.set_tags(run_id, {"registered_model_version": f"{name}/{version.version}"})
    return version


def find_version(name: str, content_hash: str) -> ModelVersion | None:
    """The version already registered with these exact model files, if any."""
    for version in tracking._client().search_model_versions(f"name='{name}'"):
        if version.tags.get(TAG_CONTENT_HASH) == content_hash:
            return version
    return None


# ---------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------


def rescore(config: PipelineConfig, name: str, version: str, test: ProcessedSplit) -> float:
    """Download a registered version and compute its sacreBLEU on `test`, as the evaluate stage would."""
    from pipeline.model_io import load_model_dir
    from pipeline.scoring import translate_and_score

    logger.info("re-scoring %s version %s on the current test split (%d sentences)", name, version, len(test))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model_dir(tracking.download_model_dir(f"models:/{name}/{version}", Path(tmp)))
    return translate_and_score(loaded, test.src, test.tgt, config.evaluate)[1]["bleu"]


def champion_bleu_on(
    config: PipelineConfig, name: str, champion: ModelVersion, candidate: Candidate
) -> tuple[float, bool]:
    """The champion's BLEU on the candidate's test split: its own tag if scored there, else a re-score."""
    if champion.tags.get(TAG_TEST_HASH) == candidate.test_hash and TAG_TEST_BLEU in champion.tags:
        return float(champion.tags[TAG_TEST_BLEU]), False
    cache_tag = RESCORED_TAG_PREFIX + candidate.test_hash[:16]
    if cache_tag in champion.tags:
        return float(champion.tags[cache_tag]), True
    bleu = rescore(config, name, champion.version, candidate.test)
    tracking._client().set_model_version_tag(name, champion.version, cache_tag, str(bleu))
    return bleu, True


def decide(config: PipelineConfig, version: ModelVersion, candidate: Candidate) -> Decision:
    name = config.registry.model_name
    client = tracking._client()
    champion_number = client.get_registered_model(name).aliases.get(CHAMPION)
    if champion_number is None:
        return Decision(True, "first version: there was no champion")
    if str(champion_number) == str(version.version):
        return Decision(True, "already the champion", str(champion_number), candidate.bleu)
    champion = client.get_model_version(name, str(champion_number))
    champion_bleu, rescored = champion_bleu_on(config, name, champion, candidate)
    gain = round(candidate.bleu - champion_bleu, 2)
    where = "re-scored on the current test split" if rescored else "on the same test split"
    required = config.registry.min_improvement
    promote = gain > 0 and gain >= required
    verdict = "beats" if promote else "does not beat"
    reason = (
        f"test BLEU {candidate.bleu:.2f} {verdict} champion version {champion.version}'s {champion_bleu:.2f} "
        f"({where}) by the required {required:g} (gain {gain:+.2f})"
    )
    return Decision(promote, reason, str(champion.version), champion_bleu, rescored)


def apply_decision(name: str, version: str, decision: Decision) -> None:
    """Aliases first, decision tags last: a version without a decision tag is one the gate never finished."""
    client = tracking._client()
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    tags = {TAG_DECISION: "promoted" if decision.promote else "rejected", TAG_REASON: decision.reason}
    if decision.champion_version is not None:
        tags[TAG_GATE_CHAMPION] = decision.champion_version
        tags[TAG_GATE_CHAMPION_BLEU] = str(decision.champion_bleu)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def _report(
    name: str, version: int | str, candidate: Candidate, outcome: str, decision: Decision, new_version: bool
) -> dict[str, Any]:
    aliases = tracking._client().get_registered_model(name).aliases
    compared_with = decision.champion_version
    return {
        "model_name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "aliases": sorted(alias for alias, number in aliases.items() if str(number) == str(version)),
        "champion_version": int(aliases[CHAMPION]) if CHAMPION in aliases else None,
        "decision": outcome,
        "reason": decision.reason,
        "new_version": new_version,
        "challenger_bleu": candidate.bleu,
        "champion_bleu": decision.champion_bleu,
        "champion_rescored": decision.rescored,
        "compared_with_version": None if compared_with is None else int(compared_with),
        "content_hash": candidate.content_hash,
        "test_data_hash": candidate.test_hash,
    }


def register_model(config: PipelineConfig) -> dict[str, Any]:
    """Register models/ (at most once), run the gate, write reports/registry.json; returns the report."""
    with tempfile.TemporaryDirectory() as staging:
        return _register_staged(config, stage_model_dir(paths.MODELS_DIR, config.evaluate, Path(staging)))


def _register_staged(config: PipelineConfig, model_dir: Path) -> dict[str, Any]:
    candidate = load_candidate(model_dir)
    name = config.registry.model_name
    existing = find_version(name, candidate.content_hash)
    if existing is not None and TAG_DECISION in existing.tags:
        reason = (
            f"version {existing.version} already holds these model files (content hash "
            f"{candidate.content_hash[:12]}); its gate decision was: {existing.tags[TAG_DECISION]}, "
            f"{existing.tags.get(TAG_REASON, '')}"
        )
        unchanged = Decision(False, reason)
        report = _report(name, existing.version, candidate, "unchanged", unchanged, new_version=False)
    else:
        # An existing version without a decision tag is one whose gate was interrupted: finish it.
        version = existing or create_version(config, candidate)
        decision = decide(config, version, candidate)
        apply_decision(name, str(version.version), decision)
        outcome = "promoted" if decision.promote else "rejected"
        report = _report(name, version.version, candidate, outcome, decision, new_version=existing is None)
    write_json(paths.REGISTRY_REPORT, report)
    return report
