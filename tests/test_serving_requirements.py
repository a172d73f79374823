"""The registered model's pinned requirements cover what loading it imports (the `pipeline`
package's own imports; what MLflow or torch import is theirs to declare): a server builds its
environment from those pins alone (`mlflow models serve` without `--env-manager local`), and a module the
loaded model imports from a distribution outside them fails there, not here."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from pipeline.tracking.candidate import SERVING_DISTRIBUTIONS
from tests.helpers import REPO_ROOT

# What MLflow runs when it loads the model: the pyfunc file, then its load_context's imports.
LOAD_THE_MODEL = """
import json, sys
import pipeline.tracking.pyfunc_model
from pipeline.network.translator import InputBounds, Translator
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "pipeline")))
"""


def _module_level_imports(path: str) -> set[str]:
    """The top-level names a module imports when it loads (imports inside functions run later, if ever)."""
    names: set[str] = set()
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _with_dependencies(distributions: set[str]) -> set[str]:
    """The distributions and everything they require (extras and environment markers left out)."""
    import importlib.metadata as metadata

    closure, todo = set(), list(distributions)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r and "extra==" not in r]
    return closure


def test_loading_the_served_model_imports_only_the_pinned_distributions_and_theirs() -> None:
    import importlib.metadata as metadata

    result = subprocess.run(
        [sys.executable, "-c", LOAD_THE_MODEL], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    files = json.loads(result.stdout.splitlines()[-1])
    modules = set().union(*(_module_level_imports(path) for path in files)) - {"pipeline"}
    by_module = metadata.packages_distributions()
    imported = {_name(dist) for module in modules for dist in by_module.get(module, [])}
    assert {"torch", "mlflow"} <= imported, "the loaded model's own imports were read"
    allowed = _with_dependencies({_name(d) for d in SERVING_DISTRIBUTIONS})
    missing = sorted(imported - allowed)
    assert missing == [], f"add to candidate.SERVING_DISTRIBUTIONS: {missing}"
