"""`python -m pipeline set-params`: params.yaml overrides where `dvc exp run -S` has no git to work with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.params_file import set_params
from tests.helpers import write_params


def test_assignments_are_typed_nested_and_validated(tmp_path: Path) -> None:
    path = write_params(tmp_path, {})
    config = set_params(path, ["runtime.use_gpu=true", "runtime.num_workers=4", "data.builtin.n_pairs=500"])
    assert (config.runtime.use_gpu, config.runtime.num_workers, config.data.builtin.n_pairs) == (True, 4, 500)
    assert yaml.safe_load(path.read_text())["runtime"]["storage_path"] == "runs/ray", "other keys are kept"


def test_a_bad_value_names_the_key_and_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = write_params(tmp_path, {})
    before = path.read_text()
    with pytest.raises(PipelineError, match="model.dropout"):
        set_params(path, ["model.dropout=1.5"])
    with pytest.raises(PipelineError, match="section.key=value"):
        set_params(path, ["runtime.use_gpu"])
    assert path.read_text() == before


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_a_recipe_is_laid_over_params_and_assignments_go_last(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"data": {"builtin": {"n_pairs": 300}}, "model": {"dropout": 0.0}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  arch: transformer\n  emb_dim: 64\ndata:\n  builtin:\n    seed: 7\n")
    config = set_params(path, ["model.emb_dim=32"], recipe)
    assert (config.model.arch, config.model.emb_dim) == ("transformer", 32), "assignments win"
    written = yaml.safe_load(path.read_text())
    assert written["data"]["builtin"]["seed"] == 7
    assert written["data"]["builtin"]["n_pairs"] == 300, "a nested section merges key by key"
    assert written["model"]["dropout"] == 0.0, "keys the recipe does not name are kept"


def test_a_recipe_with_a_bad_value_names_the_key_and_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = write_params(tmp_path, {})
    before = path.read_text()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  arch: transformer\n  emb_dim: 100\n  n_heads: 8\n")
    with pytest.raises(PipelineError, match="model.emb_dim .100. must be divisible by model.n_heads .8."):
        set_params(path, [], recipe)
    for text, message in (("- a list\n", ":1: expected a mapping of sections"), ("", "is empty")):
        recipe.write_text(text)
        with pytest.raises(PipelineError, match=message):
            set_params(path, [], recipe)
    with pytest.raises(PipelineError, match="recipe not found"):
        set_params(path, [], tmp_path / "missing.yaml")
    assert path.read_text() == before


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_each_shipped_recipe_applies_and_another_corpus_needs_only_data_keys(
    tmp_path: Path, recipe: Path
) -> None:
    shipped = Path(__file__).resolve().parents[1] / "params.yaml"
    path = tmp_path / "params.yaml"
    path.write_text(shipped.read_text())
    config = set_params(path, [], recipe)
    assert config.data.source.startswith("hf:") and (config.data.src_lang, config.data.tgt_lang) == (
        "de",
        "en",
    )
    assert config.tune.num_samples == 0, "a recipe is a known-good setting: no search"
    other = set_params(path, ["data.source=corpora/news", "data.src_lang=fr", "data.tgt_lang=en"])
    assert (
        other.model == config.model and other.train == config.train and other.preprocess == config.preprocess
    )


def test_set_params_command_takes_a_recipe(tmp_path: Path) -> None:
    from pipeline.__main__ import main

    path = write_params(tmp_path, {})
    recipe = next(r for r in RECIPES if r.stem == "multi30k-transformer")
    assert main(["--params", str(path), "set-params", "--recipe", str(recipe)]) == 0
    assert yaml.safe_load(path.read_text())["model"]["arch"] == "transformer"
    assert main(["--params", str(path), "set-params"]) == 2, "nothing to set is an error"


def test_set_params_keeps_comments_key_order_and_every_other_line(tmp_path: Path) -> None:
    """Round-trip YAML, as `dvc exp run -S` edits: only the assigned lines change."""
    shipped = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(shipped)
    set_params(path, ["train.epochs=3", "data.max_examples=500"])
    before, after = shipped.splitlines(), path.read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert changed == [
        (
            "  max_examples: null       # null | N",
            "  max_examples: 500        # null | N",
        ),
        ("  epochs: 10", "  epochs: 3"),
    ]


NOT_YAML = {
    "unclosed-list": ("model.arch=[transformer", "expected ',' or ']', but got '<stream end>'"),
    "unclosed-mapping": ("model.arch={", "expected the node content, but found '<stream end>'"),
    "undefined-alias": ("data.source=*foo", "found undefined alias 'foo'"),
    "python-tag": ("model.arch=!!python/object:os.system", "could not determine a constructor for the tag"),
    "tab": ("model.arch=\ttransformer", "found character '\\t' that cannot start any token"),
    "duplicate-key": ("data.builtin={seed: 1, seed: 2}", "duplicate key 'seed'"),
}


@pytest.mark.parametrize("case", list(NOT_YAML))
def test_a_value_that_is_not_yaml_is_one_line_naming_the_assignment(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main

    assignment, problem = NOT_YAML[case]
    path = write_params(tmp_path, {})
    before = path.read_bytes()
    assert main(["--params", str(path), "set-params", "train.epochs=3", assignment]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {assignment!r}: the value is not valid YAML: "), error
    assert problem in error and error.count("\n") == 1, error
    assert path.read_bytes() == before


@pytest.mark.slow  # a subprocess: the cluster script, as a job runs it (about a second: no DVC, no Ray)
@pytest.mark.parametrize(
    ("pipeline_set", "error"),
    [
        (
            "train.epochs=3 model.arch=[transformer",
            "error: 'model.arch=[transformer': the value is not valid YAML:"
            " expected ',' or ']', but got '<stream end>'",
        ),
        (  # printed help and exited 0: the job then ran `dvc repro --pull` and `dvc push` without it
            "train.epochs=3 --help",
            "error: expected section.key=value, got '--help', an option: set-params and PIPELINE_SET take"
            " assignments only",
        ),
    ],
    ids=["not-yaml", "an-option"],
)
def test_a_pipeline_set_the_cluster_script_cannot_apply_stops_it_before_dvc(
    tmp_path: Path, pipeline_set: str, error: str
) -> None:
    """cluster/run_pipeline.sh applies $PIPELINE_SET before it touches DVC: what it cannot apply stops the
    job there with one line, the params file as it was."""
    import os
    import shutil
    import subprocess
    import sys

    project = Path(__file__).resolve().parents[1]
    shutil.copy(project / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
        "PIPELINE_SET": pipeline_set,
    }
    done = subprocess.run(
        ["bash", str(project / "cluster" / "run_pipeline.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [error] and done.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"], "DVC was not touched"
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_a_symlinked_params_file_is_edited_where_it_points(tmp_path: Path) -> None:
    target = write_params(tmp_path, {})
    (tmp_path / "project").mkdir()
    link = tmp_path / "project" / "params.yaml"
    link.symlink_to(Path("..") / "params.yaml")
    set_params(link, ["train.epochs=3"])
    assert link.is_symlink() and link.resolve() == target.resolve(), "the link stays a link"
    assert yaml.safe_load(target.read_text())["train"]["epochs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "project"], "no temporary left"
    before = target.read_bytes()
    with pytest.raises(PipelineError, match="train.epochs"):
        set_params(link, ["train.epochs=0"])
    assert link.is_symlink() and target.read_bytes() == before


@pytest.mark.parametrize("option", ["--params", "--recipe"])
def test_a_folder_given_as_params_or_recipe_is_named_as_a_folder(
    tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main

    path = write_params(tmp_path, {})
    folder = tmp_path / "recipes"
    folder.mkdir()
    arguments = ["--params", str(folder), "set-params", "train.epochs=3"]
    if option == "--recipe":
        arguments = ["--params", str(path), "set-params", "--recipe", str(folder)]
    assert main(arguments) == 2
    what = "parameters file" if option == "--params" else "recipe"
    assert capsys.readouterr().err == f"error: {what} is a folder, not a YAML file: {folder}\n"
    assert list(folder.iterdir()) == []
