"""The continued-training loop as users run it, through real `dvc repro` in a fresh git repo: a first
champion trained from scratch on a DVC-tracked corpus under corpus/, pairs added to the corpus, the champion
pinned with `set-params train.init_from=models:/seq2seq-translator@champion`, and a second `dvc repro` that
preprocesses with the parent's tokenizers, trains from its weights (real Ray Train, 2 gloo workers, the
weights through the object store), evaluates and registers version 2 with its parent named, in a real SQLite
MLflow store. The loop runs once, in the module's fixture; each test checks one part of what it left.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import commit_all, make_dvc_project, run
from tests.helpers import TINY_PARAMS, deep_merge

pytestmark = pytest.mark.slow

MODEL_NAME = "seq2seq-translator"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
PINNED_URI = f"models:/{MODEL_NAME}/1"
CORPUS = "corpus/pairs"
FIRST_PAIRS, ADDED_PAIRS = 1000, 500
LOOP_PARAMS = deep_merge(
    TINY_PARAMS,
    {
        "data": {"source": CORPUS, "src_lang": "en", "tgt_lang": "art"},
        # Small batches: enough updates in 2 epochs that the first model is far from its initial loss.
        "train": {"epochs": 2, "batch_size": 600, "lr": 0.01},
    },
)
CONTINUED_STAGES = ("prepare", "preprocess", "train", "evaluate", "register")
TOKENIZERS = ("src_tokenizer.json", "tgt_tokenizer.json")


@dataclass(frozen=True)
class Loop:
    project: Path
    first_history: list[dict[str, str]]  # reports/train_history.csv of the run from scratch
    first_registry: dict  # reports/registry.json after the first `dvc repro`
    set_params_output: str
    pinned_params: dict  # params.yaml right after set-params
    continued_log: str  # the second `dvc repro`'s output
    log: str  # every command's output


def _write_pairs(folder: Path, pairs: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.en").write_text("".join(f"{source}\n" for source, _ in pairs), encoding="utf-8")
    (folder / "train.art").write_text("".join(f"{target}\n" for _, target in pairs), encoding="utf-8")


def _history(project: Path) -> list[dict[str, str]]:
    with (project / "reports/train_history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Loop:
    from pipeline.data.builtin_corpus import generate_corpus

    project = make_dvc_project(tmp_path_factory.mktemp("loop"), LOOP_PARAMS)
    pairs = generate_corpus(FIRST_PAIRS + ADDED_PAIRS, seed=13)
    outputs: list[str] = []

    def step(*command: str) -> str:
        result = run(list(command), project, timeout=1200)
        outputs.append(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    # 1. A first champion, from scratch, on a DVC-tracked corpus.
    _write_pairs(project / CORPUS, pairs[:FIRST_PAIRS])
    step("dvc", "add", CORPUS)
    commit_all(project, "corpus")
    step("dvc", "repro")
    first_history = _history(project)
    first_registry = json.loads((project / "reports/registry.json").read_text())
    commit_all(project, "first model")

    # 2. The corpus grows.
    _write_pairs(project / CORPUS, pairs)
    step("dvc", "add", CORPUS)
    commit_all(project, "more pairs")

    # 3. The champion, pinned as the parent.
    set_params_output = step("python", "-m", "pipeline", "set-params", f"train.init_from={CHAMPION_URI}")
    pinned_params = yaml.safe_load((project / "params.yaml").read_text())
    commit_all(project, "continue from the champion")

    # 4. The continued run.
    continued_log = step("dvc", "repro")
    (project / "loop.log").write_text("\n".join(outputs))  # to read after a failure
    return Loop(
        project,
        first_history,
        first_registry,
        set_params_output,
        pinned_params,
        continued_log,
        "\n".join(outputs),
    )


def test_set_params_pins_the_champion_alias_to_version_1(loop: Loop) -> None:
    first = loop.first_registry
    assert (first["version"], first["aliases"]) == (1, ["challenger", "champion"]), first
    assert (
        f"train.init_from: {CHAMPION_URI} is version 1; params.yaml pins {PINNED_URI}"
        in loop.set_params_output
    )
    assert loop.pinned_params["train"]["init_from"] == PINNED_URI
    assert loop.pinned_params["tune"]["num_samples"] == 0


def test_the_continued_repro_runs_every_stage_from_prepare_to_register_without_a_traceback(
    loop: Loop,
) -> None:
    for stage in CONTINUED_STAGES:
        assert f"Running stage '{stage}'" in loop.continued_log, (stage, loop.continued_log[-4000:])
    assert "Traceback" not in loop.log, loop.log[loop.log.index("Traceback") - 500 :][:4000]


@pytest.fixture(scope="module")
def parent(loop: Loop, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1's model folder, downloaded from the project's store."""
    from pipeline.tracking.candidate import MODEL_DIR_ARTIFACT
    from pipeline.tracking.registry import download_model_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(loop.project)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{loop.project / 'mlflow.db'}")
        return download_model_dir(PINNED_URI, tmp_path_factory.mktemp("parent"), MODEL_DIR_ARTIFACT)


def test_preprocess_encoded_the_grown_corpus_with_the_parents_tokenizers(loop: Loop, parent: Path) -> None:
    processed = loop.project / "data/processed"
    for name in TOKENIZERS:
        assert (processed / name).read_bytes() == (parent / name).read_bytes(), name
    meta = json.loads((processed / "meta.json").read_text())
    assert meta["tokenizers_from"] == PINNED_URI
    assert sum(meta["pairs"].values()) > FIRST_PAIRS, meta["pairs"]
    assert "using the tokenizers of" in loop.continued_log


def test_the_train_run_and_its_metrics_name_the_parent(loop: Loop, parent: Path) -> None:
    from pipeline.files import file_sha256
    from pipeline.network.model_files import WEIGHTS_FILE

    sha256 = file_sha256(parent / WEIGHTS_FILE).hex()
    train_run_id = json.loads((loop.project / "reports/train_run.json").read_text())["mlflow_run_id"]
    tags = _client(loop.project).get_run(train_run_id).data.tags
    assert (tags["parent_model"], tags["parent_model_version"], tags["parent_model_weights_sha256"]) == (
        PINNED_URI,
        "1",
        sha256,
    )
    metrics = json.loads((loop.project / "reports/train_metrics.json").read_text())
    assert metrics["init_from"] == {
        "uri": PINNED_URI,
        "name": MODEL_NAME,
        "version": "1",
        "weights_sha256": sha256,
    }
    first_run_id = _client(loop.project).get_model_version(MODEL_NAME, "1").run_id
    assert train_run_id != first_run_id, "a continued run is a run of its own"


def test_version_2_is_registered_with_its_parent(loop: Loop) -> None:
    client = _client(loop.project)
    version = client.get_model_version(MODEL_NAME, "2")
    assert version.tags["parent_model_name"] == MODEL_NAME and version.tags["parent_model_version"] == "1"
    lock = yaml.safe_load((loop.project / "dvc.lock").read_text())
    processed_md5 = next(
        out["md5"] for out in lock["stages"]["preprocess"]["outs"] if out["path"] == "data/processed"
    )
    assert f"Continued from {MODEL_NAME} v1 on corpus {processed_md5}." in version.description
    init_from = json.loads((loop.project / "reports/train_metrics.json").read_text())["init_from"]
    assert version.tags["parent_model_weights_sha256"] == init_from["weights_sha256"]
    assert "parent_model_name" not in client.get_model_version(MODEL_NAME, "1").tags


def test_the_continued_run_starts_from_the_parents_weights(loop: Loop) -> None:
    """The first epoch's mean train loss: from scratch it starts near ln(vocabulary size); from the parent
    it starts where the parent ended, below even the parent's last epoch (whose mean includes the loss
    before that epoch's updates)."""
    scratch = [float(row["train_loss"]) for row in loop.first_history]
    continued = [float(row["train_loss"]) for row in _history(loop.project)]
    assert len(scratch) == len(continued) == LOOP_PARAMS["train"]["epochs"]
    assert continued[0] < scratch[0] - 0.5, (scratch, continued)
    assert continued[0] < scratch[-1] < scratch[0], (scratch, continued)


def test_the_champion_is_the_version_registry_json_names_and_the_gate_rescored_it(loop: Loop) -> None:
    report = json.loads((loop.project / "reports/registry.json").read_text())
    champion = int(_client(loop.project).get_model_version_by_alias(MODEL_NAME, "champion").version)
    assert report["version"] == 2 and report["new_version"] is True
    assert report["compared_with_version"] == 1 and report["champion_rescored"] is True, report
    assert report["champion_version"] == champion
    assert ("champion" in report["aliases"]) == (champion == 2) == (report["decision"] == "promoted")
    assert "the test split changed since champion version 1 was scored" in loop.continued_log


def test_a_second_repro_runs_nothing(loop: Loop) -> None:
    result = run(["dvc", "repro"], loop.project)
    assert "Running stage" not in result.stdout, result.stdout
