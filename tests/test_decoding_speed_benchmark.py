"""benchmarks/decoding.py --code measures the search of the commit it names: the child process must import
that commit's `pipeline` package, unpacked from git, and not the checkout's or an installed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.decoding import code_at, timed_child
from benchmarks.results import git_state
from pipeline.network.model_files import load_model_dir
from pipeline.network.translator import Translator
from tests.seq2seq_toys import save_word_model

pytestmark = pytest.mark.slow  # a child process


@pytest.mark.skipif(git_state()[0] == "unknown", reason="needs the project as a git checkout (git archive)")
def test_the_child_translates_with_the_unpacked_commit_as_this_checkout_does(tmp_path: Path) -> None:
    models, pairs = save_word_model(tmp_path, "transformer")
    code = code_at("HEAD", tmp_path / "code")
    assert (code / "pipeline" / "network" / "decoding.py").is_file()
    sources = [source for source, _ in pairs]
    source_file, output = tmp_path / "sources.json", tmp_path / "translations.json"
    source_file.write_text(json.dumps(sources), encoding="utf-8")
    # The child exits with an error if `pipeline` came from anywhere but `code`.
    seconds = timed_child(code, models, source_file, output, beam_size=2)
    assert seconds > 0
    translations = json.loads(output.read_text(encoding="utf-8"))
    assert translations == Translator(load_model_dir(models)).translate(sources, beam_size=2)
    assert translations == [target for _, target in pairs]  # the toy model has memorised its pairs
