"""Real `dvc repro` of the data stages in a temporary git repo whose corpus is a folder under corpus/: an
untouched corpus re-runs nothing, a failed stage and `dvc checkout`, a one-line corpus edit re-runs prepare.
(The full `dvc repro`, its no-op re-run and `dvc exp run` are in test_pipeline_end_to_end.py; which
parameter re-runs which stage in test_dvc_deps.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import make_dvc_project, run
from tests.helpers import TINY_PARAMS, write_pair_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project whose corpus is a local folder inside corpus/, as the README's own-corpus workflow has it."""
    from pipeline.data.builtin_corpus import iter_corpus

    directory = make_dvc_project(
        tmp_path_factory.mktemp("dvc-corpus"),
        {**TINY_PARAMS, "data": {"source": "corpus/tiny", "src_lang": "en", "tgt_lang": "art"}},
    )
    write_pair_files(directory / "corpus" / "tiny", list(iter_corpus(600, 5, 1)))
    run(["dvc", "repro", "preprocess"], directory)
    return directory


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
def test_after_a_failed_stage_dvc_checkout_brings_every_previous_output_back(
    project: Path, stage: str, section: str, key: str, value: object, message: str
) -> None:
    """Outputs are ordinary DVC outputs (the run-cache needs that): DVC removes a stage's outputs before
    running it, and after a failure `dvc checkout` restores the recorded ones, reports included."""
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

    run(["dvc", "checkout", "--with-deps", "preprocess"], project)  # the later stages never ran here

    assert _snapshot(project) == before
    assert status(project) == {}


def status(project: Path) -> dict:
    """`dvc status` of the data stages (the later ones never ran in these projects)."""
    return json.loads(run(["dvc", "status", "--json", "--with-deps", "preprocess"], project).stdout or "{}")


def test_an_untouched_corpus_reruns_nothing(project: Path) -> None:
    assert status(project) == {}
    result = run(["dvc", "repro", "preprocess"], project)
    assert "Running stage" not in result.stdout, result.stdout


def test_editing_one_line_of_a_local_corpus_reruns_prepare_and_what_follows(project: Path) -> None:
    train = project / "corpus/tiny/train.art"
    lines = train.read_text().splitlines(keepends=True)
    lines[7] = "an edited line .\n"
    train.write_text("".join(lines))

    changed = status(project)
    assert list(changed) == ["prepare"], changed
    assert changed["prepare"] == [{"changed deps": {"corpus": "modified"}}], changed

    result = run(["dvc", "repro", "preprocess"], project)
    assert "Running stage 'prepare'" in result.stdout and "Running stage 'preprocess'" in result.stdout
    assert b"an edited line" in (project / "data/prepared/train.arrow").read_bytes()
    assert status(project) == {}
