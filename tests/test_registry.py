"""The register stage against a real SQLite-backed MLflow registry: versions, aliases, the gate, serving, and
a register killed between its new version and its aliases (the rerun adds no version and sets them).

Models are real: tiny GRUs trained in-process for a few steps on a real prepared and preprocessed builtin
corpus, saved with `save_model_dir`, scored by the real evaluate stage. Which snapshot is "worse", "good"
or "better" is decided by measuring their test BLEU, not assumed from the number of training steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT, deep_merge, prepare_project, working_directory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_NAME = "test-translator"
PARAMS: dict[str, Any] = {
    "data": {"builtin": {"n_pairs": 600}, "test_fraction": 0.1},
    "preprocess": {"tokenizer": "word", "vocab_size": 400},
    "evaluate": {"beam_size": 2, "n_samples": 3},
    "register": {"model_name": MODEL_NAME},
}
SNAPSHOT_STEPS = (0, 30, 90)  # training steps behind the three models
SERVER_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class Workspace:
    params: Path
    processed: Path  # data/processed whose test split the models are ranked on
    other_processed: Path  # the same corpus split with another seed: other test sentences
    models: dict[
        str, Path
    ]  # "worse", "good", "better": GRUs ranked by test BLEU on `processed`; "transformer"


def _train_snapshots(processed_dir: Path, target: Path) -> list[Path]:
    """One tiny GRU trained with plain PyTorch, saved after each of SNAPSHOT_STEPS steps."""
    from pipeline.config import ModelConfig

    config = ModelConfig(arch="gru", emb_dim=16, hidden_dim=32, dropout=0.0)
    return _train_and_save(processed_dir, target, config, SNAPSHOT_STEPS, lr=0.02)


def _train_transformer(processed_dir: Path, target: Path) -> Path:
    """A tiny Transformer: the registry must gate, log and serve it like the GRUs."""
    from pipeline.config import ModelConfig

    config = ModelConfig(arch="transformer", emb_dim=32, n_heads=4, ff_dim=64, n_layers=1, dropout=0.0)
    return _train_and_save(processed_dir, target, config, (60,), lr=0.005)[0]


def _train_and_save(
    processed_dir: Path, target: Path, config: Any, snapshot_steps: tuple[int, ...], lr: float
) -> list[Path]:
    import torch

    from pipeline.data.processed import load_processed
    from pipeline.network.batching import collate, token_budget_batches
    from pipeline.network.model import build_model
    from pipeline.network.model_files import save_model_dir

    data = load_processed(processed_dir, splits=("train",))
    train = data.encoded("train")
    torch.manual_seed(0)
    model = build_model(config, data.src_vocab_size, data.tgt_vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = token_budget_batches(train, 2000, seed=0)
    decoding = {"beam_size": 2, "length_penalty": 1.0, "max_len_ratio": 2.0}
    snapshots, done = [], 0
    for steps in snapshot_steps:
        model.train()
        for step in range(done, steps):
            batch = collate(train, batches[step % len(batches)])
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=0
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        done = steps
        path = target / f"{config.arch}-step{steps}"
        save_model_dir(path, model, config, data.src_tokenizer, data.tgt_tokenizer, decoding)
        snapshots.append(path)
    return snapshots


def _bleu(model_dir: Path, processed_dir: Path) -> float:
    """Test BLEU as the evaluate stage and the registry's re-scoring compute it (with PARAMS' settings)."""
    import sacrebleu

    from pipeline.data.processed import load_processed
    from pipeline.network.translator import Translator

    sources, references = load_processed(processed_dir, splits=("test",)).texts("test")
    hypotheses = Translator.from_dir(model_dir).translate(sources, beam_size=2, batch_size=128)
    return round(sacrebleu.corpus_bleu(hypotheses, [references], force=True).score, 2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    base = tmp_path_factory.mktemp("registry-data")
    (base / "a").mkdir()
    (base / "b").mkdir()
    prepare_project(base / "a", PARAMS)
    prepare_project(base / "b", deep_merge(PARAMS, {"data": {"seed": 43}}))
    processed = base / "a" / "data" / "processed"
    snapshots = _train_snapshots(processed, base / "snapshots")
    bleu = {path: _bleu(path, processed) for path in snapshots}
    assert len(set(bleu.values())) == len(bleu), f"snapshots need distinct test BLEU to be ranked: {bleu}"
    ranked = sorted(snapshots, key=bleu.__getitem__)
    return Workspace(
        params=base / "a" / "params.yaml",
        processed=processed,
        other_processed=base / "b" / "data" / "processed",
        models={
            **dict(zip(("worse", "good", "better"), ranked, strict=True)),
            "transformer": _train_transformer(processed, base / "snapshots"),
        },
    )


class Project:
    """A project directory with its own SQLite registry; models go through the real evaluate + register."""

    def __init__(self, root: Path, workspace: Workspace) -> None:
        self.root = root
        self.workspace = workspace

    def config(self, **register: Any):
        from pipeline.params_file import load_config, with_overrides

        overrides = {f"register.{key}": value for key, value in register.items()}
        return with_overrides(load_config(self.root / "params.yaml"), overrides)

    def use_test_data(self, processed: Path) -> None:
        shutil.rmtree(self.root / "data" / "processed")
        shutil.copytree(processed, self.root / "data" / "processed")

    def register(self, model: str, **register: Any) -> dict[str, Any]:
        from pipeline.stages import evaluate
        from pipeline.stages import register as register_stage

        shutil.rmtree(self.root / "models", ignore_errors=True)
        shutil.copytree(self.workspace.models[model], self.root / "models")
        config = self.config(**register)
        evaluate.run(config)
        register_stage.run(config)
        return json.loads((self.root / "reports" / "registry.json").read_text())

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])

    def aliases(self) -> dict[str, int]:
        aliases = self.client.get_registered_model(MODEL_NAME).aliases
        return {alias: int(version) for alias, version in aliases.items()}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workspace: Workspace) -> Project:
    shutil.copy(workspace.params, tmp_path / "params.yaml")
    shutil.copytree(workspace.processed, tmp_path / "data" / "processed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Project(tmp_path, workspace)


def _sentences(processed: Path, n: int = 6) -> list[str]:
    from pipeline.data.processed import load_processed

    sources, _ = load_processed(processed, splits=("test",)).texts("test")
    return sources[:n] + ["", "zzz unknown words qqq ."]


def test_first_version_becomes_champion_and_registering_it_again_adds_no_version(project: Project) -> None:
    from mlflow.artifacts import download_artifacts

    from pipeline.tracking import lineage, runs

    run_id = runs.get_or_create_run("seq2seq-pipeline", "train-test", "train-test", tags={}, params={})
    (project.root / "reports").mkdir(exist_ok=True)
    (project.root / "reports" / "train_run.json").write_text(
        json.dumps({"mlflow_run_id": run_id, "ray_run_name": "train-test", "best_epoch": 2})
    )

    first = project.register("good")
    again = project.register("good")

    assert (first["version"], first["decision"], first["new_version"]) == (1, "promoted", True)
    assert first["aliases"] == ["challenger", "champion"] and "first version" in first["reason"]
    assert first["model_uri"] == f"models:/{MODEL_NAME}/1" and first["champion_bleu"] is None
    assert (again["version"], again["decision"], again["new_version"]) == (1, "unchanged", False)
    assert "already holds these model files" in again["reason"]
    assert len(project.client.search_model_versions(f"name='{MODEL_NAME}'")) == 1

    version = project.client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == run_id  # logged into the train run named by reports/train_run.json
    tags = version.tags
    assert tags["model.arch"] == "gru" and tags["model.hidden_dim"] == "32"
    # Only the settings a GRU reads: none of the Transformer's.
    assert {key for key in tags if key.startswith("model.") and "vocab" not in key} == {
        "model.arch",
        "model.emb_dim",
        "model.hidden_dim",
        "model.n_layers",
        "model.dropout",
    }
    # MLflow's open-source registry leaves a version's user_id empty ("Created by"): the user is a tag.
    assert tags[lineage.TAG_USER] == lineage.user()
    assert (tags["data.source"], tags["data.src_lang"], tags["data.tgt_lang"]) == ("builtin", "en", "art")
    assert float(tags["test_bleu"]) == first["challenger_bleu"] and "test_chrf" in tags
    assert tags["model_content_sha256"] == first["content_hash"]
    assert tags["gate_decision"] == "promoted" and tags["train.ray_run_name"] == "train-test"
    assert {lineage.TAG_GIT_COMMIT, lineage.TAG_GIT_DIRTY, lineage.TAG_DATA_HASH} <= set(tags)
    # sacreBLEU's signatures: in reports/metrics.json, on the train run evaluate logged to, on the version.
    metrics = json.loads((project.root / "reports" / "metrics.json").read_text())
    assert metrics["bleu_signature"].startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert metrics["chrf_signature"].startswith("chrF2|") and "case:lc" in metrics["bleu_lc_signature"]
    run_tags = project.client.get_run(run_id).data.tags
    assert run_tags["test_bleu_signature"] == tags["test_bleu_signature"] == metrics["bleu_signature"]
    assert "test_bleu_signature" not in project.client.get_run(run_id).data.metrics
    assert "GRU encoder-decoder" in version.description
    assert f"BLEU {first['challenger_bleu']}" in version.description

    # Models from code: MLmodel names the code file, no pickled PythonModel; `pipeline` travels in code/.
    local = Path(download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(project.root / "download")))
    flavor = (local / "MLmodel").read_text()
    assert "model_code_path" in flavor and "python_model.pkl" not in flavor
    assert (
        not list(local.rglob("*.pkl"))
        and (local / "code" / "pipeline" / "network" / "translator.py").is_file()
    )
    assert any(line.startswith("torch==") for line in (local / "requirements.txt").read_text().splitlines())


def test_a_searched_length_penalty_is_chosen_on_validation_recorded_and_registered(project: Project) -> None:
    """evaluate.length_penalty_search: the penalty with the best validation BLEU is used for test, written
    to metrics.json beside each candidate's validation BLEU, and the registered model decodes with it."""
    from pipeline.params_file import set_params
    from pipeline.tracking import lineage

    penalties = [0.0, 0.6, 2.0]
    set_params(
        project.root / "params.yaml",
        ["evaluate.length_penalty_search=[0.0, 0.6, 2.0]", "evaluate.search_sentences=20"],
    )
    report = project.register("good")
    metrics = json.loads((project.root / "reports" / "metrics.json").read_text())
    by_penalty = {alpha: metrics[f"validation_bleu_length_penalty_{alpha:g}"] for alpha in penalties}
    assert metrics["length_penalty"] in penalties
    assert by_penalty[metrics["length_penalty"]] == max(by_penalty.values())
    version = project.client.get_model_version(MODEL_NAME, str(report["version"]))
    assert float(version.tags["decoding.length_penalty"]) == metrics["length_penalty"]
    assert lineage.metric_tag("length_penalty") == "length_penalty"


def test_worse_model_leaves_champion_and_better_model_takes_it(project: Project) -> None:
    good = project.register("good")
    worse = project.register("worse")

    assert (worse["version"], worse["decision"], worse["champion_version"]) == (2, "rejected", 1)
    assert worse["aliases"] == ["challenger"] and worse["compared_with_version"] == 1
    assert worse["champion_bleu"] == good["challenger_bleu"] > worse["challenger_bleu"]
    assert not worse["champion_rescored"] and "does not beat" in worse["reason"]
    assert project.aliases() == {"champion": 1, "challenger": 2}
    assert project.client.get_model_version(MODEL_NAME, "2").tags["gate_decision"] == "rejected"

    better = project.register("better")

    assert (better["version"], better["decision"], better["champion_version"]) == (3, "promoted", 3)
    assert better["champion_bleu"] == good["challenger_bleu"] < better["challenger_bleu"]
    assert project.aliases() == {"champion": 3, "challenger": 3}


def test_gain_below_min_improvement_keeps_the_champion(project: Project) -> None:
    worse = project.register("worse")
    good = project.register("good", min_improvement=1000.0)

    gain = good["challenger_bleu"] - worse["challenger_bleu"]
    assert gain > 0 and good["decision"] == "rejected" and "required 1000" in good["reason"]
    assert project.aliases() == {"champion": 1, "challenger": 2}


def test_gate_compares_a_transformer_with_a_gru_champion(project: Project) -> None:
    gru, transformer = (
        _bleu(project.workspace.models[name], project.workspace.processed) for name in ("good", "transformer")
    )
    assert gru != transformer, "the two models need distinct test BLEU for the gate to decide"
    project.register("good")
    challenger = project.register("transformer")

    assert challenger["version"] == 2 and challenger["challenger_bleu"] == transformer
    assert challenger["decision"] == ("promoted" if transformer > gru else "rejected")
    assert project.aliases()["champion"] == (2 if transformer > gru else 1)
    version = project.client.get_model_version(MODEL_NAME, "2")
    assert version.tags["model.arch"] == "transformer" and version.tags["model.n_heads"] == "4"
    assert "model.hidden_dim" not in version.tags  # the Transformer's width is emb_dim
    assert "Transformer" in version.description and "GRU" not in version.description


def test_champion_is_rescored_when_the_test_data_differ(project: Project) -> None:
    champion = project.register("better")
    project.use_test_data(project.workspace.other_processed)

    challenger = project.register("good")

    expected = _bleu(project.workspace.models["better"], project.workspace.other_processed)
    assert challenger["test_data_hash"] != champion["test_data_hash"]
    assert challenger["champion_rescored"] and challenger["champion_bleu"] == expected
    promoted = challenger["challenger_bleu"] > expected
    assert challenger["decision"] == ("promoted" if promoted else "rejected")
    assert project.aliases()["champion"] == (2 if promoted else 1)
    cached = project.client.get_model_version(MODEL_NAME, "1").tags
    assert float(cached["bleu_on_test_" + challenger["test_data_hash"][:16]]) == expected


def test_registry_translator_and_translate_command_match_the_local_translator(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main
    from pipeline.errors import PipelineError
    from pipeline.network.translator import Translator
    from pipeline.tracking.registry import local_model_dir

    project.register("good")
    sentences = _sentences(project.workspace.processed)
    local = Translator.from_dir(project.workspace.models["good"]).translate(sentences)

    for uri in (f"models:/{MODEL_NAME}@champion", f"models:/{MODEL_NAME}/1"):
        with local_model_dir(uri) as folder:
            assert Translator.from_dir(folder).translate(sentences) == local
        assert not folder.exists(), "the downloaded copy goes with the block"

    capsys.readouterr()
    assert main(["translate", "--model", f"models:/{MODEL_NAME}@champion", *sentences[:3]]) == 0
    assert capsys.readouterr().out.splitlines() == local[:3]
    for uri, message in ((f"models:/{MODEL_NAME}@no-such-alias", "cannot fetch"), ("models:/", "expected")):
        with pytest.raises(PipelineError, match=message), local_model_dir(uri):
            pass


# Run with `python -S`: site-packages joins sys.path without its .pth files, so an editable install of this
# project is invisible and `pipeline` can only come from the model's own code/ folder.
LOAD_WITHOUT_PROJECT = """
import importlib.util, json, sys
sys.path.extend(json.loads(sys.argv[1]))
if importlib.util.find_spec("pipeline") is not None:
    print(json.dumps({"skip": "pipeline is installed into site-packages itself"}))
    sys.exit(0)
import mlflow
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
sentences = json.loads(sys.argv[3])
print(json.dumps({
    "list": model.predict(sentences),
    "dataframe": model.predict(pd.DataFrame({"text": sentences})),
    "pipeline": sys.modules["pipeline"].__file__,
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["good", "transformer"])
def test_logged_model_loads_and_predicts_without_the_project_installed(project: Project, model: str) -> None:
    import site

    from pipeline.network.translator import Translator

    project.register(model)
    sentences = _sentences(project.workspace.processed)
    local = Translator.from_dir(project.workspace.models[model]).translate(sentences)

    command = [sys.executable, "-S", "-c", LOAD_WITHOUT_PROJECT, json.dumps(site.getsitepackages())]
    command += [f"models:/{MODEL_NAME}@champion", json.dumps(sentences)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=project.root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["list"] == local and result["dataframe"] == local
    assert "/code/pipeline/" in result["pipeline"]  # the logged copy, not the project


KILL_BEFORE_ALIASES = textwrap.dedent(
    """
    import os, signal
    from pipeline.params_file import load_config
    from pipeline.stages import register

    def die(*args, **kwargs):  # the version is registered and tagged; its aliases are not set yet
        os.kill(os.getpid(), signal.SIGKILL)

    register._apply = die
    register.run(load_config("params.yaml"))
    """
)


def test_register_killed_before_its_aliases_registers_once_on_rerun(project: Project) -> None:
    from pipeline.stages import evaluate
    from pipeline.stages import register as register_stage

    shutil.copytree(project.workspace.models["good"], project.root / "models")
    evaluate.run(project.config())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_ALIASES],
        cwd=project.root,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(project.client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert project.aliases() == {}, "killed before the aliases"

    register_stage.run(project.config())

    report = json.loads((project.root / "reports" / "registry.json").read_text())
    assert (report["version"], report["decision"], report["new_version"]) == (1, "promoted", False)
    assert len(project.client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert project.aliases() == {"challenger": 1, "champion": 1}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port: int, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _post_refused(port: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A request the server must refuse: its HTTP status and JSON body."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(port, payload)
    return refused.value.code, json.loads(refused.value.read())


def _wait_until_serving(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"no answer on /ping after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer"])  # the GRU champion serves on the cluster in a box
def test_served_champion_answers_invocations_like_the_local_model(project: Project, model: str) -> None:
    from pipeline.network.translator import DEFAULT_MAX_INPUT_TOKENS, InputBounds, Translator

    project.register(model)
    sentences = _sentences(project.workspace.processed)
    # The server's bounds: its environment's, as `translate` reads them; no more sentences than these.
    bounds = InputBounds(max_sentences=len(sentences))
    translator = Translator.from_dir(project.workspace.models[model], bounds=bounds)
    local, greedy = translator.translate(sentences), translator.translate(sentences, beam_size=1)
    words = sentences[0].split()
    long_sentence = " ".join(words * (DEFAULT_MAX_INPUT_TOKENS // len(words) + 1))
    (cut,) = translator.translate([long_sentence])

    bin_dir = Path(sys.executable).parent  # `mlflow models serve --env-manager local` runs uvicorn from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["PIPELINE_MAX_SENTENCES"] = str(bounds.max_sentences)
    port, log = _free_port(), project.root / "serve.log"
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as output, working_directory(project.root):
        # A session of its own: the server's whole process group can be ended at once.
        server = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_serving(server, port, log)
        assert _post(port, {"inputs": sentences}) == {"predictions": local}
        split = {"columns": ["text"], "data": [[sentence] for sentence in sentences]}
        assert _post(port, {"dataframe_split": split}) == {"predictions": local}
        assert _post(port, {"inputs": sentences, "params": {"beam_size": 1}}) == {"predictions": greedy}
        # Too long a sentence is cut (and the server log says so), too many sentences refused with a 400.
        assert _post(port, {"inputs": [long_sentence]}) == {"predictions": [cut]}
        assert f"sentence 1: over {DEFAULT_MAX_INPUT_TOKENS} tokens, only the first" in log.read_text()
        status, body = _post_refused(port, {"inputs": [*sentences, "one too many"]})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert (
            f"over {len(sentences)} sentences in one request: give at most {len(sentences)}"
            in body["message"]
        )
    finally:
        # The server is its own process group (uvicorn workers included): end the group, not just the CLI.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
