"""Real `dvc repro` of the data stages in a temporary git repo: runs, no-op re-run, params re-run, exp run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS
from tests.dvc_project import make_dvc_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    directory = make_dvc_project(tmp_path_factory.mktemp("dvc-data"), TINY_PARAMS)
    run(["dvc", "repro", "preprocess"], directory)
    return directory


def test_repro_writes_prepared_and_processed_data_and_stats(project: Path) -> None:
    assert (project / "data/prepared/train.arrow").is_file()
    assert (project / "data/prepared/corpus.json").is_file()
    assert (project / "data/processed/meta.json").is_file()
    stats = json.loads((project / "reports/prepare_stats.json").read_text())
    assert stats["pairs"]["train"] > 0
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {"prepare", "preprocess"} <= set(lock["stages"])


def test_second_repro_does_nothing(project: Path) -> None:
    result = run(["dvc", "repro", "preprocess"], project)
    assert "Running stage" not in result.stdout
    assert "didn't change, skipping" in result.stdout


def test_changed_preprocess_param_reruns_only_preprocess(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["preprocess"]["vocab_size"] = 300
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro", "preprocess"], project)
    assert "Running stage 'preprocess'" in result.stdout
    assert "Running stage 'prepare'" not in result.stdout


def test_exp_run_with_set_param(project: Path) -> None:
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid", "commit", "-qam", "vocab"],
        project,
        check=False,
    )
    run(["dvc", "repro", "preprocess"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid", "commit", "-qm", "lock"], project)
    result = run(["dvc", "exp", "run", "preprocess", "-S", "data.max_examples=500"], project)
    assert "Running stage 'prepare'" in result.stdout
    shown = run(["dvc", "exp", "show", "--json"], project)
    assert "500" in shown.stdout


def _snapshot(project: Path) -> dict[str, bytes]:
    files = [*sorted((project / "data").rglob("*")), *sorted((project / "reports").glob("*"))]
    return {str(path.relative_to(project)): path.read_bytes() for path in files if path.is_file()}


@pytest.mark.parametrize(
    ("stage", "section", "key", "value", "message"),
    [
        ("preprocess", "preprocess", "vocab_size", 10, "preprocess.vocab_size"),
        ("prepare", "data", "source", "no/such/folder", "no/such/folder"),
    ],
)
def test_a_failed_stage_under_dvc_repro_keeps_every_previous_output(
    project: Path, stage: str, section: str, key: str, value: object, message: str
) -> None:
    """DVC deletes a stage's outputs before running it unless they persist: they do, and the stages replace
    them atomically themselves, so data and cache: false reports survive a failed `dvc repro`."""
    run(["dvc", "repro", "preprocess"], project)
    before = _snapshot(project)
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(["dvc", "repro", stage], project, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode != 0
    assert "error: " in result.stderr + result.stdout and message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert _snapshot(project) == before
