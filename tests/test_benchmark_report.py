"""docs/benchmarks.md is what benchmarks/report.py renders from benchmarks/results/, and results written by a
benchmark render the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report, results


def test_committed_page_is_what_the_results_render() -> None:
    assert report.PAGE.read_text(encoding="utf-8") == report.render(report.load_results()), (
        "docs/benchmarks.md is out of date: run python -m benchmarks.report"
    )


@pytest.mark.parametrize("path", sorted(report.RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_every_result_file_has_the_envelope(path: Path) -> None:
    result = json.loads(path.read_text(encoding="utf-8"))
    assert set(results.ENVELOPE_KEYS) <= result.keys()
    assert set(results.MACHINE_KEYS) <= result["machine"].keys()
    assert result["rows"] and all(isinstance(row, dict) for row in result["rows"])
    for row in result["rows"]:  # flat: one figure per cell
        assert all(value is None or isinstance(value, str | int | float) for value in row.values())


def test_a_written_result_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fixed provenance: the test starts no git process and does not depend on the checkout's state.
    monkeypatch.setattr(results, "git_state", lambda: ("0123456789abcdef", True))
    monkeypatch.setattr("sys.argv", ["/abs/path/benchmarks/train_throughput.py", "--epochs", "2"])
    rows = [{"run": "bare PyTorch loop", "target tokens/s": 2878.4, "vs bare loop": 1.0}]
    written = results.write_result(tmp_path / "run.json", "train_throughput", rows, ["a note"])

    (loaded,) = report.load_results(tmp_path)
    assert loaded == written
    assert loaded["command"] == "python -m benchmarks.train_throughput --epochs 2"
    page = report.render([loaded])
    assert "## train_throughput" in page
    command = "`python -m benchmarks.train_throughput --epochs 2`"
    assert f"| 1 | bare PyTorch loop | 2,878 | 1 | {command} |" in page
    assert "0123456 (modified)" in page and "- run 1: a note" in page
