"""The imports between the project's modules, read with `ast` (nothing is imported or run).

Shared by the DVC deps test (a stage's deps must cover every file its command runs) and the layer test
(imports point down only). Every import that can run counts, also
those inside functions (a lazy import runs when its function does); those under `if TYPE_CHECKING:` never
run and do not count.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(module: str) -> Path | None:
    """`pipeline.a.b` -> pipeline/a/b.py or pipeline/a/b/__init__.py, relative to the repo; None if absent."""
    base = REPO_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO_ROOT)
    return None


def module_name(path: Path) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imported_modules(path: Path) -> frozenset[str]:
    """The project modules `path` imports (`from pipeline.x import y` counts y when y is a module)."""
    tree = ast.parse((REPO_ROOT / path).read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _runnable_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == PACKAGE and module_file(name))
    return frozenset(found)


def _runnable_nodes(tree: ast.AST):
    """ast.walk, minus the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def with_parent_packages(path: Path) -> set[Path]:
    """A module file and the __init__.py of every package above it: importing it runs them all."""
    files = {Path(path)}
    parts = module_name(path).split(".")
    for depth in range(1, len(parts)):
        package_init = module_file(".".join(parts[:depth]))
        if package_init is not None:
            files.add(package_init)
    return files


def import_closure(*roots: Path) -> set[Path]:
    """Every project file that importing `roots` may run."""
    seen: set[Path] = set()
    todo = [file for root in roots for file in with_parent_packages(root)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            todo.extend(with_parent_packages(module_file(module)))
    return seen


def package_files() -> list[Path]:
    return sorted(path.relative_to(REPO_ROOT) for path in (REPO_ROOT / PACKAGE).rglob("*.py"))
