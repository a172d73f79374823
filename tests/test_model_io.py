"""The models/ folder round trip, the Translator on top of it, and `python -m pipeline translate`."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig, PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import source_tensor
from pipeline.network.decoding import beam_search, greedy_decode
from pipeline.network.model import build_model
from pipeline.network.model_files import MODEL_FILES, WEIGHTS_FILE, load_model_dir, save_model_dir, tied_names
from pipeline.network.tokenization import train_tokenizer
from pipeline.network.translator import Translator
from tests.seq2seq_toys import DECODING, TINY, save_word_model, word_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    return save_word_model(tmp_path_factory.mktemp("word_model"), "gru_attention")


def _random_model_dir(
    tmp_path: Path, arch: str, n_layers: int = 1, **settings: object
) -> tuple[Path, torch.nn.Module]:
    config = ModelConfig(arch=arch, **{**TINY, "n_layers": n_layers, **settings})
    texts = [s for s, _ in word_pairs()]
    tokenizer = train_tokenizer(texts, PreprocessConfig(tokenizer="word", vocab_size=100))
    torch.manual_seed(1)
    # Unequal vocabularies catch a swapped side, unless the embeddings are shared (one vocabulary).
    tgt_extra = 3 if config.share_embeddings else 5
    model = build_model(config, tokenizer.get_vocab_size() + 3, tokenizer.get_vocab_size() + tgt_extra).eval()
    path = tmp_path / "models"
    save_model_dir(path, model, config, tokenizer, tokenizer, DECODING)
    return path, model


@pytest.mark.parametrize(
    ("arch", "n_layers", "settings"),
    [
        ("gru", 1, {}),
        ("gru_attention", 2, {}),
        ("transformer", 2, {"tie_embeddings": False}),
        ("transformer", 2, {"tie_embeddings": True}),
        ("transformer", 1, {"tie_embeddings": True, "share_embeddings": True, "ff_activation": "gelu"}),
    ],
    ids=["gru", "gru_attention", "transformer-untied", "transformer-tied", "transformer-shared-gelu"],
)
def test_round_trip_gives_identical_logits_and_translations(
    tmp_path: Path, arch: str, n_layers: int, settings: dict
) -> None:
    path, model = _random_model_dir(tmp_path, arch, n_layers, **settings)
    loaded = load_model_dir(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)
    assert loaded.model_config == model.config and loaded.decoding == DECODING
    assert not loaded.model.training
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    tgt_in = torch.tensor([[2, 4, 5, 6]] * 3)
    with torch.inference_mode():
        assert torch.equal(model(src, lengths, tgt_in), loaded.model(src, lengths, tgt_in))
    assert greedy_decode(model, src, lengths) == greedy_decode(loaded.model, src, lengths)
    beams = [beam_search(m, src, lengths, beam_size=3) for m in (model, loaded.model)]
    assert beams[0] == beams[1]


def test_weights_are_safetensors_not_a_pickle(tmp_path: Path) -> None:
    path, model = _random_model_dir(tmp_path, "gru_attention")
    raw = (path / WEIGHTS_FILE).read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a bare pickle nor torch.save's zip of one
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert all(entry["dtype"] == "F32" for key, entry in header.items() if key != "__metadata__")
    assert b"torch" not in raw[: 8 + header_size]  # no class references in the header


def test_a_tied_weight_is_stored_once_and_comes_back_tied(tmp_path: Path) -> None:
    path, model = _random_model_dir(tmp_path, "transformer", tie_embeddings=True, share_embeddings=True)
    assert tied_names(model) == {
        "decoder.embedding.weight": "encoder.embedding.weight",
        "decoder.W_o.weight": "encoder.embedding.weight",
    }
    stored = load_file(str(path / WEIGHTS_FILE))
    assert set(stored) == set(model.state_dict()) - set(tied_names(model))
    config = json.loads((path / "model_config.json").read_text())["model"]
    assert (config["arch"], config["share_embeddings"], config["n_heads"]) == ("transformer", True, 4)
    loaded = load_model_dir(path).model
    assert loaded.decoder.W_o.weight is loaded.decoder.embedding.weight is loaded.encoder.embedding.weight
    assert torch.equal(loaded.decoder.W_o.weight, model.encoder.embedding.weight)


@pytest.mark.parametrize("missing", MODEL_FILES)
def test_a_missing_file_is_named_in_the_error(tmp_path: Path, missing: str) -> None:
    path, _ = _random_model_dir(tmp_path, "gru")
    (path / missing).unlink()
    with pytest.raises(PipelineError, match=missing.replace(".", r"\.")):
        load_model_dir(path)


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="model folder not found"):
        load_model_dir(tmp_path / "nowhere")


def test_weights_saved_from_a_ddp_wrapper_still_load(tmp_path: Path) -> None:
    path, model = _random_model_dir(tmp_path, "gru_attention")
    weights = load_file(str(path / WEIGHTS_FILE))
    save_file({f"module.{key}": value for key, value in weights.items()}, str(path / WEIGHTS_FILE))
    loaded = load_model_dir(path)
    src, lengths = source_tensor([[4, 5, 6]])
    assert greedy_decode(loaded.model, src, lengths) == greedy_decode(model, src, lengths)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    path, _ = _random_model_dir(tmp_path, "gru")
    config_file = path / "model_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["hidden_dim"] *= 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="does not match") as error:
        load_model_dir(path)
    # One line naming the first tensor that differs, not torch's list of every size mismatch.
    assert re.search(
        r"encoder\.rnn\.\S+ is \[\d+, \d+\] in the file, \[\d+, \d+\] by the config", str(error.value)
    )
    assert "\n" not in str(error.value)


def test_saving_again_replaces_the_folder_whole(tmp_path: Path) -> None:
    path, model = _random_model_dir(tmp_path, "gru")
    (path / "stale.txt").write_text("from an older run")
    loaded = load_model_dir(path)
    save_model_dir(path, model, model.config, loaded.src_tokenizer, loaded.tgt_tokenizer, DECODING)
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temporary folders left behind


def test_bad_decoding_settings_are_refused_on_save(tmp_path: Path) -> None:
    path, model = _random_model_dir(tmp_path, "gru")
    loaded = load_model_dir(path)
    with pytest.raises(PipelineError, match="beam_size"):
        save_model_dir(
            path,
            model,
            model.config,
            loaded.src_tokenizer,
            loaded.tgt_tokenizer,
            {**DECODING, "beam_size": 0},
        )


def test_translator_returns_translations_in_input_order(word_model_dir: tuple[Path, list]) -> None:
    path, pairs = word_model_dir
    translator = Translator.from_dir(path)
    sources = [s for s, _ in pairs][::-1]
    expected = [t for _, t in pairs][::-1]
    messy = "  " + pairs[0][0].replace(" ", " \t ") + "\n"  # cleaned like training text: same translation
    inputs = [sources[0], "", *sources[1:], "   ", messy]
    outputs = translator.translate(inputs, batch_size=3)
    assert outputs == [expected[0], "", *expected[1:], "", pairs[0][1]]
    assert translator.translate(sources, beam_size=1, batch_size=64) == expected
    assert translator.translate([]) == []


def _run_cli(*args: str, stdin: str | bytes = "", **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "translate", *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
        timeout=120,
    )
    out, err = (stream.decode("utf-8", errors="replace") for stream in (done.stdout, done.stderr))
    return subprocess.CompletedProcess(done.args, done.returncode, out, err)


def _translate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m pipeline translate ARGS` in this process: (exit code, stdout, stderr)."""
    from pipeline.__main__ import main

    capsys.readouterr()
    code = main(["translate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    """The CLI's message for a refused input: exactly one `error:` line on stderr."""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.slow
def test_cli_prints_one_translation_per_input_line(word_model_dir: tuple[Path, list]) -> None:
    path, pairs = word_model_dir
    from_args = _run_cli("--model", str(path), pairs[0][0], pairs[1][0])
    assert from_args.returncode == 0, from_args.stderr
    assert from_args.stdout.splitlines() == [pairs[0][1], pairs[1][1]]
    from_stdin = _run_cli("--model", str(path), "--beam-size", "1", stdin=f"{pairs[2][0]}\n\n{pairs[3][0]}\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.splitlines() == [pairs[2][1], "", pairs[3][1]]


@pytest.mark.slow
def test_cli_names_a_missing_model_folder(tmp_path: Path) -> None:
    result = _run_cli("--model", str(tmp_path / "models"), "alpha")
    assert result.returncode == 2
    assert "model folder not found" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_cli_names_the_stdin_line_that_is_not_utf8(word_model_dir: tuple[Path, list], locale: str) -> None:
    """Whatever the locale (a C locale decodes a bad byte to a surrogate, which the tokenizer refuses with a
    TypeError; a UTF-8 one raises UnicodeDecodeError), the line is named and nothing is translated."""
    path, pairs = word_model_dir
    result = _run_cli(
        "--model", str(path), stdin=f"{pairs[0][0]}\nthe \xff dog .\n".encode("latin-1"), LC_ALL=locale
    )
    assert result.returncode == 2, result.stderr
    assert (
        _one_error_line(result.stderr) == "stdin:2: invalid UTF-8 (invalid start byte at byte 4 of the line)"
    )
    assert result.stdout == ""


def test_text_that_is_not_unicode_is_named_by_its_argument_or_sentence(
    word_model_dir: tuple[Path, list], capsys: pytest.CaptureFixture[str]
) -> None:
    """An undecodable byte in an argument (the OS hands Python a surrogate for it), or a lone surrogate
    escape ("\\udcff") sent to the served model: named, not a TypeError from the tokenizer."""
    path, pairs = word_model_dir
    code, out, err = _translate(capsys, "--model", str(path), pairs[0][0], os.fsdecode(b"the \xff dog ."))
    assert (code, out) == (2, "")
    assert _one_error_line(err) == "argument 2: not valid text (\\udcff at position 4); give UTF-8"
    with pytest.raises(PipelineError, match=r"^sentence 1: not valid text \(\\ud800 at position 0\)"):
        Translator.from_dir(path).translate(["\ud800"])


@pytest.mark.slow
def test_cli_cuts_long_sentences_with_a_warning_naming_their_lines(word_model_dir: tuple[Path, list]) -> None:
    path, pairs = word_model_dir
    lines = ["alpha bravo charlie delta", "echo", "golf hotel alpha bravo charlie"]
    result = _run_cli("--model", str(path), "--max-input-tokens", "2", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "stdin lines 1, 3: over 2 tokens, only the first 2 translated (translate --max-input-tokens,"
        " $PIPELINE_MAX_INPUT_TOKENS for a served model)"
    ), result.stderr
    expected = Translator.from_dir(path).translate(["alpha bravo", "echo", "golf hotel"])
    assert result.stdout.splitlines() == expected


def test_cli_refuses_more_sentences_than_the_bound_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = str(tmp_path / "no-model")  # the count is checked first: no model is needed to refuse
    code, out, err = _translate(capsys, "--model", absent, "--max-sentences", "2", "a", "b", "c")
    assert code == 2 and out == ""
    assert _one_error_line(err) == (
        "over 2 arguments in one request: give at most 2 (translate --max-sentences, $PIPELINE_MAX_SENTENCES"
        " for a served model) or split the input"
    )


@pytest.mark.slow
def test_cli_translates_stdin_of_any_length_in_requests_of_the_bound(
    word_model_dir: tuple[Path, list],
) -> None:
    """stdin is a stream: chunks of --max-sentences lines, numbered on across chunks in messages."""
    path, _ = word_model_dir
    lines = ["echo", "alpha bravo", "golf hotel alpha bravo charlie", "echo", "alpha"]
    result = _run_cli(
        "--model",
        str(path),
        "--max-input-tokens",
        "2",
        stdin="\n".join(lines) + "\n",
        PIPELINE_MAX_SENTENCES="2",
    )
    assert result.returncode == 0, result.stderr
    expected = Translator.from_dir(path).translate(["echo", "alpha bravo", "golf hotel", "echo", "alpha"])
    assert result.stdout.splitlines() == expected
    assert "stdin line 3: over 2 tokens" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-input-tokens", "0"], {}, "--max-input-tokens must be a positive integer, got 0"),
        (["--max-sentences", "-1"], {}, "--max-sentences must be a positive integer, got -1"),
        (
            [],
            {"PIPELINE_MAX_INPUT_TOKENS": "lots"},
            "$PIPELINE_MAX_INPUT_TOKENS must be a positive integer, got 'lots'",
        ),
        ([], {"PIPELINE_MAX_SENTENCES": "0"}, "$PIPELINE_MAX_SENTENCES must be a positive integer, got 0"),
        (
            [],
            {"PIPELINE_DEVICE": "tpu9"},
            "unknown device 'tpu9' (from $PIPELINE_DEVICE): use auto, cpu or cuda",
        ),
        (["--max-sentences", str(2**64)], {}, f"--max-sentences must be at most {sys.maxsize}, got {2**64}"),
        (
            [],
            {"PIPELINE_MAX_SENTENCES": str(2**64)},
            f"$PIPELINE_MAX_SENTENCES must be at most {sys.maxsize}, got {2**64}",
        ),
        (
            [],
            {"PIPELINE_DEVICE": "mps"},
            "unknown device 'mps' (from $PIPELINE_DEVICE): use auto, cpu or cuda",
        ),
        (
            [],
            {"PIPELINE_DEVICE": "meta"},
            "unknown device 'meta' (from $PIPELINE_DEVICE): use auto, cpu or cuda",
        ),
        (
            [],
            {"PIPELINE_DEVICE": "cpu:0"},
            "unknown device 'cpu:0' (from $PIPELINE_DEVICE): use auto, cpu or cuda",
        ),
        (["--device", "mps"], {}, "unknown device 'mps': use auto, cpu or cuda"),
    ],
    ids=[
        "tokens-option",
        "sentences-option",
        "tokens-env",
        "sentences-env",
        "device-env",
        "sentences-over-maxsize",
        "sentences-env-over-maxsize",
        "mps",
        "meta",
        "cpu0",
        "device-option",
    ],
)
def test_cli_names_a_bad_bound_or_device_setting(
    word_model_dir: tuple[Path, list],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = _translate(capsys, "--model", str(word_model_dir[0]), *args, "alpha")
    assert (code, out) == (2, "") and _one_error_line(err) == message


def test_cli_runs_where_pipeline_device_says(
    word_model_dir: tuple[Path, list], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$PIPELINE_DEVICE is honoured; --device wins over it."""
    path, pairs = word_model_dir
    monkeypatch.setenv("PIPELINE_DEVICE", "cpu" if torch.cuda.is_available() else "cuda")
    code, _, err = _translate(capsys, "--model", str(path), pairs[0][0])
    if torch.cuda.is_available():
        assert code == 0, err
    else:
        assert code == 2 and "device 'cuda' (from $PIPELINE_DEVICE) asked for" in _one_error_line(err)
    code, out, err = _translate(capsys, "--model", str(path), "--device", "cpu", pairs[0][0])
    assert code == 0 and out.splitlines() == [pairs[0][1]], err


def test_a_registry_uri_without_a_store_leaves_no_store_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = _translate(capsys, "--model", "models:/nope@champion", "alpha")
    assert (code, out) == (2, "")
    assert _one_error_line(err).startswith(
        f"cannot fetch models:/nope@champion: there is no MLflow store at {tmp_path / 'mlflow.db'}"
    )
    assert list(tmp_path.iterdir()) == [], "no mlflow.db (nor anything else) created to find that out"


VOCAB_RULE = "must be an integer from 4 to 4,294,967,295 (token ids are 32-bit), got"


def _edit_model_config(path: Path, edit: Callable[[dict], object]) -> None:
    config_file = path / "model_config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda config: config.update(src_vocab_size=-5),
            f"src_vocab_size {VOCAB_RULE} -5",
        ),
        (
            lambda config: config.update(tgt_vocab_size=10**13),
            f"tgt_vocab_size {VOCAB_RULE} 10000000000000",
        ),
        (
            lambda config: config.update(src_vocab_size="20"),
            f"src_vocab_size {VOCAB_RULE} '20'",
        ),
        (
            lambda config: config["model"].update(arch="lstm"),
            "model.arch: Input should be 'gru', 'gru_attention' or 'transformer' (got 'lstm')",
        ),
    ],
    ids=["negative-vocab", "huge-vocab", "text-vocab", "unknown-arch"],
)
def test_a_bad_model_config_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[dict], object], message: str
) -> None:
    path, _ = _random_model_dir(tmp_path, "gru")
    _edit_model_config(path, edit)
    code, out, err = _translate(capsys, "--model", str(path), "alpha")
    assert (code, out) == (2, "") and _one_error_line(err) == f"{path / 'model_config.json'}: {message}"


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """e.g. the target tokenizer copied over the source one: ids past the embedding would be an IndexError
    on the first sentence that uses one."""
    path, model = _random_model_dir(tmp_path, "gru")
    words = [f"word{i}" for i in range(model.src_vocab_size + 10)]
    bigger = train_tokenizer(words, PreprocessConfig(tokenizer="word", vocab_size=1000))
    bigger.save(str(path / "src_tokenizer.json"))
    code, out, err = _translate(capsys, "--model", str(path), "alpha")
    assert (code, out) == (2, "")
    assert _one_error_line(err) == (
        f"{path / 'src_tokenizer.json'} has {bigger.get_vocab_size()} tokens, the model's source vocabulary"
        f" only {model.src_vocab_size}: they do not belong together"
    )


def test_the_weights_file_gets_the_permissions_of_its_siblings(tmp_path: Path) -> None:
    path, _ = _random_model_dir(tmp_path, "gru")
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in path.iterdir()}
    assert modes[WEIGHTS_FILE] == modes["model_config.json"], modes


def test_token_batches_keep_each_padded_batch_within_the_budget() -> None:
    from pipeline.network.translator import token_batches

    lengths = [40, 30, 30, 10, 10, 10, 10, 5]  # padded sizes, longest first, as the Translator orders them
    assert token_batches(lengths, 60) == [(0, 1), (1, 3), (3, 8)]
    assert token_batches([100, 5], 60) == [(0, 1), (1, 2)], "one sentence over the budget goes alone"
    assert token_batches([], 60) == []


@pytest.mark.parametrize("arch", ["gru_attention", "transformer"])
def test_translations_cut_by_tokens_equal_those_cut_by_count(tmp_path: Path, arch: str) -> None:
    """What a GPU does differently (batches cut by tokens) changes no translation; checked on the CPU."""
    path, _ = _random_model_dir(tmp_path, arch)
    sentences = [s for s, _ in word_pairs(n=20, seed=9)]
    by_count = Translator.from_dir(path).translate(sentences, beam_size=2, batch_size=3)
    loaded = load_model_dir(path)
    by_tokens = Translator(loaded, device="cpu", batch_tokens=40).translate(sentences, beam_size=2)
    assert by_tokens == by_count


def test_devices_resolve_auto_to_what_there_is_and_refuse_a_missing_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.errors import PipelineError
    from pipeline.network.translator import DEVICE_ENV, resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(None).type == "cpu", "$PIPELINE_DEVICE=cpu forces the CPU"
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(PipelineError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


def test_decoding_turns_tf32_off_on_a_gpu_and_restores_it() -> None:
    """TF32 makes near-ties come out differently from the CPU; the switch itself needs no GPU to check."""
    from pipeline.network.translator import exact_float32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with exact_float32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32, "the CPU's settings are left alone"
        with pytest.raises(RuntimeError, match="mid-decode"), exact_float32(torch.device("cuda")):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("mid-decode")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compares its translations with the CPU's"
)
@pytest.mark.parametrize("arch", ["gru_attention", "transformer"])
def test_a_gpu_translates_as_the_cpu_does(tmp_path: Path, arch: str) -> None:
    """evaluate, `translate` and the served model on CUDA (batches cut by tokens) give the CPU's output."""
    path, _ = save_word_model(tmp_path, arch)
    sentences = [s for s, _ in word_pairs(n=40, seed=11)]  # the memorised pairs and new word orders
    for beam_size in (1, 2):
        on_cpu = Translator.from_dir(path, device="cpu").translate(sentences, beam_size=beam_size)
        on_gpu = Translator.from_dir(path, device="cuda").translate(sentences, beam_size=beam_size)
        assert on_gpu == on_cpu, f"beam {beam_size}"
