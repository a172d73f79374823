"""Config values are checked, never converted: a YAML bool is a bool, a YAML int an int (a float key also
takes a whole number), and anything else is one message naming the key, its file and line, and the type the
key takes. The same wherever a user writes config: params.yaml, a recipe, set-params, PIPELINE_SET."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel

from pipeline.__main__ import main
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict, load_config, set_params, with_overrides
from tests.helpers import REPO_ROOT

SHIPPED = (REPO_ROOT / "params.yaml").read_text()

# One value of each YAML type, by the name of that type.
YAML_VALUES: dict[str, Any] = {
    "bool": True,
    "int": 7,
    "float": 2.5,
    "string": "x",
    "list": [1],
    "mapping": {"a": 1},
    "null": None,
}
# A key a mapping of free-form keys accepts, for walking into its values.
SAMPLE_KEYS = {"tune.search_space": "model.dropout"}


def _accepted(annotation: Any) -> set[str]:
    """The YAML types a field of this annotation takes."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_accepted(arg) for arg in typing.get_args(annotation)))
    if annotation is type(None):
        return {"null"}
    if annotation is Any:
        return set(YAML_VALUES)
    if origin is Literal:
        return {"string"}
    if origin in (dict, list, tuple):
        return {"mapping"} if origin is dict else {"list"}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"mapping"}
    return {bool: {"bool"}, int: {"int"}, float: {"int", "float"}, str: {"string"}}[annotation]


def _typed_keys(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], set[str]]]:
    """Every key of the schema, nested ones included, with the YAML types it takes."""
    keys = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        keys.append((path, _accepted(field.annotation)))
        union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        for inner in typing.get_args(field.annotation) if union else (field.annotation,):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys.extend(_typed_keys(inner, path))
            elif typing.get_origin(inner) is dict:
                key_type, value_type = typing.get_args(inner)
                key = SAMPLE_KEYS.get(".".join(path)) or typing.get_args(key_type)[0]
                keys.append(((*path, key), _accepted(value_type)))
                if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                    keys.extend(_typed_keys(value_type, (*path, key)))
    return keys


TYPED_KEYS = _typed_keys(PipelineConfig)


def test_the_walk_reaches_every_section_and_nested_key() -> None:
    dotted = {".".join(path) for path, _ in TYPED_KEYS}
    assert {
        "data.builtin.n_pairs",
        "data.split_names.train",
        "runtime.use_gpu",
        "runtime.checkpoint_every",
    } <= dotted
    assert "tune.search_space.model.dropout.uniform" in dotted and "register.model_name" in dotted
    assert len(dotted) > 70


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


@pytest.mark.parametrize(("path", "accepted"), TYPED_KEYS, ids=[".".join(path) for path, _ in TYPED_KEYS])
def test_every_key_refuses_every_wrong_yaml_type_naming_key_line_and_type(
    tmp_path: Path, path: tuple[str, ...], accepted: set[str]
) -> None:
    params = tmp_path / "params.yaml"
    key = ".".join(path)
    for kind, value in YAML_VALUES.items():
        if kind in accepted:
            continue
        params.write_text(yaml.safe_dump(_nested(path, value)))
        line = len(path)  # safe_dump writes one key per line, the deepest last
        with pytest.raises(PipelineError) as refused:
            load_config(params)
        message = str(refused.value)
        assert f"{params}:{line}: {key}: " in message, f"{kind}: {message}"
        assert message.count("\n") == 1, f"{kind}: one problem, one line: {message}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('  use_gpu: "yes"', "runtime.use_gpu: expected true or false, got the string 'yes'"),
        ("  use_gpu: 1", "runtime.use_gpu: expected true or false, got the number 1"),
        ('  max_tokens: "64"', "data.max_tokens: expected a whole number, got the string '64'"),
        ("  max_tokens: true", "data.max_tokens: expected a whole number, got true"),
        ("  max_tokens: 64.0", "data.max_tokens: expected a whole number, got the number 64.0"),
        ('  lr: "0.003"', "train.lr: expected a number, got the string '0.003'"),
        ("  lr: true", "train.lr: expected a number, got true"),
        (
            "  src_lang: no",
            "data.src_lang: expected a string, got false (quote the value to keep it as text)",
        ),
    ],
)
def test_a_stage_refuses_a_value_of_the_wrong_type_before_any_work(
    tmp_path: Path,
    line: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = line.split(":")[0]
    lines = SHIPPED.splitlines()
    section = {"use_gpu": "runtime:", "lr": "train:"}.get(name.strip(), "data:")
    start = next(i for i, text in enumerate(lines) if text.startswith(section))
    number = next(i for i in range(start, len(lines)) if lines[i].startswith(name + ":"))
    lines[number] = line
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: invalid parameters in params.yaml:\n"), error
    assert error.count("\n") == 2, error
    assert f"  params.yaml:{number + 1}: {message}\n" in error
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_a_float_key_takes_a_whole_number_and_the_shipped_files_load() -> None:
    config = config_from_dict(
        {"model": {"dropout": 0}, "runtime": {"cpus_per_worker": 2}, "train": {"lr": 1}}
    )
    assert (config.model.dropout, config.runtime.cpus_per_worker, config.train.lr) == (0.0, 2.0, 1.0)
    assert isinstance(config.model.dropout, float)
    assert load_config(REPO_ROOT / "params.yaml").runtime.cpus_per_worker == 1.0
    space = load_config(REPO_ROOT / "params.yaml").tune.search_space
    assert space["model.dropout"].uniform == (0.0, 0.3) and space["model.n_layers"].randint == (1, 2)


@pytest.mark.parametrize(
    ("dimension", "message"),
    [
        ({"model.emb_dim": {"uniform": [64, 128]}}, "can draw {'model.emb_dim': 64.0}"),
        ({"model.emb_dim": {"choice": ["64", 128]}}, "can draw {'model.emb_dim': '64'}"),
        (
            {"model.dropout": {"uniform": ["0", 0.3]}},
            "tune.search_space.model.dropout.uniform.0: expected a number",
        ),
        (
            {"model.n_layers": {"randint": [1.0, 2]}},
            "tune.search_space.model.n_layers.randint.0: expected a whole",
        ),
    ],
)
def test_a_search_space_draws_values_of_the_key_type(dimension: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=re.escape(message)):
        config_from_dict({"tune": {"search_space": dimension}})


def test_search_draws_and_tuned_values_still_apply() -> None:
    """What Tune draws (Python ints and floats) and best_params.json (JSON numbers) cross strict checks."""
    config = load_config(REPO_ROOT / "params.yaml")
    tuned = with_overrides(config, {"model.dropout": 0, "model.n_layers": 2, "train.lr": 0.01})
    assert (tuned.model.dropout, tuned.model.n_layers, tuned.train.lr) == (0.0, 2, 0.01)
    assert with_overrides(tuned, {}) == tuned, "a dumped config validates as it is"
    with pytest.raises(PipelineError, match=r"model\.n_layers: expected a whole number, got the string '2'"):
        with_overrides(config, {"model.n_layers": "2"})


def test_a_recipe_value_of_the_wrong_type_names_the_recipe_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('# a recipe\nmodel:\n  arch: transformer\n  emb_dim: "64"\n')
    with pytest.raises(PipelineError) as refused:
        set_params(params, [], recipe)
    assert f"  {recipe}:4: model.emb_dim: expected a whole number, got the string '64'" in str(refused.value)
    assert params.read_text() == SHIPPED


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ('runtime.use_gpu="yes"', "runtime.use_gpu: expected true or false, got the string 'yes'"),
        ("runtime.use_gpu=1", "runtime.use_gpu: expected true or false, got the number 1"),
        ('data.max_tokens="64"', "data.max_tokens: expected a whole number, got the string '64'"),
        ("data.max_tokens=true", "data.max_tokens: expected a whole number, got true"),
        ("data.builtin=5", "data.builtin: expected a mapping, got the number 5"),
    ],
)
def test_set_params_refuses_a_value_of_the_wrong_type_and_writes_nothing(
    tmp_path: Path, assignment: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED)
    assert main(["--params", str(params), "set-params", assignment]) == 2
    error = capsys.readouterr().err
    assert error == f"error: invalid parameters in {params} with {assignment}:\n  {message}\n"
    assert params.read_bytes() == SHIPPED.encode()


def test_set_params_names_the_params_line_of_a_bad_value_it_did_not_set(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED.replace("  max_tokens: 64\n", '  max_tokens: "64"\n'))
    before = params.read_bytes()
    line = SHIPPED[: SHIPPED.index("  max_tokens: 64")].count("\n") + 1
    with pytest.raises(PipelineError, match=rf"{re.escape(str(params))}:{line}: data\.max_tokens: expected"):
        set_params(params, ["train.epochs=3"])
    assert params.read_bytes() == before


def test_set_params_writes_a_string_so_that_it_reads_back_as_a_string(tmp_path: Path) -> None:
    """PyYAML (which reads params.yaml) takes a plain `no`, `on` or `2:30` for a bool or a number."""
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED.replace("  src_lang: en", '  src_lang: "no"'))
    config = set_params(params, ["data.tgt_lang='on'", "tracking.experiment='2:30'"])
    assert (config.data.src_lang, config.data.tgt_lang, config.tracking.experiment) == ("no", "on", "2:30")
    reread = load_config(params)
    assert (reread.data.src_lang, reread.data.tgt_lang, reread.tracking.experiment) == ("no", "on", "2:30")
