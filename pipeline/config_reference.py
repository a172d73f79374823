"""docs/configuration.md's key tables, rendered from the schema (pipeline/config.py): per section, each key's
type and allowed values, default and description, and the stages that list it in dvc.yaml.

    python -m pipeline.config_reference            # rewrite the tables in docs/configuration.md
    python -m pipeline.config_reference --check    # exit 1 if the page's tables differ from the rendering

The prose around the tables is written by hand: only the text between the two marker lines is rendered.
No stage imports this module, so editing it re-runs nothing.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
PARAMS = ROOT / "params.yaml"
DVC_YAML = ROOT / "dvc.yaml"
COMMAND = "python -m pipeline.config_reference"
BEGIN = f"<!-- Rendered from pipeline/config.py by `{COMMAND}`: edit the descriptions there. -->"
END = "<!-- End of the rendered key tables. -->"
PAGE_WIDTH = 110  # prose lines; a table row is one line, however long
HEADER = ("| key | type | default | listed by | what it does |", "| --- | --- | --- | --- | --- |")


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every key under `model` that holds a value (not a group of keys), dotted, in schema order."""
    for name, field in model.model_fields.items():
        nested = _model(field.annotation)
        if nested is None:
            yield f"{prefix}{name}", field
        else:
            yield from leaf_fields(nested, f"{prefix}{name}.")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _constraint(metadata: list[Any], name: str) -> Any:
    """The bound `name` (ge, lt, max_length, ...) of a field's pydantic constraints, None when unset."""
    return next((getattr(item, name) for item in metadata if getattr(item, name, None) is not None), None)


def _bounds(metadata: list[Any]) -> str:
    """A field's constraints in words: " (1 to 8)", " (above 0, below 0.5)", " (not empty)"."""
    ge, gt, le, lt = (_constraint(metadata, name) for name in ("ge", "gt", "le", "lt"))
    words = []
    if ge is not None and le is not None:
        words.append(f"{_number(ge)} to {_number(le)}")
    else:
        words += [f"at least {_number(ge)}"] if ge is not None else []
        words += [f"above {_number(gt)}"] if gt is not None else []
        words += [f"at most {_number(le)}"] if le is not None else []
        words += [f"below {_number(lt)}"] if lt is not None else []
    if _constraint(metadata, "min_length") == 1:
        words.append("not empty")
    if (max_length := _constraint(metadata, "max_length")) is not None:
        words.append(f"at most {max_length} items")
    return f" ({', '.join(words)})" if words else ""


def _one_of(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def type_text(annotation: Any, metadata: list[Any]) -> str:
    """The values a key takes, in words: "integer (1 to 8)", "`gru`, `gru_attention` or `transformer`"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [type_text(arg, metadata) for arg in args if arg is not type(None)]
        return _one_of(options + (["`null`"] if type(None) in args else []))
    if origin is Literal:
        return _one_of([f"`{value}`" for value in args])
    if annotation is bool:
        return "`true` or `false`"
    words = {int: "integer", float: "number", str: "text"}
    if annotation in words:
        return words[annotation] + _bounds(metadata)
    if origin is list:
        return ("list" if args[0] is Any else f"list of {words[args[0]]}s") + _bounds(metadata)
    if origin is tuple:
        return f"`[low, high]` of {words[args[0]]}s"
    if origin is dict:
        return "mapping"
    raise TypeError(f"no words for the type {annotation!r}")


def yaml_text(value: Any) -> str:
    """A value as params.yaml writes it (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return f"[{', '.join(yaml_text(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_text(item)}" for key, item in value.items()) + "}"
    return str(value)


_MISSING = object()


def _lookup(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def default_text(field: FieldInfo, shipped: Any) -> str:
    """The schema's default, and params.yaml's value where it differs or is absent."""
    default = field.get_default(call_default_factory=True)
    text = f"`{yaml_text(default)}`"
    if shipped is _MISSING:
        return f"{text} (not in params.yaml)"
    if shipped != default:
        value = f"{len(shipped)} entries" if isinstance(shipped, dict) else f"`{yaml_text(shipped)}`"
        return f"{text}; params.yaml: {value}"
    return text


def listed_by(key: str, stages: dict[str, Any]) -> str:
    """The stages whose `params` in dvc.yaml cover `key`: changing it re-runs them."""
    names = [
        name
        for name, stage in stages.items()
        if any(key == listed or key.startswith(f"{listed}.") for listed in stage.get("params", []))
    ]
    return ", ".join(names) or "none"


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=PAGE_WIDTH, break_long_words=False, break_on_hyphens=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _entry_table(key: str, model: type[BaseModel]) -> list[str]:
    """The keys of one entry of a free-form mapping (a `tune.search_space` dimension)."""
    lines = ["", f"The keys of an entry of `{key}`:", ""]
    lines += ["| entry key | type | what it does |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        lines.append(
            _row([f"`{name}`", type_text(field.annotation, field.metadata), field.description or ""])
        )
    return lines


def render_tables(params: dict[str, Any], stages: dict[str, Any]) -> str:
    """The key tables: one per section of params.yaml, its description above it."""
    lines: list[str] = []
    for section, section_field in PipelineConfig.model_fields.items():
        model = _model(section_field.annotation)
        assert model is not None, f"{section} is not a section"
        lines += [f"### `{section}`", "", _paragraph(section_field.description or "")]
        for name, field in model.model_fields.items():
            if _model(field.annotation) is not None:
                lines += ["", _paragraph(f"`{section}.{name}`: {field.description or ''}")]
        lines += ["", *HEADER]
        entries = []
        for key, field in leaf_fields(model, f"{section}."):
            lines.append(
                _row(
                    [
                        f"`{key}`",
                        type_text(field.annotation, field.metadata),
                        default_text(field, _lookup(params, key)),
                        listed_by(key, stages),
                        field.description or "",
                    ]
                )
            )
            value_type = (
                typing.get_args(field.annotation)[1:] if typing.get_origin(field.annotation) is dict else ()
            )
            entries += [(key, value) for value in value_type if _model(value) is not None]
        for key, value in entries:
            lines += _entry_table(key, value)
        lines.append("")
    return "\n".join(lines)


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def render_page(page: str) -> str:
    """`page` with the text between its marker lines replaced by the tables the schema renders."""
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    before, begin, rest = page.partition(BEGIN + "\n")
    _, end, after = rest.partition(END + "\n")
    if not begin or not end:
        raise ValueError(f"{_shown(PAGE)} lacks the marker lines {BEGIN!r} and {END!r}")
    return f"{before}{BEGIN}\n\n{render_tables(params, stages)}\n{END}\n{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the page's tables are not the rendering"
    )
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    rendered = render_page(page)
    if args.check:
        if rendered != page:
            print(f"{_shown(PAGE)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
