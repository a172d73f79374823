"""params.yaml and recipes as files: read strictly (each key's line kept for messages), and edited
round-trip by `set-params` (comments and key order stay). The schema they are validated against is
`pipeline.config`.
"""

from __future__ import annotations

import codecs
import copy
import functools
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import DEFAULT_PARAMS_PATH, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, not_a_regular_file

# Where each key of a config was written: key path -> (location shown before the key, and whether the value
# there is a leaf, i.e. not a mapping another source may merge into). The location is "params.yaml:14", or ""
# for a KEY=VALUE assignment (the message's first line names the assignments).
KeySources = dict[tuple[str, ...], tuple[str, bool]]

# The type a key takes, as YAML writes it, for pydantic's strict type errors.
_EXPECTED = {
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def _yaml_kind(value: Any) -> str:
    """A value as YAML gave it: `the string '64'`, `true`, `null`, `a list`."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"  # a date, bytes from !!binary


def _located(key: tuple[str, ...], sources: list[KeySources]) -> str:
    """Where the value at `key` was written: the last source that set it or a leaf above it."""
    for source in reversed(sources):
        for end in range(len(key), 0, -1):
            found = source.get(key[:end])
            if found is not None and (found[1] or end == len(key)):
                return found[0]
    return ""


def _format_validation_error(error: ValidationError, source: str, sources: list[KeySources]) -> str:
    lines = [f"invalid parameters in {source}:"]
    for problem in error.errors():
        loc = tuple(str(part) for part in problem["loc"])
        key = ".".join(loc) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        # A rule over several keys names its key first ("tune.search_space can draw ...", "train.average_last
        # must be ..."): show it as the key, so that its own line is found.
        named, _, rest = message.partition(" ")
        under_loc = named.startswith(key + ".") and not rest.startswith("(")
        if "." in named and rest and (not loc or under_loc):
            key, message = named, rest
            loc = tuple(named.split("."))
        value = problem.get("input")
        if problem["type"] in _EXPECTED:
            shown = f", got {_yaml_kind(value)}"
            if problem["type"] == "string_type" and isinstance(value, bool | int | float):
                shown += " (quote the value to keep it as text)"
            message = f"expected {_EXPECTED[problem['type']]}"
        elif problem["type"] != "extra_forbidden" and not isinstance(value, dict):
            quoted = isinstance(value, str) and repr(value) in message  # the message quotes it itself
            shown = "" if quoted else f" (got {value!r})"
        else:
            shown = ""
        where = _located(loc, sources)
        lines.append(f"  {where + ': ' if where else ''}{key}: {message}{shown}")
    return "\n".join(lines)


def config_from_dict(
    raw: dict[str, Any], source: str = "params", sources: list[KeySources] | None = None
) -> PipelineConfig:
    """`raw` validated strictly; `sources` (first to last applied) give each key's file and line."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_format_validation_error(error, source, sources or [])) from None


def with_overrides(
    config: PipelineConfig, overrides: dict[str, Any], source: str = "overrides"
) -> PipelineConfig:
    """Apply dotted-key overrides (e.g. the best Tune trial's {"model.hidden_dim": 256}) and re-validate;
    `source` names where they come from (a file) in messages."""
    raw = config.model_dump(mode="python")
    for dotted_key, value in overrides.items():
        section, _, key = dotted_key.partition(".")
        if section not in raw or not key:
            raise PipelineError(f"{source}: override {dotted_key!r} does not name a section key")
        raw[section][key] = value
    return config_from_dict(raw, source)


def read_yaml_mapping(path: str | Path, what: str, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, read strictly: a missing, unreadable, non-UTF-8, invalid,
    empty (unless `allow_empty`) or non-mapping file, or a key given twice at any level (PyYAML would keep
    the last copy silently), is a PipelineError naming the file and line."""
    return _read_yaml(path, what, allow_empty)[0]


def _read_yaml(path: str | Path, what: str, allow_empty: bool = False) -> tuple[dict[str, Any], KeySources]:
    """`read_yaml_mapping`, and where each key of the file is."""
    path = Path(path)
    _check_readable(path, what)
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
        line, problem = _yaml_problem(error, text)
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


def _check_readable(path: Path, what: str) -> None:
    """A PipelineError saying what `path` is when it is not a file to read: missing (and whether its folder
    is), a broken symlink, a symlink loop, a folder, a FIFO or a device."""
    if not os.path.lexists(path):
        folder = path.parent
        missing_folder = f" (there is no folder {folder})" if not folder.is_dir() else ""
        raise PipelineError(f"{what} not found: {path}{missing_folder}")
    kind = not_a_regular_file(path)
    if kind == "a broken symlink":
        kind += f" (to {os.readlink(path)}, which does not exist)"
    if kind is not None:
        raise PipelineError(f"{what} is {kind}, not a YAML file: {path}")


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


def _yaml_problem(error: Exception, text: str = "") -> tuple[int | None, str]:
    """A PyYAML error as (1-based line or None, what is wrong, on one line)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        return (mark.line + 1 if mark else None), str(error.problem or error.context)
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, a control code)
        character = chr(error.character) if isinstance(error.character, int) else str(error.character)
        line = text[: error.position].count("\n") + 1 if text else None
        return line, f"{error.reason}: {character!r} at character {error.position + 1}"
    return None, " ".join(str(error).split())


# YAML 1.2 numbers that PyYAML's YAML 1.1 rules read as text: an exponent without a dot or without a sign
# (1e-4, 1.0e5). DVC and ruamel (YAML 1.2) read them as numbers; so does this project, one reading for all.
_YAML_12_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"


@functools.cache
def _resolving(base: type) -> type:
    """`base` (a PyYAML loader or resolver class) that also reads YAML 1.2's exponent floats as numbers."""

    class Resolving(base):
        pass

    float_tag, first_characters = "tag:yaml.org,2002:float", list("-+0123456789.")
    Resolving.add_implicit_resolver(float_tag, re.compile(_YAML_12_FLOAT), first_characters)
    return Resolving


def _strict_loader() -> type:
    class StrictLoader(_resolving(yaml.SafeLoader)):
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
    dotted, separator, text = assignment.partition("=")
    keys = tuple(dotted.strip().split("."))
    if assignment.startswith("-"):
        raise PipelineError(
            f"expected section.key=value, got {assignment!r}, an option: set-params and PIPELINE_SET take"
            " assignments only"
        )
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


# set-params' hook, given the validated config and the overrides asked for: overrides to lay over them before
# the file is written (the CLI pins a registry alias in train.init_from to its version this way).
Pin = Callable[[PipelineConfig, dict[str, Any]], dict[str, Any]]


def set_params(
    path: str | Path, assignments: list[str], recipe: str | Path | None = None, pin: Pin | None = None
) -> PipelineConfig:
    """Rewrite params.yaml with a recipe's overrides, then `section.key=value` assignments (values parsed as
    YAML), then what `pin` adds, all validated before the file is touched.

    For machines without git, where `dvc exp run -S` is not available (a Ray job's uploaded copy), and to
    apply a recipe. Like `dvc exp run -S`, it edits the file round-trip: comments and key order stay.
    A symlinked params.yaml is edited where it points, so the link stays a link.
    """
    path = Path(path)
    # Strict first: a bad file is named with its line. A missing one is refused, not created: it would
    # hold the assigned keys alone, and a typo in --params would go unnoticed.
    sources: list[KeySources] = [_read_yaml(path, "parameters file")[1]]
    overrides: dict[str, Any] = {}
    if recipe is not None:
        overrides, recipe_sources = _read_recipe(recipe)
        if emptied := next(_emptied_sections(overrides), None):
            raise _emptied_section_error(recipe_sources[emptied][0], emptied)
        sources.append(recipe_sources)
    for assignment in assignments:
        keys, value = _parse_assignment(assignment)
        if emptied := next(_emptied_sections(_nested(keys, value)), None):
            raise _emptied_section_error(repr(assignment), emptied)
        overrides = merge_params(overrides, _nested(keys, value), assignment)
        sources.append({keys: ("", True)})
    # Replacing the link would leave its target, the file that is versioned or shared, as it was.
    target = Path(os.path.realpath(path))
    raw = target.read_bytes()
    layout = _TextLayout.of(raw)
    document = _round_trip_load(layout.text(raw))
    _merge_into(document, _quoted_where_ambiguous(overrides))
    text = _round_trip_text(document)
    described = " ".join([f"--recipe {recipe}"] * (recipe is not None) + list(assignments))
    # What is validated is the text as the stages will read it back, not the values before writing.
    config = config_from_dict(_parse_yaml(text)[0] or {}, f"{path} with {described}", sources)
    pinned = pin(config, overrides) if pin is not None else {}
    if pinned:
        _merge_into(document, _quoted_where_ambiguous(pinned))
        text = _round_trip_text(document)
        config = config_from_dict(_parse_yaml(text)[0] or {}, f"{path} with {described}", sources)
    with atomic_file(target, "wb") as handle:
        handle.write(layout.encode(text))
    return config


@dataclass(frozen=True)
class _TextLayout:
    """How a file's text is laid out in bytes: a leading byte-order mark, CRLF line ends. `set-params`
    writes the file back the way it was (an editor on Windows wrote it so), not as ruamel writes."""

    bom: bool
    crlf: bool

    @classmethod
    def of(cls, raw: bytes) -> _TextLayout:
        first_end = raw.find(b"\n")
        return cls(raw.startswith(codecs.BOM_UTF8), first_end > 0 and raw[first_end - 1 : first_end] == b"\r")

    def text(self, raw: bytes) -> str:
        """The text with LF line ends and no mark, as the YAML libraries take it."""
        text = raw.decode("utf-8").removeprefix("\ufeff")
        return text.replace("\r\n", "\n") if self.crlf else text

    def encode(self, text: str) -> bytes:
        return (("\ufeff" if self.bom else "") + (text.replace("\n", "\r\n") if self.crlf else text)).encode()


def _emptied_sections(overrides: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The key paths in `overrides` that give an empty mapping for a section of the schema (`train: {}`,
    `data.builtin={}`): merged, it would replace the section's keys, and its comments, with nothing. An
    empty free-form mapping (`data.split_names: {}`) is a value like any other."""
    for key, value in overrides.items():
        keys = (*prefix, str(key))
        if isinstance(value, dict) and not value and _names_a_section(keys):
            yield keys
        elif isinstance(value, dict):
            yield from _emptied_sections(value, keys)


def _names_a_section(keys: tuple[str, ...]) -> bool:
    """Whether `keys` name a section of the schema, or a group of keys inside one (data.builtin)."""
    model: type[BaseModel] = PipelineConfig
    for key in keys:
        field = model.model_fields.get(key)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return True


def _emptied_section_error(where: str, keys: tuple[str, ...]) -> PipelineError:
    dotted = ".".join(keys)
    return PipelineError(
        f"{where}: an empty mapping for {dotted} would erase the whole section, its keys and comments: give"
        f" the keys to change ({dotted}.KEY=VALUE), or leave {dotted} out"
    )


def _quoted_where_ambiguous(value: Any) -> Any:
    """`value` with every string that this module's loader (PyYAML's YAML 1.1, with YAML 1.2's exponents)
    would read back as another type if written plain (`no`, `on`, `2:30`) marked to be quoted: ruamel
    (YAML 1.2) writes those plain."""
    from ruamel.yaml.scalarstring import SingleQuotedScalarString  # see _round_trip_load

    if isinstance(value, dict):
        return {key: _quoted_where_ambiguous(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_quoted_where_ambiguous(item) for item in value]
    if isinstance(value, str):
        tag = _resolving(yaml.resolver.Resolver)().resolve(yaml.ScalarNode, value, (True, False))
        if tag != "tag:yaml.org,2002:str":
            return SingleQuotedScalarString(value)
    return value


def _round_trip_load(text: str) -> Any:
    # ruamel.yaml only where set-params writes: the stages and benchmarks/gpu_torch.py (on a torch-only box)
    # import this module to read, with PyYAML.
    from ruamel.yaml import YAML

    # Quotes kept: a value quoted by hand (`src_lang: "no"`) must not come back plain, which reads as false.
    reader = YAML(typ="rt")
    reader.preserve_quotes = True
    return reader.load(text) or {}


def _round_trip_text(document: Any) -> str:
    from ruamel.yaml import YAML

    writer = YAML(typ="rt")
    writer.indent(mapping=2, sequence=4, offset=2)
    writer.width = 4096  # never fold a long value onto a second line
    writer.representer.add_representer(  # `null`, as written by hand, not an empty value
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    writer.representer.add_representer(float, _represent_float)
    text = io.StringIO()
    writer.dump(document, text)
    return text.getvalue()


def _represent_float(representer: Any, value: float) -> Any:
    """A float as PyYAML writes it (`1.0e-05`, not ruamel's `1e-05`), so that a YAML 1.1 reader of the file
    (PyYAML, as in many scripts) reads a number back too. A float already in the file keeps its spelling."""
    node = yaml.SafeDumper(io.StringIO()).represent_float(value)
    return representer.represent_scalar("tag:yaml.org,2002:float", node.value)


def _merge_into(node: Any, overrides: dict[str, Any]) -> None:
    """`merge_params`, in place, so the file's comments and key order stay where they were."""
    for key, value in overrides.items():
        current = node.get(key)
        if isinstance(value, dict) and value and isinstance(current, dict):
            _merge_into(current, value)
        else:
            node[key] = value
