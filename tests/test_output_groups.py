"""A stage's outputs are all new or all old: a failure while writing any of them (here: something in the
way of one) leaves every previous output as it was, with one message and no temporaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, atomic_file, outputs_together
from tests.helpers import write_params


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "params.yaml"
    }


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"builtin": {"n_pairs": 300}}})
    assert main(["prepare"]) == 0
    write_params(tmp_path, {"data": {"builtin": {"n_pairs": 400}}})  # the next run would change everything
    return tmp_path


def test_a_report_that_cannot_be_written_keeps_the_new_data_out_too(
    prepared: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = prepared / "reports" / "prepare_stats.json"
    previous = stats.read_bytes()
    stats.unlink()
    stats.mkdir()  # a folder where the stage writes a file
    (stats / "keep.txt").write_text("user data")
    before = snapshot(prepared)

    assert main(["prepare"]) == 2

    assert "prepare_stats.json is a folder where the stage writes a file" in capsys.readouterr().err
    assert snapshot(prepared) == before, "data/prepared and the other report are the previous ones"
    assert not [p for p in prepared.rglob(".*") if p.name.startswith((".prepared", ".prepare_"))]
    shutil.rmtree(stats)
    stats.write_bytes(previous)


@pytest.mark.parametrize("blocked", ["data", "reports"])
def test_a_file_where_an_output_folder_belongs_is_one_message(
    prepared: Path, blocked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(prepared / blocked)
    (prepared / blocked).write_text("not a folder")
    before = snapshot(prepared)

    assert main(["prepare"]) == 2

    error = capsys.readouterr().err
    assert error.startswith(f"error: {blocked} is a file, but {blocked}/") and error.count("\n") == 1
    assert snapshot(prepared) == before


def test_outputs_written_together_appear_together_or_not_at_all(tmp_path: Path) -> None:
    first, second = tmp_path / "out" / "folder", tmp_path / "out" / "file.txt"
    with outputs_together():
        with atomic_dir(first) as folder, atomic_file(folder / "inside.txt") as handle:
            handle.write("a")  # inside a temporary: written at once
        assert not first.exists(), "nothing appears before the group ends"
        with atomic_file(second) as handle:
            handle.write("b")
    assert (first / "inside.txt").read_text() == "a" and second.read_text() == "b"

    with pytest.raises(RuntimeError), outputs_together():
        with atomic_dir(first) as folder:
            (folder / "inside.txt").write_text("new")
        raise RuntimeError("the stage fails after its first output")
    assert (first / "inside.txt").read_text() == "a"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["file.txt", "folder"]

    second.unlink()
    second.mkdir()
    with pytest.raises(PipelineError, match="is a folder where the stage writes a file"), outputs_together():
        with atomic_dir(first) as folder:
            (folder / "inside.txt").write_text("new")
        with atomic_file(second) as handle:
            handle.write("c")
    assert (first / "inside.txt").read_text() == "a"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["file.txt", "folder"]
