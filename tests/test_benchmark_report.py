"""docs/benchmarks.md is what benchmarks/report.py renders from benchmarks/results/ (keeping the page's
hand-written text), results written by a benchmark render the same way, and recorded commands hold no path
of the machine they ran on."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks import report, results

RESULT_FILES = sorted(report.RESULTS.glob("*.json"))


def test_committed_page_is_what_the_results_render() -> None:
    page = report.PAGE.read_text(encoding="utf-8")
    assert page == report.render(report.load_results(), report.read_prose(page)), (
        "docs/benchmarks.md is out of date: run python -m benchmarks.report"
    )


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda path: path.name)
def test_every_result_file_has_the_envelope(path: Path) -> None:
    result = json.loads(path.read_text(encoding="utf-8"))
    assert set(results.ENVELOPE_KEYS) <= result.keys()
    assert set(results.MACHINE_KEYS) <= result["machine"].keys()
    assert result["rows"] and all(isinstance(row, dict) for row in result["rows"])
    for row in result["rows"]:  # flat: one figure per cell
        assert all(value is None or isinstance(value, str | int | float) for value in row.values())


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda path: path.name)
def test_every_result_belongs_to_a_section_and_its_command_has_no_absolute_path(path: Path) -> None:
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["benchmark"] in report.ORDER
    module = report.REPO_ROOT / "benchmarks" / f"{result['benchmark']}.py"
    assert module.is_file() or result["benchmark"] in report.DESCRIPTIONS
    words = [word.partition("=")[2] or word for word in shlex.split(result["command"])]
    assert [word for word in words if word.startswith("/") and not word.startswith("/usr/bin/")] == []


def test_a_written_result_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fixed provenance: the test starts no git process and does not depend on the checkout's state.
    monkeypatch.setattr(results, "git_state", lambda written=None: ("0123456789abcdef", True))
    data = results.REPO_ROOT / "data" / "multi30k"
    argv = ["/abs/path/benchmarks/gpu_check.py", "--epochs", "2", f"--data={data}", "/elsewhere/x"]
    monkeypatch.setattr("sys.argv", argv)
    rows = [{"run": "bare PyTorch loop", "target tokens/s": 2878.4, "vs bare loop": 1.0}]
    written = results.write_result(tmp_path / "run.json", "throughput", rows, ["a note"])

    (loaded,) = report.load_results(tmp_path)
    assert loaded == written
    # The entry script as typed, a path in the project relative to its root, any other path as it is.
    command = "python -m benchmarks.gpu_check --epochs 2 --data=data/multi30k /elsewhere/x"
    assert loaded["command"] == command
    page = report.render([loaded])
    assert "## throughput" in page and "python -m benchmarks.throughput --gpu" in page  # its usage
    assert "**Run 1**: " in page and "commit 0123456 (modified), machine M1." in page
    assert f"```bash\n{command}\n```" in page
    assert "| run | target tokens/s | vs bare loop |" in page and "| bare PyTorch loop | 2,878 | 1 |" in page
    assert "- a note" in page


def test_hand_written_text_stays_in_its_section() -> None:
    run = json.loads(RESULT_FILES[0].read_text(encoding="utf-8"))
    prose = "### What it shows\n\nA paragraph.\n"
    page = report.render([run], {run["benchmark"]: prose})
    assert report.read_prose(page) == {run["benchmark"]: prose}
    section = page.split(f"## {run['benchmark']}\n", 1)[1]
    assert section.index(prose) < section.index("### Runs")
    with pytest.raises(ValueError, match="no results"):
        report.render([run], {"no_such_section": prose})


def test_wide_tables_are_split_and_one_value_columns_given_once() -> None:
    rows = [{"label": f"row {n}", "same": 7, **{f"figure {i}": n * i for i in range(10)}} for n in (1, 2)]
    lines = report.tables(rows)
    assert lines[0] == "In every row: same 7; figure 0 0."
    tables = [line for line in lines if line.startswith("| label |")]
    assert len(tables) == 2 and all(line.count(" | ") < report.MAX_COLUMNS for line in tables)
    one = report.tables(rows[:1])  # one row: a column of figures
    assert one[0] == "| label | row 1 |" and "| figure 9 | 9 |" in one


def test_long_commands_break_before_an_option_outside_quotes() -> None:
    command = "python -m benchmarks.quality " + " ".join(f"--run 'label --{n}:HEAD'" for n in range(8))
    lines = report.wrapped(command)
    assert len(lines) > 1 and all(len(line) <= report.COMMAND_WIDTH + 2 for line in lines)
    assert all(line.lstrip().startswith(("python", "--run '")) for line in lines)
    assert shlex.split(" ".join(line.rstrip(" \\") for line in lines)) == shlex.split(command)


def test_the_result_being_written_does_not_make_its_checkout_modified(tmp_path: Path) -> None:
    """A long run rewrites its committed result file after every row; only other changes count."""
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    written, code = tmp_path / "benchmarks" / "results" / "run.json", tmp_path / "code.py"
    written.parent.mkdir(parents=True)
    written.write_text("{}\n")
    code.write_text("x = 1\n")
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "results"]):
        subprocess.run([*git, *command], cwd=tmp_path, check=True, capture_output=True)
    commit = results.git_output("rev-parse", "HEAD", repo=tmp_path)

    written.write_text('{"rows": []}\n')
    assert results.git_state(written, repo=tmp_path) == (commit, False)
    assert results.git_state(repo=tmp_path) == (commit, True)
    code.write_text("x = 2\n")
    assert results.git_state(written, repo=tmp_path) == (commit, True)
