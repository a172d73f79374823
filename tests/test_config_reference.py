"""The schema is the one reference of params.yaml's keys: every key has a description, reaches the code under
its own name, and docs/configuration.md's key tables are what pipeline/config_reference.py renders from it;
params.yaml's comments give a choice key's values as the schema has them."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline import config_reference
from pipeline.config import PipelineConfig, RegisterConfig
from tests.helpers import REPO_ROOT

REGENERATE = f"{config_reference.PAGE.relative_to(REPO_ROOT)} is out of date: run {config_reference.COMMAND}"


def schema_models(model: type[BaseModel] = PipelineConfig) -> Iterator[type[BaseModel]]:
    """`model` and every model its fields hold, also as a mapping's values (a search-space dimension)."""
    yield model
    for field in model.model_fields.values():
        for inner in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from schema_models(inner)


def test_the_configuration_page_is_what_the_schema_renders() -> None:
    page = config_reference.PAGE.read_text(encoding="utf-8")
    assert page == config_reference.render_page(page), REGENERATE


def test_the_check_fails_on_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "configuration.md"
    page = config_reference.PAGE.read_text(encoding="utf-8")
    stale.write_text(page.replace("Seed of the built-in corpus generator.", "A seed."), encoding="utf-8")
    monkeypatch.setattr(config_reference, "PAGE", stale)
    assert config_reference.main(["--check"]) == 1
    assert config_reference.main([]) == 0 and stale.read_text(encoding="utf-8") == page
    assert config_reference.main(["--check"]) == 0


def test_the_prose_around_the_tables_is_kept() -> None:
    page = (
        "# Title\n\nprose\n\n" + config_reference.BEGIN + "\nold\n" + config_reference.END + "\nmore prose\n"
    )
    rendered = config_reference.render_page(page)
    assert rendered.startswith("# Title\n\nprose\n\n" + config_reference.BEGIN + "\n")
    assert rendered.endswith(config_reference.END + "\nmore prose\n") and "\nold\n" not in rendered
    with pytest.raises(ValueError, match="marker lines"):
        config_reference.render_page("# no markers\n")


@pytest.mark.parametrize("model", sorted(set(schema_models()), key=lambda model: model.__name__))
def test_every_key_has_a_description(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, (
        f"{model.__name__}: give these fields a description= (their reference text): {missing}"
    )


def test_every_key_is_an_attribute_of_its_own_name() -> None:
    aliased = [
        f"{model.__name__}.{name} (alias {field.alias})"
        for model in schema_models()
        for name, field in model.model_fields.items()
        if field.alias is not None
    ]
    assert not aliased, f"a key reaches the code under another name: {aliased}"
    config = PipelineConfig.model_validate({"register": {"min_improvement": 0.5}})
    assert isinstance(config.register, RegisterConfig) and config.register.min_improvement == 0.5


def test_the_types_are_put_in_words() -> None:
    text = {
        key: config_reference.type_text(field.annotation, field.metadata)
        for key, field in config_reference.leaf_fields(PipelineConfig)
    }
    assert text["model.arch"] == "`gru`, `gru_attention` or `transformer`"
    assert text["data.builtin.n_pairs"] == "integer (10 to 5,000,000)"
    assert text["data.validation_fraction"] == "number (above 0, below 0.5)"
    assert text["data.max_examples"] == "integer (at least 1) or `null`"
    assert text["evaluate.length_penalty_search"] == "list of numbers (at most 16 items)"


def _shipped_comments() -> dict[str, str]:
    """params.yaml's section keys (dotted) with the comment on their line."""
    comments, section = {}, ""
    for line in (REPO_ROOT / "params.yaml").read_text(encoding="utf-8").splitlines():
        top = re.match(r"([a-z_]+):", line)
        section = top[1] if top else section
        key = re.match(r"  ([a-z_]+):[^#]*#\s*(.*)", line)
        if key:
            comments[f"{section}.{key[1]}"] = key[2]
    return comments


def test_params_yaml_gives_each_choice_key_the_values_the_schema_allows() -> None:
    comments = _shipped_comments()
    choices = {
        key: " | ".join(typing.get_args(field.annotation))
        for key, field in config_reference.leaf_fields(PipelineConfig)
        if typing.get_origin(field.annotation) is typing.Literal
    }
    assert {"model.arch", "train.precision", "evaluate.device"} <= choices.keys()
    wrong = {
        key: (comments.get(key), values) for key, values in choices.items() if comments.get(key) != values
    }
    assert not wrong, f"params.yaml's comment (left) is not the schema's choice (right): {wrong}"
