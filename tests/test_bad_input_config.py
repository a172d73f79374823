"""Bad configuration, refused with one message before any work: float keys that are not finite, seeds out of
numpy's range, settings that cannot work together, `set-params` on a file that is not there or with an
empty section, `PIPELINE_SET` holding an option, deeply nested JSON, and messages that name the real cause.
Each case runs the real command line in-process (the cluster script in a subprocess, in the slow lane):
nothing starts Ray."""

from __future__ import annotations

import codecs
import json
import math
import os
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.__main__ import main
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict, load_config, set_params
from tests.helpers import REPO_ROOT, write_params

SHIPPED = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `error:` message the command printed (its lines), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    messages = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(messages) == 1, err
    return err[err.index("error:") :].rstrip("\n")


def _refused(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    assert main(list(arguments)) == 2
    return _error(capsys)


# ---------------------------------------------------------------------------------------------- data.source


def test_an_empty_data_source_is_refused_instead_of_reading_the_project_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"source": ""}})
    error = _refused(capsys, "prepare")
    assert "data.source: '' names no folder, and would read the project folder itself" in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_a_home_folder_of_an_unknown_user_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for source in ("~no-such-user-here/corpus", "hf:~no-such-user-here/corpus"):
        write_params(tmp_path, {"data": {"source": source}})
        error = _refused(capsys, "prepare")
        assert error == (
            "error: data.source '~no-such-user-here/corpus': there is no user 'no-such-user-here' on this"
            " machine, so ~no-such-user-here names no home folder: give the corpus folder's path"
        )


def test_a_single_file_as_data_source_is_refused_as_the_docs_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corpus is a folder of split files; the docs and params.yaml's comment say so (not 'or file')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.tsv").write_text("en\tde\na\tb\n")
    write_params(tmp_path, {"data": {"source": "corpus/train.tsv", "tgt_lang": "de"}})
    error = _refused(capsys, "prepare")
    assert "is a file; give the folder that holds the split files" in error
    for text in (
        SHIPPED,
        (REPO_ROOT / "docs/configuration.md").read_text(),
        (REPO_ROOT / "corpus/README.md").read_text(),
    ):
        assert "folder or file" not in text and "<folder or file>" not in text


@pytest.mark.parametrize("language", ["src_lang", "tgt_lang"])
@pytest.mark.parametrize("kind", ["tsv", "jsonl", "parquet"])
def test_a_language_named_like_a_split_file_kind_is_named_as_the_cause(language: str, kind: str) -> None:
    """Before: 'split train is stored more than once (train.de, train.tsv)', blaming the folder."""
    other = "xx" if language == "src_lang" else "en"
    data = {
        "source": "corpus/x",
        language: kind,
        ("tgt_lang" if language == "src_lang" else "src_lang"): other,
    }
    with pytest.raises(PipelineError) as error:
        config_from_dict({"data": data})
    assert f"data.{language}: '{kind}' is also the suffix of a whole split's file in a corpus folder" in str(
        error.value
    )
    assert config_from_dict({"data": {"source": "hf:x/y", language: kind}})  # a Hub column may be named so


# --------------------------------------------------------------------------------------------- float keys


def _float_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every key of the schema that holds a float (also `float | None`), dotted as params.yaml names it."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        # A list of floats (evaluate.length_penalty_search) is not one key's value: see the next tests.
        options = (
            () if typing.get_origin(annotation) is list else typing.get_args(annotation) or (annotation,)
        )
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _float_keys(annotation, f"{key}.")
        elif float in options:
            keys.append(key)
    return keys


FLOAT_KEYS = _float_keys()


def _first_line(path: Path, name: str) -> int:
    """The number of the first line of `path` that sets a key called `name`."""
    lines = path.read_text().splitlines()
    return next(number for number, text in enumerate(lines, 1) if text.strip().startswith(f"{name}:"))


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def test_the_schema_has_the_float_keys_the_reports_name() -> None:
    for key in (
        "evaluate.length_penalty",
        "evaluate.max_len_ratio",
        "runtime.cpus_per_worker",
        "train.weight_decay",
    ):
        assert key in FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=[".inf", "-.inf", ".nan"])
def test_every_float_key_must_be_finite(tmp_path: Path, key: str, value: float) -> None:
    """`.inf` went into metrics.json as Infinity (and a registered version `translate` then refused), or
    overflowed in a worker; each float key is refused naming its file, line and key."""
    path = write_params(tmp_path, _nested(key, value))
    with pytest.raises(PipelineError) as error:
        load_config(path)
    line = _first_line(path, key.split(".")[-1])
    assert f"{path}:{line}: {key}: Input should be a finite number" in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"evaluate": {"length_penalty_search": [0.6, math.inf]}}, "evaluate.length_penalty_search.1"),
        (
            {"tune": {"search_space": {"train.lr": {"loguniform": [1e-4, math.inf]}}}},
            "tune.search_space.train.lr.loguniform.1",
        ),
        ({"tune": {"search_space": {"model.dropout": {"choice": [0.1, math.nan]}}}}, "tune.search_space"),
    ],
)
def test_lists_and_search_bounds_of_floats_must_be_finite(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(PipelineError, match="finite number") as error:
        config_from_dict(raw)
    assert f"{key}:" in str(error.value)


def test_minutes_between_checkpoints_must_be_finite() -> None:
    with pytest.raises(PipelineError, match="runtime.checkpoint_every"):
        config_from_dict({"runtime": {"checkpoint_every": "9" * 400 + "min"}})


# ------------------------------------------------------------------------------------ values and combinations


@pytest.mark.parametrize("key", ["data.seed", "train.seed", "data.builtin.seed"])
@pytest.mark.parametrize("value", [-1, 2**32, 10**23])
def test_a_seed_is_within_what_numpy_takes(key: str, value: int) -> None:
    with pytest.raises(PipelineError) as error:
        config_from_dict(_nested(key, value))
    assert f"{key}: Input should be " in str(error.value)
    assert config_from_dict(_nested(key, 2**32 - 1))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("team/translator", "cannot contain '/' or ':'"),
        ("translator:v2", "cannot contain '/' or ':'"),
        ("   ", "is blank"),
        ("..", "cannot be '.' or start with '..'"),
    ],
)
def test_a_registered_model_name_follows_mlflows_rules(name: str, reason: str) -> None:
    """Before: an MLflow traceback from the register stage, after the model was logged."""
    with pytest.raises(PipelineError, match=f"register.model_name: .*{reason}"):
        config_from_dict({"register": {"model_name": name}})
    assert config_from_dict({"register": {"model_name": "my translator.v2"}})


def test_a_batch_too_small_for_its_micro_batches_is_refused(tmp_path: Path) -> None:
    """16 tokens cut into 2 x 256 micro-batches: nearly all empty, each still a forward and backward pass,
    so no epoch ended in 7 minutes."""
    path = write_params(tmp_path, {"train": {"batch_size": 16, "accumulate": 256}})
    with pytest.raises(PipelineError) as error:
        load_config(path)
    line = _first_line(path, "batch_size")  # train's: its section comes before evaluate's
    assert str(error.value).splitlines()[1] == (
        f"  {path}:{line}: train.batch_size: must give each of the runtime.num_workers x train.accumulate"
        " = 2 x 256 micro-batches of an update at least 16 target tokens: raise it from 16 to 8192 or more,"
        " or lower train.accumulate (an empty micro-batch still costs a full pass)"
    )
    assert config_from_dict({"train": {"batch_size": 8192, "accumulate": 256}})


def test_averaging_more_epochs_than_are_trained_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"train.average_last: must be at most train.epochs \(5 > 1\)"):
        config_from_dict({"train": {"average_last": 5, "epochs": 1}})
    assert config_from_dict({"train": {"average_last": 2, "epochs": 2}})


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_more_workers_than_cores_on_a_local_ray_is_refused_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance of this test process is checked by what it has")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = (os.cpu_count() or 1) + 1
    write_params(tmp_path, {"runtime": {"num_workers": workers}})
    error = _refused(capsys, stage)
    assert error == (
        f"error: runtime.num_workers x runtime.cpus_per_worker = {workers} x 1 = {workers} CPUs, but this"
        f" machine has {os.cpu_count()} and no Ray cluster is set (RAY_ADDRESS): lower them, or set"
        " RAY_ADDRESS to run on a cluster"
    )
    assert not ray.is_initialized()
    # On a cluster an autoscaler may add the CPUs: not refused (here the missing data is what stops it).
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert "data/processed not found" in _refused(capsys, stage)


def test_a_search_space_of_millions_of_combinations_loads_at_once() -> None:
    """12.8 million combinations: every one was built and validated, so every stage (prepare too) hung
    when params.yaml loaded. Only the keys one rule ties together are combined now."""
    space = {
        "model.emb_dim": {"choice": [32, 64, 96, 128, 160, 192, 224, 256]},
        "model.hidden_dim": {"choice": list(range(32, 32 + 40 * 8, 8))},
        "model.n_layers": {"choice": [1, 2, 3, 4, 5, 6, 7, 8]},
        "model.dropout": {"choice": [i / 100 for i in range(50)]},
        "model.ff_dim": {"choice": list(range(64, 64 + 100 * 8, 8))},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
    }
    assert math.prod(len(dim.get("choice", [0, 0])) for dim in space.values()) == 25_600_000
    start = time.monotonic()
    assert config_from_dict({"tune": {"search_space": space}}).tune.search_space
    assert time.monotonic() - start < 5
    with pytest.raises(PipelineError, match=r"tune.search_space: can draw \{'model.dropout': 1.0\}"):
        config_from_dict({"tune": {"search_space": {**space, "model.dropout": {"choice": [0.1, 0.99, 1.0]}}}})


def test_a_search_over_too_many_coupled_values_is_bounded_with_a_message() -> None:
    space = {
        "model.arch": {"choice": ["gru", "transformer"]},
        "model.emb_dim": {"choice": list(range(8, 8 * 200, 8))},
        "model.n_heads": {"choice": [1, 2, 4, 8] * 10},
    }
    with pytest.raises(PipelineError) as error:
        config_from_dict({"tune": {"search_space": space}})
    assert (
        "tune.search_space: gives 15,920 combinations of model.arch x model.emb_dim x model.n_heads to check,"
        " over 10,000: give fewer choices of these keys"
    ) in str(error.value)


def test_an_exponent_without_a_dot_is_a_number_in_params_and_in_set_params(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads 1e-4 as text; YAML 1.2 (DVC, ruamel) as a number: now a number here too."""
    path = write_params(tmp_path, {})
    config = set_params(path, ["train.lr=1e-4", "train.weight_decay=1e-5"])
    assert (config.train.lr, config.train.weight_decay) == (1e-4, 1e-5)
    written = yaml.safe_load(path.read_text())["train"]  # plain PyYAML reads the file's numbers back too
    assert (written["lr"], written["weight_decay"]) == (1e-4, 1e-5)
    path.write_text(SHIPPED.replace("  lr: 0.003", "  lr: 3e-3").replace("  seed: 0", "  seed: 1e23"))
    with pytest.raises(PipelineError, match=r"train.seed: expected a whole number, got the number 1e\+23"):
        load_config(path)


# --------------------------------------------------------------------------------------------- set-params


def _set_params_refused(capsys: pytest.CaptureFixture[str], params: Path, *assignments: str) -> str:
    return _refused(capsys, "--params", str(params), "set-params", *assignments)


def test_set_params_refuses_a_missing_params_file_instead_of_creating_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a new file holding only the assigned key, exit 0."""
    typo = tmp_path / "parms.yaml"
    assert _set_params_refused(capsys, typo, "train.epochs=3") == f"error: parameters file not found: {typo}"
    no_folder = tmp_path / "nowhere" / "params.yaml"
    assert _set_params_refused(capsys, no_folder, "train.epochs=3") == (
        f"error: parameters file not found: {no_folder} (there is no folder {no_folder.parent})"
    )
    broken = tmp_path / "params.yaml"
    broken.symlink_to("shared/params.yaml")
    assert _set_params_refused(capsys, broken, "train.epochs=3") == (
        "error: parameters file is a broken symlink (to shared/params.yaml, which does not exist),"
        f" not a YAML file: {broken}"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"], "nothing created"
    assert not (tmp_path / "shared").exists()


@pytest.mark.parametrize("option", ["--params", "--recipe"])
def test_a_symlink_loop_is_named_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    """Before: 'not found'."""
    params = write_params(tmp_path, {})
    loop = tmp_path / "loop.yaml"
    loop.symlink_to("loop.yaml")
    what = "parameters file" if option == "--params" else "recipe"
    arguments = ["--params", str(loop)] if option == "--params" else ["--params", str(params)]
    if option == "--recipe":
        arguments += ["set-params", "--recipe", str(loop)]
    else:
        arguments += ["set-params", "train.epochs=3"]
    assert _refused(capsys, *arguments) == f"error: {what} is a symlink loop, not a YAML file: {loop}"
    if option == "--params":
        assert _refused(capsys, "--params", str(loop), "prepare").endswith(
            "is a symlink loop, not a YAML file: " + str(loop)
        )


@pytest.mark.parametrize("assignment", ["data={}", "train={}", "data.builtin={}"])
def test_an_empty_mapping_for_a_section_is_refused_not_erasing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], assignment: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED)
    dotted = assignment.removesuffix("={}")
    assert _set_params_refused(capsys, params, assignment) == (
        f"error: {assignment!r}: an empty mapping for {dotted} would erase the whole section, its keys and"
        f" comments: give the keys to change ({dotted}.KEY=VALUE), or leave {dotted} out"
    )
    assert params.read_text() == SHIPPED


def test_a_recipe_with_an_empty_section_is_refused_naming_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  emb_dim: 64\ntrain: {}\n")
    assert _refused(capsys, "--params", str(params), "set-params", "--recipe", str(recipe)) == (
        f"error: {recipe}:3: an empty mapping for train would erase the whole section, its keys and"
        " comments: give the keys to change (train.KEY=VALUE), or leave train out"
    )
    assert params.read_text() == SHIPPED


def test_an_empty_free_form_mapping_is_still_a_value(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"data": {"split_names": {"validation": "dev"}}})
    assert set_params(path, ["data.split_names={}"]).data.split_names == {}
    assert "data:" in path.read_text() and yaml.safe_load(path.read_text())["data"]["src_lang"] == "en"


def test_set_params_keeps_crlf_line_ends_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    original = codecs.BOM_UTF8 + SHIPPED.replace("\n", "\r\n").encode()
    path.write_bytes(original)
    set_params(path, ["train.epochs=3"])
    expected = original.replace(b"\r\n  epochs: 10\r\n", b"\r\n  epochs: 3\r\n")
    assert expected != original and path.read_bytes() == expected
    path.write_bytes(SHIPPED.encode())  # and a plain file stays plain
    set_params(path, ["train.epochs=3"])
    assert path.read_bytes() == SHIPPED.replace("\n  epochs: 10\n", "\n  epochs: 3\n").encode()


# -------------------------------------------------------------------------------------- JSON and messages


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_best_params_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {})
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/best_params.json").write_text(DEEP)
    assert (
        _refused(capsys, "train") == "error: reports/best_params.json is not usable JSON: nested too deeply"
    )


@pytest.mark.parametrize("option", ["--metadata-json", "--runtime-env-json"])
def test_deeply_nested_submit_json_is_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    assert _refused(capsys, "submit", "--address", "http://127.0.0.1:9", option, deep) == (
        f"error: {option} is not usable JSON: nested too deeply"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"hidden_dim": 3},
            "error: reports/best_params.json: override 'hidden_dim' does not name a section key",
        ),
        (
            {"model.hidden_dim": "wide"},
            "error: invalid parameters in reports/best_params.json:\n"
            "  model.hidden_dim: expected a whole number, got the string 'wide'",
        ),
    ],
)
def test_a_bad_best_params_names_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {})
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/best_params.json").write_text(json.dumps({"overrides": overrides}))
    assert _refused(capsys, "train") == message


def test_a_value_the_message_quotes_is_not_shown_twice() -> None:
    with pytest.raises(PipelineError) as error:
        config_from_dict({"data": {"source": "s3://bucket/corpus"}})
    assert str(error.value).count("s3://bucket/corpus") == 1, str(error.value)


def test_a_character_yaml_does_not_allow_is_one_line_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: PyYAML's two lines ('... position 18'), with no line number, and a raw NUL elsewhere."""
    path = tmp_path / "params.yaml"
    path.write_text('data:\n  source: "a\x00"\n')
    assert _refused(capsys, "--params", str(path), "prepare") == (
        f"error: {path}:2: special characters are not allowed: '\\x00' at character 19"
    )


def test_a_control_character_in_a_key_is_escaped_in_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_params(tmp_path, {})
    before = path.read_bytes()
    error = _set_params_refused(capsys, path, 'data={"tr\\0ain": 1}')
    assert "\x00" not in error and "data.tr\\x00ain: unknown key" in error, error
    assert path.read_bytes() == before
