"""The whole pipeline as users run it: `dvc repro` in a fresh git repo, on a small corpus of the built-in
generator's pairs, DVC-tracked under corpus/.

One test run of every stage through DVC (real Ray Train with 2 gloo workers, real SQLite MLflow store):
a small model must translate the corpus well, the model must land in the registry as champion, and a
second `dvc repro` must do nothing. Then the same project goes to a real local Ray head as a job with
`submit`'s default entrypoint (cluster/run_pipeline.sh): with the outputs in a DVC remote, the cluster
restores them instead of training again, even with its own `runtime.storage_path`.

Last, on the same project, the continued-training loop: pairs are added to the corpus, the champion is
pinned with `set-params train.init_from=models:/seq2seq-translator@champion`, and a second `dvc repro`
preprocesses with the parent's tokenizers, trains from its weights (the weights through the object store),
evaluates and registers version 2 with its parent named.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import sacrebleu
import yaml

from tests.dvc_project import commit_all, make_dvc_project, run
from tests.helpers import write_pair_files
from tests.ray_head import RayHead, output, submit

pytestmark = pytest.mark.slow

CORPUS = "corpus/pairs"
FIRST_PAIRS, ADDED_PAIRS = 4000, 500
SMALL_BUT_LEARNABLE = {
    "data": {"source": CORPUS, "src_lang": "en", "tgt_lang": "art"},
    "preprocess": {"vocab_size": 500},
    "model": {"emb_dim": 64, "hidden_dim": 128},
    "train": {
        "epochs": 4,  # test BLEU about 29 (copying the source scores under 5)
        "batch_size": 2400,
        "lr": 0.02,
        "label_smoothing": 0.0,
        "val_bleu_sentences": 20,  # rank 0 decodes them every epoch while rank 1 waits
    },
    "tune": {"num_samples": 0},
    "evaluate": {"beam_size": 2},
}
CONTINUED_EPOCHS = 1  # enough to show where the weights started, and to register a second version


def _corpus_pairs() -> list[tuple[str, str]]:
    """The built-in generator's pairs: the first FIRST_PAIRS are the corpus, the rest are added later."""
    from pipeline.data.builtin_corpus import generate_corpus

    return generate_corpus(FIRST_PAIRS + ADDED_PAIRS, seed=13)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    directory = make_dvc_project(tmp_path_factory.mktemp("e2e"), SMALL_BUT_LEARNABLE)
    write_pair_files(directory / CORPUS, _corpus_pairs()[:FIRST_PAIRS])
    run(["dvc", "add", CORPUS], directory)
    commit_all(directory, "corpus")
    result = run(["dvc", "repro"], directory, timeout=1200)
    (directory / "repro.log").write_text(result.stdout + result.stderr)
    return directory


def test_train_prints_one_line_per_epoch_from_rank_0(project: Path) -> None:
    """Ray Train V2 prints no reported metrics: without these lines a long train stage is silent."""
    log = (project / "repro.log").read_text()
    epochs = SMALL_BUT_LEARNABLE["train"]["epochs"]
    lines = [line for line in log.splitlines() if f"/{epochs}: train loss " in line]
    epochs_run = json.loads((project / "reports/train_metrics.json").read_text())["epochs_run"]
    assert len(lines) == epochs_run and f"epoch 1/{epochs}: " in lines[0], log[-3000:]
    assert all("target tokens/s" in line and " elapsed, ETA " in line for line in lines)
    # Nor is it noisy: on a loaded machine Ray's first resource request timed out with a traceback.
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
    # Nor does Ray Train echo every rank's report of every epoch (its whole metrics dict) beside the line.
    assert "Reporting training result" not in log


def test_small_model_translates_the_corpus_well(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())
    samples = [json.loads(line) for line in (project / "reports/samples.jsonl").read_text().splitlines()]
    copy_bleu = sacrebleu.corpus_bleu(
        [s["source"] for s in samples], [[s["reference"] for s in samples]]
    ).score
    assert metrics["n_test"] == 200
    assert metrics["bleu"] >= 25, metrics
    assert copy_bleu < 5
    assert metrics["chrf"] > 45
    assert metrics["bleu_signature"] == (
        f"BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    )


def test_model_is_registered_as_champion_with_lineage(project: Path) -> None:
    import getpass

    from mlflow.tracking import MlflowClient

    report = json.loads((project / "reports/registry.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("seq2seq-translator", "champion")
    assert str(report["version"]) == str(champion.version)
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    # A plain hash (git's and MLflow's form); uncommitted changes are a tag of their own.
    assert champion.tags["mlflow.source.git.commit"] == commit
    assert (
        champion.tags["git_dirty"] in ("true", "false") and champion.tags["mlflow.user"] == getpass.getuser()
    )
    data_md5 = champion.tags["dvc_data_processed_md5"]
    assert data_md5 not in ("", "unknown")
    train_run = client.get_run(json.loads((project / "reports/train_run.json").read_text())["mlflow_run_id"])
    assert train_run.data.metrics["test_bleu"] == pytest.approx(
        json.loads((project / "reports/metrics.json").read_text())["bleu"]
    )


def test_the_train_run_fills_mlflows_source_datasets_and_system_metrics_panels(project: Path) -> None:
    import getpass

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    train_run = client.get_run(json.loads((project / "reports/train_run.json").read_text())["mlflow_run_id"])
    tags = train_run.data.tags
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and "git_commit" not in tags
    assert tags["git_dirty"] in ("true", "false")
    assert (tags["mlflow.user"], tags["mlflow.source.name"]) == (
        getpass.getuser(),
        "python -m pipeline train",
    )
    data_md5 = tags["dvc_data_processed_md5"]
    inputs = {item.dataset.name: item for item in train_run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    pairs = json.loads((project / "data/processed/meta.json").read_text())["pairs"]
    for split, item in inputs.items():
        assert item.dataset.digest == data_md5[:36] and item.dataset.source_type == "local"
        assert json.loads(item.dataset.source) == {"uri": CORPUS, "split": split}
        assert json.loads(item.dataset.profile) == {"num_rows": pairs[split]}
        assert [(tag.key, tag.value) for tag in item.tags] == [("mlflow.data.context", split)]
    system = [key for key in train_run.data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    experiment = client.get_experiment(train_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI's runs view"
    assert "GRU" in tags["mlflow.note.content"] and f"`{CORPUS}`" in tags["mlflow.note.content"]


def test_translate_command_uses_the_champion(project: Path) -> None:
    sample = json.loads((project / "reports/samples.jsonl").read_text().splitlines()[0])
    result = run(
        [
            "python",
            "-m",
            "pipeline",
            "translate",
            "--model",
            "models:/seq2seq-translator@champion",
            sample["source"],
        ],
        project,
    )
    # The registered model decodes as evaluate scored it (params.yaml's evaluate section); models/ keeps
    # the defaults, so that a changed beam never re-runs training.
    beam = str(SMALL_BUT_LEARNABLE["evaluate"]["beam_size"])
    local = run(
        ["python", "-m", "pipeline", "translate", "--model", "models", "--beam-size", beam, sample["source"]],
        project,
    )
    assert result.stdout.strip() == local.stdout.strip() == sample["hypothesis"] != ""


def test_second_repro_runs_no_stage(project: Path) -> None:
    result = run(["dvc", "repro"], project)
    assert "Running stage" not in result.stdout, result.stdout


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid"]
STAGES = ("prepare", "preprocess", "tune", "train", "evaluate", "register")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _set_param(project: Path, assignment: str) -> None:
    run(["python", "-m", "pipeline", "set-params", assignment], project)


def test_a_parameter_set_that_already_ran_comes_back_from_the_run_cache(project: Path) -> None:
    """data.seed A -> B -> A: the third `dvc repro` restores prepare from DVC's run-cache, byte for byte,
    instead of running it again, and with its output as it was nothing after it runs. (The run-cache is
    the same mechanism for every stage; prepare proves it in seconds where train would take minutes.)"""
    prepared_a = _snapshot(project / "data/prepared")
    seed_a = yaml.safe_load((project / "params.yaml").read_text())["data"]["seed"]
    _set_param(project, f"data.seed={seed_a + 1}")
    try:
        prepared_b = run(["dvc", "repro", "prepare"], project)
        assert "Running stage 'prepare'" in prepared_b.stdout, prepared_b.stdout
        assert _snapshot(project / "data/prepared") != prepared_a, "another seed carves other splits"
    finally:
        _set_param(project, f"data.seed={seed_a}")

    restored = run(["dvc", "repro"], project)

    assert "Stage 'prepare' is cached - skipping run" in restored.stdout, restored.stdout
    assert "Running stage" not in restored.stdout, restored.stdout
    assert _snapshot(project / "data/prepared") == prepared_a
    assert json.loads(run(["dvc", "status", "--json"], project).stdout or "{}") == {}


def test_a_pushed_run_cache_restores_every_stage_in_a_fresh_clone(project: Path, tmp_path: Path) -> None:
    """The cluster round trip without a cluster: a run pushed with its run-cache (what
    cluster/run_pipeline.sh does) is restored at the same commit elsewhere with no stage run."""
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "pushed", str(remote)], project)
    run(["dvc", "push", "--run-cache", "--remote", "pushed"], project)
    assert len(list((remote / "runs").glob("*/*/*"))) >= len(STAGES), "one run-cache entry per stage"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "dvc.lock").exists(), "as on a laptop: the job's dvc.lock never reached git"
    run(["dvc", "remote", "add", "--default", "pushed", str(remote)], clone)
    restored = run(["dvc", "repro", "--pull"], clone)

    assert "Running stage" not in restored.stdout, restored.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' is cached - skipping run" in restored.stdout, (stage, restored.stdout)
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout or "{}") == {}
    assert _snapshot(clone / "models") == _snapshot(project / "models")
    assert (clone / "reports/metrics.json").read_bytes() == (project / "reports/metrics.json").read_bytes()


def test_an_experiment_in_a_temporary_workspace_logs_into_the_projects_store(project: Path) -> None:
    """`dvc exp run --temp` runs a copy under .dvc/tmp/exps that DVC deletes afterwards: the evaluate
    stage's scores must still reach the project's mlflow.db."""
    from mlflow.tracking import MlflowClient

    run([*GIT, "add", "-A"], project)
    run([*GIT, "commit", "-qm", "pipeline run"], project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    train_run_id = json.loads((project / "reports/train_run.json").read_text())["mlflow_run_id"]
    logged_before = len(client.get_metric_history(train_run_id, "test_bleu"))

    result = run(["dvc", "exp", "run", "--temp", "evaluate", "-S", "evaluate.n_samples=3"], project)

    assert "Running stage 'evaluate'" in result.stdout, result.stdout
    assert len(client.get_metric_history(train_run_id, "test_bleu")) == logged_before + 1
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], project).stdout))
    assert '"n_samples": 3' in shown, "the experiment and its -S value are listed"
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside DVC's workspaces"


def test_cluster_job_restores_the_cached_pipeline_instead_of_training_again(
    project: Path, ray_head: RayHead, tmp_path: Path
) -> None:
    """The KubeRay RayJob's situation: the cluster overrides run-time settings (storage, failures) and
    must still find every stage up to date, pulling outputs from the DVC remote."""
    from mlflow.tracking import MlflowClient

    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "--default", "local", str(remote)], project)
    run(["dvc", "push"], project)
    assert not (remote / "runs").exists(), "a plain push carries no run-cache"
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    versions_before = len(MlflowClient(tracking_uri).search_model_versions("name='seq2seq-translator'"))

    result = submit(
        project,
        *("--address", ray_head.address),
        RAY_AUTH_TOKEN=ray_head.token,
        MLFLOW_TRACKING_URI=tracking_uri,
        # evaluate.n_samples: one cheap stage runs on the cluster, and its run-cache entry must come home.
        PIPELINE_SET=(
            f"runtime.storage_path={tmp_path / 'cluster-ray'} runtime.max_failures=5 evaluate.n_samples=3"
        ),
    )

    assert result.returncode == 0, output(result)
    assert "finished: SUCCEEDED" in result.stdout, output(result)
    ran = sorted(set(re.findall(r"Running stage '(\w+)'", result.stdout)))
    assert ran == ["evaluate"], "the cluster must reuse the cached outputs:\n" + output(result)
    for stage in ("prepare", "preprocess", "tune", "train", "register"):
        assert f"'{stage}'" in result.stdout, output(result)  # DVC said each was up to date
    assert not (tmp_path / "cluster-ray").exists(), "nothing trained on the cluster"
    assert list((remote / "runs").glob("*/*/*")), "the job pushed its run-cache: " + output(result)
    assert (
        len(MlflowClient(tracking_uri).search_model_versions("name='seq2seq-translator'")) == versions_before
    )


# --- The continued-training loop, on the project above ---

MODEL_NAME = "seq2seq-translator"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
PINNED_URI = f"models:/{MODEL_NAME}/1"
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


def _history(project: Path) -> list[dict[str, str]]:
    with (project / "reports/train_history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="module")
def loop(project: Path) -> Loop:
    """The end-to-end project, after the tests above, continued: its champion is the parent."""
    outputs: list[str] = []

    def step(*command: str) -> str:
        result = run(list(command), project, timeout=1200)
        outputs.append(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    # 1. The first champion: the run from scratch above.
    first_history = _history(project)
    first_registry = json.loads((project / "reports/registry.json").read_text())
    commit_all(project, "first model")

    # 2. The corpus grows.
    write_pair_files(project / CORPUS, _corpus_pairs())
    step("dvc", "add", CORPUS)
    commit_all(project, "more pairs")

    # 3. The champion, pinned as the parent.
    set_params_output = step("python", "-m", "pipeline", "set-params", f"train.init_from={CHAMPION_URI}")
    pinned_params = yaml.safe_load((project / "params.yaml").read_text())
    step("python", "-m", "pipeline", "set-params", f"train.epochs={CONTINUED_EPOCHS}")
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
    it starts near where the parent ended, below the run from scratch after half its epochs."""
    scratch = [float(row["train_loss"]) for row in loop.first_history]
    continued = [float(row["train_loss"]) for row in _history(loop.project)]
    assert len(scratch) == SMALL_BUT_LEARNABLE["train"]["epochs"] and len(continued) == CONTINUED_EPOCHS
    assert continued[0] < scratch[0] - 1.0, (scratch, continued)
    assert continued[0] < scratch[len(scratch) // 2 - 1] < scratch[0], (scratch, continued)


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
