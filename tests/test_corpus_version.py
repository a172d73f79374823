"""Which version of a corpus a model came from: a Hub dataset's revision and fingerprints, recorded by prepare
(reports/prepare_metrics.json, data/prepared) and logged as MLflow's own HuggingFaceDatasetSource; the store
DVC's temporary workspaces log into. Hub code paths run on local data (no Hub here)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from pipeline.data.hf_source import _cached_revision, resolve_revision
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict
from pipeline.tracking import runs, store
from tests.helpers import prepare_project

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAIRS = [(f"ein satz nummer {i} .", f"sentence number {i} .") for i in range(60)]


def _save_hub_like(folder: Path) -> Path:
    table = {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(folder))
    return folder


def test_prepare_records_the_hub_version_and_preprocess_carries_it(tmp_path: Path) -> None:
    folder = _save_hub_like(tmp_path / "saved")
    prepare_project(tmp_path, {"data": {"source": f"hf:{folder}", "src_lang": "de", "tgt_lang": "en"}})

    fingerprint = datasets.load_from_disk(str(folder))["train"]._fingerprint
    expected = {
        "path": str(folder),
        "config_name": None,
        "revision": None,
        "fingerprint": {"train": fingerprint},
    }
    assert json.loads((tmp_path / "reports/prepare_metrics.json").read_text())["hub"] == expected
    assert json.loads((tmp_path / "data/prepared/corpus.json").read_text())["hub"] == expected
    assert json.loads((tmp_path / "data/processed/meta.json").read_text())["hub"] == expected


def test_a_builtin_corpus_records_no_hub_version(tmp_path: Path) -> None:
    prepare_project(tmp_path)
    assert "hub" not in json.loads((tmp_path / "reports/prepare_metrics.json").read_text())
    assert json.loads((tmp_path / "data/processed/meta.json").read_text())["hub"] is None


def test_a_pinned_commit_is_used_as_given_and_a_local_folder_has_none(tmp_path: Path) -> None:
    assert resolve_revision("bentrevett/multi30k", COMMIT) == COMMIT  # no Hub asked: works offline
    assert resolve_revision(str(_save_hub_like(tmp_path / "saved")), None) is None


def test_offline_the_revision_is_read_from_the_hub_cache_path(tmp_path: Path) -> None:
    """datasets caches a Hub dataset under .../<dataset>/<config>/<version>/<commit>/: the commit read."""
    folder = _save_hub_like(tmp_path / "org___name" / "default" / "0.0.0" / COMMIT)
    assert _cached_revision(datasets.load_from_disk(str(folder))) == COMMIT
    assert _cached_revision(datasets.load_from_disk(str(_save_hub_like(tmp_path / "plain")))) is None


def test_revision_is_refused_for_a_source_that_is_not_on_the_hub() -> None:
    with pytest.raises(PipelineError, match="data.revision"):
        config_from_dict({"data": {"source": "builtin", "revision": COMMIT}})
    assert config_from_dict({"data": {"source": "hf:x/y", "revision": "v1.0"}}).data.revision == "v1.0"


def test_the_training_runs_dataset_inputs_name_the_hub_version(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(runs.ensure_experiment("translation", uri)).info.run_id
    hub = {"path": "bentrevett/multi30k", "config_name": None, "revision": COMMIT, "fingerprint": {}}

    runs.log_split_inputs(
        runs.EpochMetricsLogger(uri, run_id), "hf:bentrevett/multi30k", {"train": ("d" * 32, 29000)}, hub
    )

    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.source_type == "hugging_face"
    source = HuggingFaceDatasetSource.from_json(logged.dataset.source)
    assert (source.path, source.config_name, source.revision, source.split) == (
        "bentrevett/multi30k",
        None,
        COMMIT,
        "train",
    )


@pytest.mark.parametrize(("source", "source_type"), [("builtin", "code"), ("corpus/de-en", "local")])
def test_the_built_in_corpus_is_logged_as_code_and_a_folder_as_a_local_source(
    tmp_path: Path, source: str, source_type: str
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(runs.ensure_experiment("translation", uri)).info.run_id

    runs.log_split_inputs(runs.EpochMetricsLogger(uri, run_id), source, {"test": ("d" * 32, 200)})

    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.source_type == source_type
    assert json.loads(logged.dataset.source) == {"uri": source, "split": "test"}


def test_dvcs_temporary_workspaces_log_into_the_projects_store(tmp_path: Path, monkeypatch) -> None:
    """`dvc exp run --temp` and `dvc queue` run in a copy and set DVC_ROOT to the project."""
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    assert store.tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"
