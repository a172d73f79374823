"""Where a result came from: the git commit of the code and the DVC hash of the encoded data, and the
config as flat key/value pairs. No MLflow here: these are what runs and versions get tagged with."""

from __future__ import annotations

import getpass
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import paths
from pipeline.config import REGISTRY_PREFIX, PipelineConfig, registry_ref

# MLflow's own tag names, so its UI fills in the run's source, commit and user.
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # a plain hash, as MLflow and git itself write it
TAG_USER = "mlflow.user"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_DESCRIPTION = "mlflow.note.content"  # the run's Description panel
# "true" when tracked files had uncommitted changes: the code that ran was not exactly the commit's.
TAG_GIT_DIRTY = "git_dirty"
TAG_DATA_HASH = "dvc_data_processed_md5"
TAG_STAGE = "pipeline_stage"
# The uploaded copy of a Ray job has no .git, so `submit` passes the commit and whether the tree was dirty
# in these variables, and the submitting user in the last (on the cluster the job runs as its own user).
GIT_COMMIT_ENV = "PIPELINE_GIT_COMMIT"
GIT_DIRTY_ENV = "PIPELINE_GIT_DIRTY"
USER_ENV = "PIPELINE_USER"


@dataclass(frozen=True)
class GitState:
    commit: str  # the full hash of HEAD
    dirty: bool  # tracked files differ from it (untracked files do not count)

    @property
    def dirty_flag(self) -> str:
        return "true" if self.dirty else "false"


def read_git_state(project_root: Path = Path(".")) -> GitState | None:
    """HEAD and whether tracked files were changed; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        # --no-optional-locks: only read the index, even when git would like to refresh it.
        changes = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return GitState(commit.stdout.strip(), dirty=bool(changes))


def git_tags() -> dict[str, str]:
    """The commit the code came from and whether it had uncommitted changes: what `submit` passed, else
    git's answer, else "unknown" for both."""
    if os.environ.get(GIT_COMMIT_ENV):
        return {
            TAG_GIT_COMMIT: os.environ[GIT_COMMIT_ENV],
            TAG_GIT_DIRTY: os.environ.get(GIT_DIRTY_ENV) or "unknown",
        }
    state = read_git_state()
    if state is None:
        return {TAG_GIT_COMMIT: "unknown", TAG_GIT_DIRTY: "unknown"}
    return {TAG_GIT_COMMIT: state.commit, TAG_GIT_DIRTY: state.dirty_flag}


def processed_data_hash() -> str:
    """The md5 DVC recorded for data/processed in dvc.lock: ties a run to the exact encoded data."""
    if not paths.DVC_LOCK.is_file():
        return "unknown"
    lock = yaml.safe_load(paths.DVC_LOCK.read_text(encoding="utf-8")) or {}
    for out in lock.get("stages", {}).get("preprocess", {}).get("outs", []):
        if Path(out.get("path", "")) == paths.PROCESSED_DIR:
            return str(out.get("md5", "unknown"))
    return "unknown"


def user() -> str:
    """Who ran it: the user `submit` passed, else this process's user (what MLflow itself records)."""
    try:
        return os.environ.get(USER_ENV) or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


ARCH_DESCRIPTIONS = {
    "gru": "GRU encoder-decoder with a fixed context vector (Cho et al. 2014)",
    "gru_attention": "bidirectional GRU encoder, GRU decoder with additive attention (Bahdanau et al. 2015)",
    "transformer": "pre-norm Transformer encoder-decoder with multi-head attention (Vaswani et al. 2017)",
}


def describe_model(model: dict[str, Any]) -> str:
    """The architecture and its sizes in words, from model.* settings: run and version descriptions."""
    arch = ARCH_DESCRIPTIONS.get(model.get("arch"), str(model.get("arch")))
    if model.get("arch") == "transformer":
        shape = (
            f"width {model.get('emb_dim')}, {model.get('n_heads')} heads, feed-forward {model.get('ff_dim')} "
            f"({model.get('ff_activation')}), {model.get('n_layers')} encoder and decoder layer(s)"
        )
    else:
        shape = (
            f"embeddings {model.get('emb_dim')}, hidden {model.get('hidden_dim')}, "
            f"{model.get('n_layers')} layer(s)"
        )
    return f"{arch}: {shape}, dropout {model.get('dropout')}"


def run_description(stage: str, config: PipelineConfig) -> str:
    """What a stage's MLflow run is, in a sentence or two (Markdown, shown as the run's description)."""
    data = config.data
    corpus = f"`{data.source}`, {data.src_lang} -> {data.tgt_lang}"
    if stage == "tune":
        keys = ", ".join(f"`{key}`" for key in config.tune.search_space) or "nothing"
        return (
            f"Ray Tune search of seq2seq-pipeline: {config.tune.num_samples} trials over {keys}, each a "
            f"Ray Train run of up to {config.tune.max_epochs} epochs scored by `{config.tune.metric}`; one "
            f"child run per trial. Data: {corpus}."
        )
    if stage == "train":
        return (
            f"Ray Train run of seq2seq-pipeline ({config.runtime.num_workers} DDP workers, up to "
            f"{config.train.epochs} epochs). {describe_model(config.model.model_dump())}. Data: {corpus}. "
            "Per-epoch metrics here; the evaluate stage adds the test scores, register the model."
        )
    return f"The `{stage}` stage of seq2seq-pipeline. Data: {corpus}."


def lineage_tags(stage: str, config: PipelineConfig) -> dict[str, str]:
    return {
        TAG_DESCRIPTION: run_description(stage, config),
        **git_tags(),
        TAG_USER: user(),
        TAG_SOURCE_NAME: f"python -m pipeline {stage}",
        TAG_SOURCE_TYPE: "JOB" if os.environ.get(GIT_COMMIT_ENV) else "LOCAL",
        TAG_DATA_HASH: processed_data_hash(),
        TAG_STAGE: stage,
    }


def experiment_name(config: PipelineConfig) -> str:
    """$MLFLOW_EXPERIMENT_NAME over tracking.experiment, as MLflow itself ranks them."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.tracking.experiment


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"model": {"emb_dim": 8}} -> {"model.emb_dim": 8}: MLflow params are flat strings."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: value}


def config_params(config: PipelineConfig, sections: tuple[str, ...]) -> dict[str, str]:
    dumped = config.model_dump(mode="json")
    params = {}
    for section in sections:
        params.update(flatten(section, dumped[section]))
    return {key: str(value)[:6000] for key, value in params.items()}


def metric_tag(key: str) -> str:
    """bleu -> test_bleu, test_loss stays, and so do the decoding settings chosen on the validation split
    (length_penalty, validation_bleu_length_penalty_*): the names evaluate logs to the train run."""
    return key if key.startswith(("test", "validation_", "length_penalty")) else f"test_{key}"


# ---------------------------------------------------------------------------------------------------------
# Continued training: the parent a model was trained from (`train.init_from`)
# ---------------------------------------------------------------------------------------------------------

TAG_PARENT_MODEL = "parent_model"  # the train run's: train.init_from as given
TAG_PARENT_VERSION = "parent_model_version"
TAG_PARENT_NAME = "parent_model_name"  # the registered version's
TAG_PARENT_FOLDER = "parent_model_folder"
TAG_PARENT_WEIGHTS = "parent_model_weights_sha256"


def parent_entry(init_from: str, weights_sha256: str) -> dict[str, str | None]:
    """reports/train_metrics.json's `init_from`: the parent as given, its registered name and version (None
    for a folder) and the sha256 of its weights file, which names it whatever it is called."""
    ref = registry_ref(init_from) if init_from.startswith(REGISTRY_PREFIX) else None
    return {
        "uri": init_from,
        "name": ref.name if ref else None,
        "version": ref.version if ref else None,
        "weights_sha256": weights_sha256,
    }


def parent_run_tags(entry: dict[str, str | None]) -> dict[str, str]:
    """The train run's tags naming its parent."""
    tags = {TAG_PARENT_MODEL: str(entry["uri"]), TAG_PARENT_WEIGHTS: str(entry["weights_sha256"])}
    if entry.get("version"):
        tags[TAG_PARENT_VERSION] = str(entry["version"])
    return tags


def parent_version_tags(entry: dict[str, Any] | None) -> dict[str, str]:
    """A registered version's tags naming the model it was continued from; none for one trained from
    scratch (`entry` None)."""
    if entry is None:
        return {}
    tags = {TAG_PARENT_WEIGHTS: str(entry.get("weights_sha256"))}
    if entry.get("name"):
        tags.update({TAG_PARENT_NAME: str(entry["name"]), TAG_PARENT_VERSION: str(entry.get("version"))})
    else:
        tags[TAG_PARENT_FOLDER] = str(entry.get("uri"))
    return tags


def parent_description(entry: dict[str, Any] | None, corpus_hash: str) -> str:
    """The sentence of a registered version's description that says what it was continued from, on which
    corpus (DVC's hash of data/processed); empty for a model trained from scratch."""
    if entry is None:
        return ""
    if entry.get("name"):
        parent = f"{entry['name']} v{entry.get('version')}"
    else:
        sha = str(entry.get("weights_sha256"))[:12]
        parent = f"the model folder {entry.get('uri')} (weights sha256 {sha})"
    return f"Continued from {parent} on corpus {corpus_hash}."
