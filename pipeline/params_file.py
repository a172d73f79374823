"""params.yaml and recipes as files: read strictly (each key's line kept for messages), and edited
round-trip by `set-params` (comments and key order stay). The schema they are validated against is
`pipeline.config`.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS_PATH, KeySources, PipelineConfig, config_from_dict
from pipeline.errors import PipelineError


def read_yaml_mapping(path: str | Path, what: str, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, read strictly: a missing, unreadable, non-UTF-8, invalid,
    empty (unless `allow_empty`) or non-mapping file, or a key given twice at any level (PyYAML would keep
    the last copy silently), is a PipelineError naming the file and line."""
    return _read_yaml(path, what, allow_empty)[0]


def _read_yaml(path: str | Path, what: str, allow_empty: bool = False) -> tuple[dict[str, Any], KeySources]:
    """`read_yaml_mapping`, and where each key of the file is."""
    import yaml  # here, not at the top: the network layer imports this module on boxes without PyYAML

    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{what} is a folder, not a YAML file: {path}")
    if path.exists() and not path.is_file():
        raise PipelineError(f"{what} is not a regular file (a FIFO, a device?): {path}")
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise PipelineError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: not UTF-8 (byte {error.start})") from None
    try:
        raw, key_lines = _parse_yaml(text)
    except yaml.YAMLError as error:
        line, problem = _yaml_problem(error)
        where = f"{path}:{line}: " if line else f"{path} is not valid YAML: "
        raise PipelineError(where + problem) from None
    if raw is None and allow_empty:
        return {}, {}
    if raw is None:
        raise PipelineError(
            f"{path} is empty: expected a mapping of sections (see the project's params.yaml)"
        )
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise PipelineError(f"{path}:1: expected a mapping of sections at the top level, got a {kind}")
    return raw, {key: (f"{path}:{line}", leaf) for key, (line, leaf) in key_lines.items()}


def _parse_yaml(text: str) -> tuple[Any, dict[tuple[str, ...], tuple[int, bool]]]:
    """YAML text read strictly (see `read_yaml_mapping`), and the line of each key path (with whether its
    value is a leaf). Raises yaml.YAMLError."""
    loader = _strict_loader()(text)
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    key_lines: dict[tuple[str, ...], tuple[int, bool]] = {}
    _collect_key_lines(node, (), key_lines)
    return raw, key_lines


def _collect_key_lines(
    node: Any, prefix: tuple[str, ...], into: dict[tuple[str, ...], tuple[int, bool]]
) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        children = [(str(key.value), key, value) for key, value in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(index), item, item) for index, item in enumerate(node.value)]
    else:
        return
    for name, marked, value in children:
        path = (*prefix, name)
        leaf = not (isinstance(value, yaml.MappingNode) and value.value)
        into[path] = (marked.start_mark.line + 1, leaf)
        _collect_key_lines(value, path, into)


def _yaml_problem(error: Exception) -> tuple[int | None, str]:
    """A PyYAML error as (1-based line or None, what is wrong)."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        return (mark.line + 1 if mark else None), str(error.problem or error.context)
    return None, str(error)


def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first_line[key]})",
                        key_node.start_mark,
                    )
                first_line[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_config(path: str | Path = DEFAULT_PARAMS_PATH) -> PipelineConfig:
    path = Path(path)
    raw, key_sources = _read_yaml(path, "parameters file")
    return config_from_dict(raw, str(path), [key_sources])


def merge_params(base: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """`base` with `overrides` laid over it, section by section: a nested mapping merges key by key (a
    recipe that sets `data.builtin.seed` keeps `data.builtin.n_pairs`), any other value replaces it.
    Returns a new dict; `base` is left as it was."""
    if not isinstance(overrides, dict):
        raise PipelineError(f"{source}: expected a mapping of sections at the top level")
    merged = copy.deepcopy(base)
    _merge_into(merged, overrides)
    return merged


def assignment_overrides(assignments: list[str]) -> dict[str, Any]:
    """`section.key=value` assignments (values parsed as YAML) as one nested mapping of overrides."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        keys, value = _parse_assignment(assignment)
        _merge_into(overrides, _nested(keys, value))
    return overrides


def _parse_assignment(assignment: str) -> tuple[tuple[str, ...], Any]:
    """One `section.key=value` as its key path and its value, read as YAML the way params.yaml is."""
    import yaml

    dotted, separator, text = assignment.partition("=")
    keys = tuple(dotted.strip().split("."))
    if not separator or not all(keys):
        raise PipelineError(f"expected section.key=value, got {assignment!r}")
    try:
        value, _ = _parse_yaml(text)
    except yaml.YAMLError as error:
        _, problem = _yaml_problem(error)
        raise PipelineError(f"{assignment!r}: the value is not valid YAML: {problem}") from None
    return keys, value


def _nested(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe: parameter overrides in params.yaml's own shape (recipes/*.yaml)."""
    return _read_recipe(path)[0]


def _read_recipe(path: str | Path) -> tuple[dict[str, Any], KeySources]:
    raw, key_sources = _read_yaml(path, "recipe")
    if not raw:
        raise PipelineError(f"{path}: a recipe is a mapping of params.yaml sections")
    return raw, key_sources


def set_params(path: str | Path, assignments: list[str], recipe: str | Path | None = None) -> PipelineConfig:
    """Rewrite params.yaml with a recipe's overrides, then `section.key=value` assignments (values parsed as
    YAML), all validated before the file is touched.

    For machines without git, where `dvc exp run -S` is not available (a Ray job's uploaded copy), and to
    apply a recipe. Like `dvc exp run -S`, it edits the file round-trip: comments and key order stay.
    A symlinked params.yaml is edited where it points, so the link stays a link.
    """
    path = Path(path)
    sources: list[KeySources] = []
    if path.exists():
        sources.append(
            _read_yaml(path, "parameters file")[1]
        )  # strict first: a bad file is named with its line
    overrides: dict[str, Any] = {}
    if recipe is not None:
        overrides, recipe_sources = _read_recipe(recipe)
        sources.append(recipe_sources)
    for assignment in assignments:
        keys, value = _parse_assignment(assignment)
        overrides = merge_params(overrides, _nested(keys, value), assignment)
        sources.append({keys: ("", True)})
    # Replacing the link would leave its target, the file that is versioned or shared, as it was.
    target = Path(os.path.realpath(path))
    document = _round_trip_load(target)
    _merge_into(document, _quoted_where_ambiguous(overrides))
    text = _round_trip_text(document)
    described = " ".join([f"--recipe {recipe}"] * (recipe is not None) + list(assignments))
    # What is validated is the text as the stages will read it back, not the values before writing.
    config = config_from_dict(_parse_yaml(text)[0] or {}, f"{path} with {described}", sources)
    from pipeline.files import atomic_file

    with atomic_file(target) as handle:
        handle.write(text)
    return config


def _quoted_where_ambiguous(value: Any) -> Any:
    """`value` with every string that PyYAML (YAML 1.1, which reads params.yaml) would read back as another
    type if written plain (`no`, `on`, `2:30`) marked to be quoted: ruamel (YAML 1.2) writes those plain."""
    import yaml
    from ruamel.yaml.scalarstring import SingleQuotedScalarString

    if isinstance(value, dict):
        return {key: _quoted_where_ambiguous(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_quoted_where_ambiguous(item) for item in value]
    if isinstance(value, str):
        tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (True, False))
        if tag != "tag:yaml.org,2002:str":
            return SingleQuotedScalarString(value)
    return value


def _round_trip_load(path: Path) -> Any:
    from ruamel.yaml import YAML

    if not path.exists():
        return {}
    # Quotes kept: a value quoted by hand (`src_lang: "no"`) must not come back plain, which reads as false.
    reader = YAML(typ="rt")
    reader.preserve_quotes = True
    return reader.load(path.read_text(encoding="utf-8")) or {}


def _round_trip_text(document: Any) -> str:
    from ruamel.yaml import YAML

    writer = YAML(typ="rt")
    writer.indent(mapping=2, sequence=4, offset=2)
    writer.width = 4096  # never fold a long value onto a second line
    writer.representer.add_representer(  # `null`, as written by hand, not an empty value
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    text = io.StringIO()
    writer.dump(document, text)
    return text.getvalue()


def _merge_into(node: Any, overrides: dict[str, Any]) -> None:
    """`merge_params`, in place, so the file's comments and key order stay where they were."""
    for key, value in overrides.items():
        current = node.get(key)
        if isinstance(value, dict) and value and isinstance(current, dict):
            _merge_into(current, value)
        else:
            node[key] = value
