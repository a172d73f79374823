"""pyproject.toml declares what the package imports, and imports what it declares (or says why not)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.import_graph import REPO_ROOT, package_files

# Declared, never imported by name: run or loaded by something else.
USED_WITHOUT_IMPORT = {
    "dvc": "its CLI runs the stages (dvc.yaml)",
    "optuna": "Ray Tune's OptunaSearch imports it (tune.search_alg: optuna)",
}


def _declared() -> set[str]:
    # The [project] dependencies list, read without tomllib (Python 3.10 has none).
    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    requirements = re.findall(r'^\s*"([^"]+)"', block, flags=re.MULTILINE)
    return {_normal(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in requirements}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level() -> set[str]:
    names = set()
    for path in package_files():
        for node in ast.walk(ast.parse((REPO_ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "pipeline"}


@pytest.mark.slow
def test_every_imported_package_is_declared_and_every_declared_one_is_used() -> None:
    # A module may come from several distributions (mlflow: mlflow and mlflow-skinny): one must be declared.
    providers = {name: {_normal(d) for d in packages_distributions()[name]} for name in _imported_top_level()}
    declared = _declared()
    undeclared = sorted(name for name, dists in providers.items() if not dists & declared)
    assert undeclared == [], "imported but not declared in pyproject.toml"
    used = set().union(*(dists & declared for dists in providers.values()))
    assert declared - used - set(USED_WITHOUT_IMPORT) == set(), "declared but never imported"
