"""What the register stage registers: models/ as a candidate version, read and checked. No MLflow here.

- The model folder is staged with params.yaml's evaluate decoding settings (`stage_model_dir`), then read
  with its test metrics and the test split, and hashed (`load_candidate`): the content hash makes
  registering idempotent, the test split hash says which BLEU scores are comparable.
- Tags and a description on the version say how it was made (`version_tags`, `version_description`).
- What its models-from-code pyfunc is made of: the code file, the model folder, a copy of the package and
  pinned requirements (`pyfunc_parts`).

`pipeline.stages.register` registers it through `pipeline.tracking.registry` and asks `gate` about the alias.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.files import file_sha256, read_json_object, write_json
from pipeline.network.model import settings_in_use
from pipeline.network.model_files import CONFIG_FILE, DECODING_FILE, MODEL_FILES, TGT_TOKENIZER_FILE
from pipeline.network.tokenization import load_tokenizer, lowercases
from pipeline.tracking import lineage
from pipeline.tracking.train_run import TrainRun, read_train_run

LOGGED_MODEL_NAME = "model"
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact that holds the model folder
BEAM_SIZE_PARAM = "beam_size"  # the pyfunc's inference parameter (its signature names it)
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
TAG_CONTENT_HASH = "model_content_sha256"
TAG_TEST_HASH = "test_data_sha256"
TAG_TEST_BLEU = "test_bleu"
TAG_LOWERCASE = "output_lowercase"  # "true" when the model writes lowercase only (the gate then uses bleu_lc)
# What the served model imports: MLflow's scoring server (pandas) and the pipeline code that rebuilds the
# network (torch, safetensors, tokenizers, numpy; pydantic and pyyaml through pipeline.config; sacrebleu
# through the translator, which scores when asked). tests/test_serving_requirements.py keeps it complete.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "sacrebleu",
)


@dataclass(frozen=True)
class Candidate:
    """What this run of the stage would register, read and checked before MLflow is touched."""

    model_dir: Path
    content_hash: str
    model_config: dict[str, Any]  # model_config.json
    decoding: dict[str, Any]  # decoding.json
    metrics: dict[str, Any]  # reports/metrics.json
    train_run: TrainRun | None  # None when models/ did not come from the train stage
    best_epoch: int | None  # from reports/train_metrics.json
    test_sources: list[str]
    test_references: list[str]
    test_hash: str
    lowercases: bool  # its target tokenizer lowercases: every output is lowercase
    parent: dict[str, Any] | None = None  # train_metrics.json's `init_from`: the model it continued from

    @property
    def bleu(self) -> float:
        return float(self.metrics["bleu"])

    def score(self, metric: str) -> float:
        return float(self.metrics[metric])


# ---------------------------------------------------------------------------------------------------------
# Inputs: the model folder, its test metrics, the test split
# ---------------------------------------------------------------------------------------------------------


def model_content_hash(model_dir: Path) -> str:
    """sha256 over every file of the model folder, in a fixed order: equal hash, equal translations."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode() + b"\0" + file_sha256(model_dir / name))
    return digest.hexdigest()


def test_split_hash(sources: list[str], references: list[str]) -> str:
    """sha256 of the test pairs as text: BLEU scores are comparable exactly when this is equal.

    Not the DVC hash of data/processed: that also changes with the tokenizers, which do not change the
    (detokenized) references BLEU is computed against.
    """
    payload = json.dumps({"src": sources, "tgt": references}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_candidate(model_dir: Path = paths.MODELS_DIR) -> Candidate:
    # Here, not at the top: the served pyfunc model imports this module for its constants, without pyarrow.
    from pipeline.data.processed import load_processed

    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise PipelineError(f"{model_dir} lacks {', '.join(missing)}: run `python -m pipeline train` first")
    metrics = read_json_object(paths.METRICS, "run `python -m pipeline evaluate` first")
    if not isinstance(metrics.get("bleu"), int | float):
        raise PipelineError(f"{paths.METRICS} has no numeric 'bleu': run `python -m pipeline evaluate` again")
    sources, references = load_processed(splits=("test",)).texts("test")
    if metrics.get("n_test") is not None and metrics["n_test"] != len(sources):
        raise PipelineError(
            f"{paths.METRICS} scores {metrics['n_test']} test sentences but {paths.PROCESSED_DIR} holds "
            f"{len(sources)}: it is stale, run `python -m pipeline evaluate` again"
        )
    train_run = read_train_run()
    best_epoch, parent = None, None
    if train_run is not None and paths.TRAIN_METRICS.is_file():
        train_metrics = read_json_object(paths.TRAIN_METRICS)
        best_epoch = train_metrics.get("best_epoch")
        parent = train_metrics.get("init_from") if isinstance(train_metrics.get("init_from"), dict) else None
    return Candidate(
        model_dir=model_dir,
        content_hash=model_content_hash(model_dir),
        model_config=read_json_object(model_dir / CONFIG_FILE, "run `python -m pipeline train` first"),
        decoding=read_json_object(model_dir / DECODING_FILE, "run `python -m pipeline train` first"),
        metrics=metrics,
        train_run=train_run,
        best_epoch=best_epoch,
        test_sources=sources,
        test_references=references,
        test_hash=test_split_hash(sources, references),
        lowercases=lowercases(load_tokenizer(model_dir / TGT_TOKENIZER_FILE)),
        parent=parent,
    )


def stage_model_dir(source: Path, settings: EvaluateConfig, staging: Path) -> Path:
    """A copy of the model folder whose decoding.json holds params.yaml's evaluate settings: the model
    is served with the beam search its test BLEU was measured with (train writes only defaults)."""
    if not source.is_dir():
        raise PipelineError(f"{source} not found: run `python -m pipeline train` first")
    target = staging / source.name
    shutil.copytree(source, target)
    write_json(target / DECODING_FILE, settings.decoding())
    return target


# ---------------------------------------------------------------------------------------------------------
# Tags and description: how the version was made
# ---------------------------------------------------------------------------------------------------------


def version_tags(config: PipelineConfig, candidate: Candidate) -> dict[str, str]:
    model = candidate.model_config
    tags = {
        **lineage.git_tags(),
        lineage.TAG_USER: lineage.user(),
        lineage.TAG_DATA_HASH: lineage.processed_data_hash(),
        "data.source": config.data.source,
        "data.src_lang": config.data.src_lang,
        "data.tgt_lang": config.data.tgt_lang,
        "model.src_vocab_size": str(model.get("src_vocab_size")),
        "model.tgt_vocab_size": str(model.get("tgt_vocab_size")),
        TAG_CONTENT_HASH: candidate.content_hash,
        TAG_TEST_HASH: candidate.test_hash,
        TAG_LOWERCASE: str(candidate.lowercases).lower(),
    }
    # Only what the architecture reads: a GRU version tagged with n_heads would claim a setting it ignores.
    settings = settings_in_use(model.get("model", {}))
    tags.update({f"model.{key}": str(value) for key, value in settings.items()})
    tags.update({f"decoding.{key}": str(value) for key, value in candidate.decoding.items()})
    tags.update({lineage.metric_tag(key): str(value) for key, value in candidate.metrics.items()})
    run = candidate.train_run
    if run is not None:
        tags.update({"train.ray_run_name": run.ray_run_name, "train.mlflow_run_id": run.mlflow_run_id})
    if candidate.best_epoch is not None:
        tags["train.best_epoch"] = str(candidate.best_epoch)
    tags.update(lineage.parent_version_tags(candidate.parent))
    return tags


def version_description(config: PipelineConfig, candidate: Candidate) -> str:
    vocab = candidate.model_config
    sizes = (
        f"{lineage.describe_model(vocab.get('model', {}))}; vocabularies {vocab.get('src_vocab_size')}"
        f" (source) and {vocab.get('tgt_vocab_size')} (target)"
    )
    run = candidate.train_run
    if run is not None:
        training = (
            f"Trained with Ray Train (run {run.ray_run_name}, MLflow run {run.mlflow_run_id}): "
            f"best epoch {candidate.best_epoch} of at most {config.train.epochs} by validation loss."
        )
    else:
        training = "Trained outside the train stage (no reports/train_run.json)."
    metrics, data, corpus = candidate.metrics, config.data, lineage.processed_data_hash()
    continued = lineage.parent_description(candidate.parent, corpus)
    return (
        f"{sizes}. {training}{' ' + continued if continued else ''} Data: {data.source}"
        f" {data.src_lang}->{data.tgt_lang} (data/processed md5 {corpus}). Test: BLEU {metrics['bleu']},"
        f" chrF {metrics.get('chrf')} on {metrics.get('n_test')} sentences (beam {metrics.get('beam_size')})."
    )


# ---------------------------------------------------------------------------------------------------------
# Logging the pyfunc model
# ---------------------------------------------------------------------------------------------------------


def pinned_requirements() -> list[str]:
    pins = []
    for distribution in SERVING_DISTRIBUTIONS:
        # "2.13.0+cpu": a local label names a wheel index (PyTorch's CPU or CUDA builds), which PyPI lacks.
        pins.append(f"{distribution}=={importlib.metadata.version(distribution).split('+')[0]}")
    return pins


def _copy_package_source(target: Path) -> Path:
    """A copy of the `pipeline` package without bytecode caches: what `code_paths` ships with the model."""
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, target / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target / package.name


def pyfunc_parts(candidate: Candidate, code_dir: Path) -> dict[str, Any]:
    """The arguments of `mlflow.pyfunc.log_model` that say what the model is made of (all but its name and
    signature): this package copied into `code_dir` travels with the model as `code_paths`."""
    return {
        "python_model": str(PYFUNC_FILE),  # a path: models from code, nothing pickled
        "artifacts": {MODEL_DIR_ARTIFACT: str(candidate.model_dir.resolve())},
        "code_paths": [str(_copy_package_source(code_dir))],
        "input_example": candidate.test_sources[:2] or ["A sentence to translate."],
        "pip_requirements": pinned_requirements(),
    }
