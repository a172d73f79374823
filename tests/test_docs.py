"""The documentation stays true to the code: every params.yaml key on the configuration page and no key
the schema lacks, every docs page reachable from the README, links that resolve, a short README, and no
words about how the project was made (issue numbers, targets, which machines were at someone's disposal)."""

from __future__ import annotations

import ast
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION_PAGE = DOCS / "configuration.md"
README_MAX_LINES = 250

# Keys whose values are free-form mappings: documented as one key each.
FREE_FORM_KEYS = {"data.split_names", "tune.search_space"}

DOTTED_KEY = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)


def _model_class(annotation: object) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (also inside `X | None`), else None."""
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> set[str]:
    """Every leaf key of the schema, dotted (a field's name is its key in params.yaml)."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _model_class(field.annotation)
        if nested is not None and key not in FREE_FORM_KEYS:
            keys |= schema_keys(nested, f"{key}.")
        else:
            keys.add(key)
    return keys


def params_keys(node: object = None, prefix: str = "") -> set[str]:
    """Every leaf key of params.yaml, dotted."""
    if node is None and not prefix:
        node = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    keys: set[str] = set()
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in FREE_FORM_KEYS:
            keys |= params_keys(value, f"{key}.")
        else:
            keys.add(key)
    return keys


def documented_keys() -> list[str]:
    """The dotted keys in the first column of the configuration page's tables, in page order."""
    keys = []
    for line in CONFIGURATION_PAGE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        first_cell = line.strip("|").split("|")[0].strip().strip("`").strip()
        if DOTTED_KEY.fullmatch(first_cell):
            keys.append(first_cell)
    return keys


def without_code(text: str) -> str:
    """Markdown without its fenced code blocks (their `#` lines are no headings, their brackets no links)."""
    return FENCE.sub("", text)


def links(path: Path) -> list[str]:
    return LINK.findall(without_code(path.read_text(encoding="utf-8")))


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in without_code(path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def docs_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_the_schema_walk_finds_nested_keys() -> None:
    keys = schema_keys()
    assert {"data.builtin.n_pairs", "data.revision", "register.model_name", "tune.search_space"} <= keys
    assert "data.builtin" not in keys
    assert params_keys() <= keys, "params.yaml has keys the schema lacks: it would not load"


def test_every_params_key_is_on_the_configuration_page() -> None:
    missing = sorted((params_keys() | schema_keys()) - set(documented_keys()))
    assert not missing, f"{CONFIGURATION_PAGE.relative_to(ROOT)} does not document {missing}"


def test_the_configuration_page_names_only_keys_the_schema_has() -> None:
    documented = documented_keys()
    unknown = sorted(set(documented) - schema_keys())
    assert not unknown, f"{CONFIGURATION_PAGE.relative_to(ROOT)} names keys that do not exist: {unknown}"
    twice = sorted({key for key in documented if documented.count(key) > 1})
    assert not twice, f"{CONFIGURATION_PAGE.relative_to(ROOT)} has a row twice for {twice}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / link.split("#")[0]).resolve() for link in links(README) if not link.startswith("#")}
    pages = docs_pages()
    assert pages, "no docs/*.md pages"
    unlinked = [page.relative_to(ROOT).as_posix() for page in pages if page.resolve() not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


def test_the_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail to docs/"
    )


LINKING_PAGES = [README, ROOT / "cluster" / "README.md", ROOT / "corpus" / "README.md", *docs_pages()]


@pytest.mark.parametrize("page", LINKING_PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for link in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


# Words about how the project was made, not what it does. Precise enough to leave "target language",
# "target tokens" and "a link's target" alone.
HISTORY = [
    re.compile(r"\b(?:issue|pull request)\s*#?\d+", re.IGNORECASE),
    re.compile(r"(?<![\w/&#])#\d+\b"),
    re.compile(r"\btargets?\s+(?:(?:is|are|was|were)\s+)?(?:not\s+)?(?:met|missed|reached)\b", re.IGNORECASE),
    re.compile(r"\b(?:not|all|targets?)\s+met\b", re.IGNORECASE),
    re.compile(r"(?:^|[.;(]\s*)Targets?:\s"),  # "Targets: ... all met", not a `target: Path` argument
    re.compile(r"\bwas the aim\b|\bnot reached\b", re.IGNORECASE),
    re.compile(r"\blent\b", re.IGNORECASE),
    re.compile(r"\bat hand\b", re.IGNORECASE),
    re.compile(r"\btransfer limit\b", re.IGNORECASE),
    re.compile(r"\bnot run (?:yet|here)\b", re.IGNORECASE),
    re.compile(r"\b(?:earlier|this|that|last|the previous) session\b", re.IGNORECASE),
    re.compile(r"\bbefore the restructuring\b", re.IGNORECASE),
]


def history_files() -> list[Path]:
    return [README, *docs_pages(), *sorted((ROOT / "recipes").glob("*.yaml")), ROOT / "cluster" / "README.md"]


@pytest.mark.parametrize("path", history_files(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_words_about_how_the_project_was_made(path: Path) -> None:
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        for pattern in HISTORY:
            match = pattern.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match[0]!r} in {line.strip()[:120]!r}")
    assert not found, "state what the software does, not how it was made:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "as issue 11 says",
        "see #12 for details",
        "the 37-in-an-hour target is not met",
        "Not met: at equal parameter count",
        "Targets: time ratio at most 11",
        "(30 % was the aim; not reached)",
        "the GPU machine lent here has no Ray",
        "no GPU was at hand",
        "its wheel does not fit the transfer limit",
        "in an earlier session on a machine of the same kind",
    ],
)
def test_the_history_patterns_catch_history(text: str) -> None:
    assert any(pattern.search(text) for pattern in HISTORY)


@pytest.mark.parametrize(
    "text",
    [
        "an invented target language (`art`)",
        "4,800 target tokens/s",
        "the link's target is rewritten",
        "output projection = target embedding matrix",
        "[cluster/README.md](../cluster/README.md#3-what-must-be-shared)",
        "AWS_SESSION_TOKEN",
        "a silent failure",
        "def write_json(target: Path, payload: Any) -> None:",
    ],
)
def test_the_history_patterns_leave_reference_text_alone(text: str) -> None:
    assert not any(pattern.search(text) for pattern in HISTORY)


def _marked_slow(decorators: list[ast.expr]) -> bool:
    return any(ast.unparse(decorator).endswith("mark.slow") for decorator in decorators)


def slow_tests() -> set[str]:
    """`file::test` for every slow test, read from the sources: a test marked slow itself or by its
    module's `pytestmark`."""
    found = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_slow = any(
            isinstance(node, ast.Assign)
            and any(isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets)
            and "mark.slow" in ast.unparse(node.value)
            for node in tree.body
        )
        for node in tree.body:
            is_test = isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
            if is_test and (module_slow or _marked_slow(node.decorator_list)):
                found.add(f"{path.name}::{node.name}")
    return found


def test_development_page_says_what_each_slow_test_proves() -> None:
    """Slow tests are the ones merged or dropped to keep the suite fast: the list on development.md is
    what keeps a behaviour from losing its test unnoticed."""
    page = (DOCS / "development.md").read_text(encoding="utf-8")
    section = page.split("### What each slow test proves", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(test_\w+\.py::test_\w+)`", section))
    assert slow_tests() - listed == set(), "slow tests missing from docs/development.md"
    assert listed - slow_tests() == set(), "docs/development.md lists tests that are gone or not slow"
