"""Bad input to `translate` and `translate --input`: one `error:` line and exit 2 before Ray starts or a
model loads, nothing overwritten or half-written. (A stop signal during a batch translation, which needs
Ray, is in tests/test_ray_data.py.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.__main__ import main
from pipeline.config import MAX_BEAM_SIZE, MAX_LEN_RATIO, ModelConfig, PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.network import translator as translator_module
from pipeline.network.model import build_model
from pipeline.network.model_files import CONFIG_FILE, DECODING_FILE, WEIGHTS_FILE, save_model_dir
from pipeline.network.tokenization import train_tokenizer
from pipeline.network.translator import InputBounds, Translator
from tests.seq2seq_toys import TINY, word_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECODING = {"beam_size": 2, "length_penalty": 1.0, "max_len_ratio": 2.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny GRU with word tokenizers: it decodes every sentence to its length limit,
    so a file of a few thousand lines keeps a model actor busy for a while."""
    texts = [source for source, _ in word_pairs()]
    tokenizer = train_tokenizer(texts, PreprocessConfig(tokenizer="word", vocab_size=100))
    torch.manual_seed(0)
    config = ModelConfig(arch="gru", **TINY)
    model = build_model(config, tokenizer.get_vocab_size(), tokenizer.get_vocab_size()).eval()
    path = tmp_path_factory.mktemp("translate") / "models"
    save_model_dir(path, model, config, tokenizer, tokenizer, DECODING)
    return path


def translate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m pipeline translate ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["translate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one `error:` line of a `translate` that must exit 2 with nothing on stdout, before Ray starts."""
    import ray

    code, out, err = translate(capsys, *args)
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not ray.is_initialized()  # checked before Ray starts
    return err.removeprefix("error: ").rstrip("\n")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project-like folder holding in.txt, as the current directory."""
    (tmp_path / "in.txt").write_text("alpha bravo\ncharlie\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------- input and output paths


@pytest.mark.parametrize("spelling", ["same", "dotdot", "absolute", "symlink", "hardlink"])
def test_an_output_that_is_the_input_is_refused_under_any_spelling(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    output = {
        "same": "in.txt",
        "dotdot": f"../{workdir.name}/in.txt",
        "absolute": str(workdir / "in.txt"),
        "symlink": "link.txt",
        "hardlink": "hard.txt",
    }[spelling]
    if spelling == "symlink":
        (workdir / "link.txt").symlink_to("in.txt")
    if spelling == "hardlink":
        os.link(workdir / "in.txt", workdir / "hard.txt")
    message = refused(capsys, "--model", str(model_dir), "--input", "in.txt", "--output", output)
    assert message == (
        f"--output {output} is the --input in.txt: writing it would replace the text with its translations;"
        " write them elsewhere"
    )
    assert (workdir / "in.txt").read_text() == "alpha bravo\ncharlie\n"


def test_an_output_in_the_input_folder_is_refused(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The next run would translate it as one of the folder's files."""
    message = refused(capsys, "--model", str(model_dir), "--input", ".", "--output", "out.txt")
    assert (
        message
        == "--output out.txt is in the --input folder ., whose every file is translated: write it elsewhere"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--input", "", "--output", "out.txt"],
            "--input is empty: give the file, or the folder of files, to translate",
        ),
        (["--input", "in.txt", "--output", ""], "--output is empty: give the path of the file to write"),
        (
            ["--input", "in.txt", "--output", "sub"],
            "--output sub is a folder: give the path of a file to write",
        ),
        (
            ["--input", "in.txt", "--output", "in.txt/out.txt"],
            "--output: in.txt is a file, but in.txt/out.txt goes inside it: move it away",
        ),
        (
            ["--input", "in.txt", "--output", "/sys/translations.txt"],  # read-only even for root
            "--output /sys/translations.txt: cannot write in /sys: Permission denied",
        ),
    ],
    ids=["empty-input", "empty-output", "output-folder", "output-under-a-file", "output-read-only"],
)
def test_an_output_that_cannot_be_written_is_refused_before_ray_starts(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (workdir / "sub").mkdir()
    before = sorted(path.name for path in workdir.iterdir())
    assert refused(capsys, "--model", str(model_dir), *args) == message
    assert sorted(path.name for path in workdir.iterdir()) == before  # nothing created or changed


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / DECODING_FILE).unlink(), "is incomplete: missing decoding.json"),
        (lambda folder: (folder / CONFIG_FILE).write_text("{}"), "model_config.json: format_version None"),
    ],
    ids=["missing-file", "bad-config"],
)
def test_a_bad_model_folder_for_a_batch_translation_is_refused_before_ray_starts(
    workdir: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], object],
    message: str,
) -> None:
    """The model actors load the folder on the cluster: a folder they cannot load is named before Ray and
    the pool start."""
    folder = workdir / "broken-model"
    shutil.copytree(model_dir, folder)
    damage(folder)
    assert message in refused(capsys, "--model", str(folder), "--input", "in.txt", "--output", "out.txt")
    assert not (workdir / "out.txt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_an_output_in_a_read_only_folder_is_refused(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "locked").mkdir(mode=0o555)
    message = refused(capsys, "--model", str(model_dir), "--input", "in.txt", "--output", "locked/out.txt")
    assert message == "--output locked/out.txt: cannot write in locked: Permission denied"


def test_a_fifo_input_is_named_as_one(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(workdir / "pipe")
    message = refused(capsys, "--model", str(model_dir), "--input", "pipe", "--output", "out.txt")
    assert message == (
        "--input pipe is a FIFO (named pipe), not a regular file: give a file or a folder of files (send a"
        " stream to `translate` on stdin)"
    )


# ------------------------------------------------------------------------------------- decoding bounds


@pytest.mark.parametrize("beam", ["100000", "2000", "0"])
@pytest.mark.parametrize("with_input", [False, True], ids=["sentences", "input"])
def test_a_beam_beyond_evaluates_bounds_is_refused_before_the_model_loads(
    workdir: Path, capsys: pytest.CaptureFixture[str], beam: str, with_input: bool
) -> None:
    where = ["--input", "in.txt", "--output", "out.txt"] if with_input else ["alpha"]
    message = refused(capsys, "--model", str(workdir / "no-model"), "--beam-size", beam, *where)
    assert message == f"--beam-size must be from 1 to {MAX_BEAM_SIZE}, got {beam}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("beam_size", 1_000_000, f"beam_size must be a whole number from 1 to {MAX_BEAM_SIZE}, got 1000000"),
        ("max_len_ratio", 1e300, f"max_len_ratio must be above 0 and at most {MAX_LEN_RATIO:g}, got 1e+300"),
    ],
)
def test_decoding_json_beyond_the_bounds_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], key: str, value: float, message: str
) -> None:
    model = tmp_path / "models"
    model.mkdir()
    for source in model_dir.iterdir():
        (model / source.name).write_bytes(source.read_bytes())
    (model / DECODING_FILE).write_text(json.dumps({**DECODING, key: value}))
    assert refused(capsys, "--model", str(model), "alpha") == f"{model / DECODING_FILE}: {message}"


def test_a_served_request_beyond_the_beam_bound_is_refused(model_dir: Path) -> None:
    """The served model passes a request's beam_size on to `Translator.translate`."""
    with pytest.raises(PipelineError, match=rf"^beam size must be from 1 to {MAX_BEAM_SIZE}, got 100000$"):
        Translator.from_dir(model_dir, bounds=InputBounds()).translate(["alpha"], beam_size=100_000)


@pytest.mark.parametrize(("key", "value"), [("beam_size", MAX_BEAM_SIZE + 1), ("max_len_ratio", 1e300)])
def test_evaluate_settings_have_the_same_bounds(key: str, value: float) -> None:
    from pipeline.config import EvaluateConfig

    with pytest.raises(ValueError, match="less than or equal"):
        EvaluateConfig(**{key: value})


# ------------------------------------------------------------------------------------------- long lines


def test_the_tokenizer_sees_at_most_the_character_cap_of_a_long_line(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A line is cut to max_tokens x CHARS_PER_INPUT_TOKEN characters before it is tokenized: the
    tokenizer's memory follows the text it is given (one 50 MB line took 9.5 GB)."""
    seen: list[int] = []
    encode = translator_module.encode_texts

    def measured(tokenizer: object, texts: list[str]) -> list[list[int]]:
        seen.extend(len(text) for text in texts)
        return encode(tokenizer, texts)

    monkeypatch.setattr(translator_module, "encode_texts", measured)
    bounds = InputBounds(max_tokens=8)
    assert bounds.max_chars == 8 * translator_module.CHARS_PER_INPUT_TOKEN
    long_word = "x" * 100_000  # one token of the word tokenizer: only the character cut shortens it
    out = Translator.from_dir(model_dir, bounds=bounds).translate(["alpha", long_word], beam_size=1)
    assert len(out) == 2 and max(seen) == bounds.max_chars
    assert "sentence 2: over 8 tokens, only the first 8 translated" in caplog.text


def test_a_line_of_megabytes_on_stdin_translates_at_once(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    line = ("alpha bravo " * 400_000).encode() + b"\ncharlie\n"  # 4.8 MB, then a short line
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(line)))
    started = time.monotonic()
    code, out, err = translate(
        capsys, "--model", str(model_dir), "--beam-size", "1", "--max-input-tokens", "16"
    )
    assert code == 0, err
    assert len(out.splitlines()) == 2
    assert time.monotonic() - started < 30


# ------------------------------------------------------------------------------ one line, not a traceback


@pytest.mark.parametrize("name", [CONFIG_FILE, DECODING_FILE])
def test_deeply_nested_json_in_a_model_file_is_one_line_naming_it(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    model = tmp_path / "models"
    model.mkdir()
    for source in model_dir.iterdir():
        (model / source.name).write_bytes(source.read_bytes())
    (model / name).write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert (
        refused(capsys, "--model", str(model), "alpha")
        == f"{model / name} is not usable JSON: nested too deeply"
    )


def test_translate_with_stdin_closed_is_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed descriptor 0 (`<&-`)
    message = refused(capsys, "--model", str(model_dir))
    assert message == "no sentences: give them as arguments, or one a line on stdin (it is closed)"


def test_a_weights_file_that_is_a_folder_is_named_as_one(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "models"
    model.mkdir()
    for source in model_dir.iterdir():
        if source.name != WEIGHTS_FILE:
            (model / source.name).write_bytes(source.read_bytes())
    (model / WEIGHTS_FILE).mkdir()
    message = refused(capsys, "--model", str(model), "alpha")
    assert message == f"{model / WEIGHTS_FILE} is a folder, not a regular file: put the model's file there"
