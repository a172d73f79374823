"""The package's layers, checked from the source (ast): imports point down only, and the network layer runs
where only PyTorch and a few libraries are installed (checked by importing it with the rest made absent).

    __main__ > stages > jobs > tracking > training > data > network > core (config, errors, paths, files,
    fingerprint)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.import_graph import REPO_ROOT, imported_modules, module_name, package_files

LAYERS = ("core", "network", "data", "training", "tracking", "jobs", "stages", "cli")
SUBPACKAGE_LAYERS = {"network", "data", "training", "tracking", "jobs", "stages"}
# What a GPU box with only PyTorch lacks; the network layer must import without any of them.
NOT_ON_A_TORCH_ONLY_BOX = ("ray", "mlflow", "dvc", "datasets", "pandas", "yaml", "optuna")


def imported_names(node: ast.AST) -> list[str]:
    """The modules an import statement names (`from x import y`: x), none for any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return []


def layer_of(path: Path) -> str:
    parts = Path(path).parts  # ("pipeline", "network", "model.py") or ("pipeline", "config.py")
    if len(parts) > 2 and parts[1] in SUBPACKAGE_LAYERS:
        return parts[1]
    return "cli" if parts[-1] == "__main__.py" else "core"


def test_every_subpackage_is_a_known_layer() -> None:
    folders = {path.parts[1] for path in package_files() if len(path.parts) > 2}
    assert folders == SUBPACKAGE_LAYERS, "a new subpackage needs a place in LAYERS"


def test_imports_point_down_only() -> None:
    upward = []
    for path in package_files():
        own = LAYERS.index(layer_of(path))
        for module in imported_modules(path):
            target = layer_of(Path(*module.split(".")).with_suffix(".py"))
            if LAYERS.index(target) > own:
                upward.append(f"{path} ({layer_of(path)}) imports {module} ({target})")
    assert not upward, "imports must point down the layers:\n" + "\n".join(upward)


def test_network_layer_imports_no_ray_mlflow_dvc_or_datasets() -> None:
    offenders = []
    for path in package_files():
        if layer_of(path) != "network":
            continue
        tree = ast.parse((REPO_ROOT / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = imported_names(node)
            offenders += [
                f"{path}: {name}" for name in names if name.split(".")[0] in NOT_ON_A_TORCH_ONLY_BOX
            ]
    assert not offenders, offenders


@pytest.mark.slow
def test_network_layer_imports_on_a_box_without_ray_mlflow_dvc_or_datasets() -> None:
    modules = sorted(module_name(path) for path in package_files() if layer_of(path) == "network")
    script = textwrap.dedent(
        f"""
        import importlib, sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {NOT_ON_A_TORCH_ONLY_BOX!r}:
                    raise ImportError(f"{{name}} is not installed on this box")
                return None

        sys.meta_path.insert(0, Absent())
        for module in {modules!r}:
            importlib.import_module(module)
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set({NOT_ON_A_TORCH_ONLY_BOX!r}))
        assert not leaked, leaked
        print("imported", len({modules!r}), "modules")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)} modules" in result.stdout


@pytest.mark.slow
def test_torch_only_gpu_benchmark_trains_and_scores_without_ray_mlflow_dvc_or_datasets(
    tmp_path: Path,
) -> None:
    """benchmarks/gpu_torch.py end to end on the CPU: the project's model, batches and training step, then
    beam search and sacreBLEU, with only what a torch-only box has (PyYAML reads the recipe)."""
    import json

    from tests.helpers import prepare_project

    prepare_project(tmp_path, {"data": {"builtin": {"n_pairs": 300}}})
    recipe = tmp_path / "tiny-transformer.yaml"
    recipe.write_text(
        "model: {arch: transformer, emb_dim: 32, n_heads: 4, ff_dim: 64, n_layers: 1}\n"
        "train: {epochs: 2, batch_size: 1500}\nruntime: {num_workers: 1}\nevaluate: {beam_size: 2}\n"
    )
    out = tmp_path / "result.jsonl"
    absent = tuple(name for name in NOT_ON_A_TORCH_ONLY_BOX if name != "yaml")
    arguments = ["--recipe", str(recipe), "--processed", str(tmp_path / "data" / "processed")]
    arguments += ["--device", "cpu", "--budget-s", "30", "--out", str(out), "--compare-cpu"]
    script = textwrap.dedent(
        f"""
        import runpy, sys

        # None in sys.modules: `import` fails and importlib.util.find_spec says "absent", as for a package
        # that is not installed (torch._dynamo probes optional packages that way).
        sys.modules.update(dict.fromkeys({absent!r}))
        sys.argv = ["gpu_torch", *{arguments!r}]
        runpy.run_module("benchmarks.gpu_torch", run_name="__main__")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert (measured["arch"], measured["device"], measured["epochs"]) == ("transformer", "cpu", 2)
    assert measured["tokens_per_s"] > 0 and measured["train_flops_per_target_token"] > 0
    assert measured["history"][-1]["loss"] < measured["history"][0]["loss"]
    assert {"bleu", "bleu_lc", "chrf"} <= measured.keys()
    assert measured["bleu_signature"].startswith("BLEU|nrefs:1|case:mixed|")  # what the score means
    # On a CPU-only box the comparison is the CPU against itself: its plumbing, not a GPU's numerics.
    assert (measured["cpu_identical_greedy"], measured["cpu_identical_beam"]) == (1.0, 1.0)
    assert measured["cpu_bleu"] == measured["bleu"]


def test_no_test_module_or_benchmark_imports_a_test_module() -> None:
    """Helpers live in modules that hold no tests (tests/helpers.py, tests/seq2seq_toys.py, ...): importing
    a test module runs its module-level fixtures and marks in another module's session."""
    offenders = []
    for path in sorted([*(REPO_ROOT / "tests").glob("*.py"), *(REPO_ROOT / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = imported_names(node)
            offenders += [f"{path.name}: {name}" for name in names if name.startswith("tests.test_")]
    assert offenders == []
