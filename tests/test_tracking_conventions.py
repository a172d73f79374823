"""MLflow's own conventions on a real SQLite store: the experiment's kind (so MLflow 3's UI shows runs, not
GenAI traces) and description, each run's description (its Description panel), and the git tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params_file import config_from_dict
from pipeline.tracking import lineage, runs


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_a_new_experiment_is_a_model_training_one_with_a_description(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment(runs.ensure_experiment("translation"))
    assert experiment.tags[runs.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "Ray Tune" in experiment.tags[lineage.TAG_DESCRIPTION]


def test_an_existing_experiment_gets_the_kind_only_when_it_has_none(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    plain = client.create_experiment("made-by-hand")
    chosen = client.create_experiment("kind-chosen", tags={runs.EXPERIMENT_KIND_TAG: "forecasting"})
    assert runs.ensure_experiment("made-by-hand") == plain
    assert runs.ensure_experiment("kind-chosen") == chosen
    assert client.get_experiment(plain).tags[runs.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[runs.EXPERIMENT_KIND_TAG] == "forecasting"


def test_runs_describe_their_stage_model_and_data(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    config = config_from_dict(
        {
            "data": {"source": "hf:bentrevett/multi30k", "src_lang": "de", "tgt_lang": "en"},
            "model": {"arch": "transformer", "emb_dim": 256, "n_heads": 4, "ff_dim": 1024, "n_layers": 3},
            "train": {"epochs": 40},
        }
    )
    train_tags, tune_tags = lineage.lineage_tags("train", config), lineage.lineage_tags("tune", config)
    train = runs.get_or_create_run("e", "k1", "train-1", tags=train_tags, params={})
    tune = runs.get_or_create_run("e", "k2", "tune-1", tags=tune_tags, params={})
    client = MlflowClient(tracking_uri)
    described = client.get_run(train).data.tags[lineage.TAG_DESCRIPTION]
    assert "Transformer" in described and "width 256, 4 heads, feed-forward 1024" in described
    assert "`hf:bentrevett/multi30k`, de -> en" in described and "up to 40 epochs" in described
    searched = client.get_run(tune).data.tags[lineage.TAG_DESCRIPTION]
    assert all(f"`{key}`" in searched for key in config.tune.search_space)
    assert "child run per trial" in searched


def _git(*args: str, cwd: Path) -> str:
    import subprocess

    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_the_commit_tag_is_a_plain_hash_and_uncommitted_changes_have_a_tag_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(lineage.GIT_COMMIT_ENV, raising=False)
    assert lineage.git_tags() == {lineage.TAG_GIT_COMMIT: "unknown", lineage.TAG_GIT_DIRTY: "unknown"}
    _git("init", "-q", cwd=tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    _git("add", "params.yaml", cwd=tmp_path)
    _git("commit", "-q", "-m", "start", cwd=tmp_path)
    head = _git("rev-parse", "HEAD", cwd=tmp_path).strip()

    (tmp_path / "notes.txt").write_text("untracked files are not the code that ran\n")
    assert lineage.git_tags() == {lineage.TAG_GIT_COMMIT: head, lineage.TAG_GIT_DIRTY: "false"}
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    assert lineage.git_tags() == {lineage.TAG_GIT_COMMIT: head, lineage.TAG_GIT_DIRTY: "true"}

    # A Ray job's copy has no .git: the tags come from what `submit` read on the submitting machine.
    monkeypatch.setenv(lineage.GIT_COMMIT_ENV, "c0ffee")
    monkeypatch.setenv(lineage.GIT_DIRTY_ENV, "false")
    config = config_from_dict({})
    tags = lineage.lineage_tags("train", config)
    assert (tags[lineage.TAG_GIT_COMMIT], tags[lineage.TAG_GIT_DIRTY]) == ("c0ffee", "false")
