"""params.yaml (and recipes) are read strictly: a file that PyYAML would read "somehow" is an error that
names the file and line, before any stage does work, and set-params leaves such a file as it was."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.__main__ import main
from tests.helpers import REPO_ROOT

SHIPPED = (REPO_ROOT / "params.yaml").read_text()

BAD_FILES = {
    # A second `data:` block: PyYAML keeps the last, which drops data.source and prepares the built-in corpus.
    "duplicate-section": (
        SHIPPED + "data:\n  max_tokens: 5\n",
        rf"params.yaml:{SHIPPED.count(chr(10)) + 1}: duplicate key 'data' \(first at line \d+\)",
    ),
    "duplicate-key": (
        SHIPPED.replace("  seed: 42\n", "  seed: 42\n  seed: 43\n", 1),
        r"params.yaml:\d+: duplicate key 'seed' \(first at line \d+\)",
    ),
    "empty": ("", r"params.yaml is empty: expected a mapping of sections"),
    "comments-only": ("# nothing here\n", r"params.yaml is empty"),
    "list": (
        "- data\n- model\n",
        r"params.yaml:1: expected a mapping of sections at the top level, got a list",
    ),
    "scalar": ("hello\n", r"params.yaml:1: expected a mapping of sections at the top level, got a str"),
    "invalid-yaml": ("data: [unclosed\n", r"params.yaml:2: "),
}


def run(directory: Path, *arguments: str) -> int:
    return main(["--params", str(directory / "params.yaml"), *arguments])


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_params_file_is_refused_naming_file_and_line_before_any_work(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text, message = BAD_FILES[case]
    (tmp_path / "params.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path, "prepare") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert re.search(message, error), error
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("case", ["empty", "list", "invalid-yaml", "duplicate-section"])
def test_set_params_refuses_a_bad_file_and_leaves_it_untouched(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text, message = BAD_FILES[case]
    (tmp_path / "params.yaml").write_text(text)
    assert run(tmp_path, "set-params", "train.epochs=3") == 2
    assert re.search(message, capsys.readouterr().err)
    assert (tmp_path / "params.yaml").read_text() == text


def test_a_params_file_that_is_not_utf8_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "params.yaml").write_bytes(b"data:\n  source: builtin\n  src_lang: \xe9n\n")
    assert run(tmp_path, "prepare") == 2
    assert "params.yaml:3: not UTF-8 (byte 36)" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_params_file_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(SHIPPED)
    path.chmod(0)
    try:
        assert run(tmp_path, "prepare") == 2
    finally:
        path.chmod(0o644)
    assert f"cannot read {path}: Permission denied" in capsys.readouterr().err
