"""`python -m pipeline set-params`: params.yaml overrides where `dvc exp run -S` has no git to work with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import set_params
from pipeline.errors import PipelineError
from tests.conftest import write_params


def test_assignments_are_typed_nested_and_validated(tmp_path: Path) -> None:
    path = write_params(tmp_path, {})
    config = set_params(path, ["train.use_gpu=true", "train.num_workers=4", "data.builtin.n_pairs=500"])
    assert (config.train.use_gpu, config.train.num_workers, config.data.builtin.n_pairs) == (True, 4, 500)
    assert yaml.safe_load(path.read_text())["runtime"]["storage_path"] == "runs/ray", "other keys are kept"


def test_a_bad_value_names_the_key_and_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = write_params(tmp_path, {})
    before = path.read_text()
    with pytest.raises(PipelineError, match="model.dropout"):
        set_params(path, ["model.dropout=1.5"])
    with pytest.raises(PipelineError, match="section.key=value"):
        set_params(path, ["train.use_gpu"])
    assert path.read_text() == before
