"""The `model:` section: the transformer keys, their validation, and what a search may draw."""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.params_file import config_from_dict, load_config
from tests.helpers import REPO_ROOT

TRANSFORMER_SEARCH = {
    "model.arch": {"choice": ["gru_attention", "transformer"]},
    "model.emb_dim": {"choice": [64, 128]},
    "model.n_heads": {"choice": [4, 8]},
    "model.ff_dim": {"choice": [256, 512]},
}


def test_params_yaml_names_every_model_key_and_keeps_the_gru_default() -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["model"]
    assert set(raw) == set(ModelConfig.model_fields)
    assert load_config(REPO_ROOT / "params.yaml").model.arch == "gru_attention"


def test_a_gru_model_config_from_before_the_transformer_still_loads() -> None:
    """model_config.json of models saved before these keys existed."""
    old = {"arch": "gru_attention", "emb_dim": 32, "hidden_dim": 64, "n_layers": 2, "dropout": 0.1}
    assert ModelConfig.model_validate(old).model_dump(include=set(old)) == old


def test_heads_must_divide_the_width_of_a_transformer() -> None:
    message = re.escape("model.emb_dim (250) must be divisible by model.n_heads (8)")
    with pytest.raises(PipelineError, match=message):
        config_from_dict({"model": {"arch": "transformer", "emb_dim": 250, "n_heads": 8}})
    assert config_from_dict({"model": {"arch": "gru", "emb_dim": 250, "n_heads": 8}}).model.n_heads == 8


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"n_heads": 0}, "model.n_heads"),
        ({"ff_dim": 0}, "model.ff_dim"),
        ({"ff_activation": "swish"}, "model.ff_activation"),
        ({"arch": "transformers"}, "model.arch"),
    ],
)
def test_a_bad_transformer_key_is_refused_naming_it(model: dict, key: str) -> None:
    with pytest.raises(PipelineError, match=re.escape(key)):
        config_from_dict({"model": model})


def test_shared_embeddings_need_a_joint_vocabulary() -> None:
    model = {"arch": "transformer", "share_embeddings": True}
    with pytest.raises(PipelineError, match=r"model\.share_embeddings: needs preprocess\.joint_vocab: true"):
        config_from_dict({"model": model})
    assert config_from_dict({"model": model, "preprocess": {"joint_vocab": True}}).model.share_embeddings


def test_a_search_over_architectures_and_heads_is_accepted() -> None:
    tune = config_from_dict({"tune": {"search_space": TRANSFORMER_SEARCH}}).tune
    assert set(tune.search_space) == set(TRANSFORMER_SEARCH)


@pytest.mark.parametrize(
    ("dimensions", "message"),
    [
        ({"model.n_heads": {"choice": [4, 3]}}, "can draw {'model.arch': 'transformer', 'model.emb_dim'"),
        ({"model.emb_dim": {"randint": [64, 128]}}, "give model.emb_dim as a choice of values"),
        ({"model.arch": {"choice": ["gru", "transfomer"]}}, "can draw {'model.arch': 'transfomer'"),
    ],
)
def test_a_search_that_can_draw_an_invalid_model_is_refused_up_front(dimensions: dict, message: str) -> None:
    space = {**TRANSFORMER_SEARCH, **dimensions}
    with pytest.raises(PipelineError, match=re.escape(message)):
        config_from_dict({"tune": {"search_space": space}})
    assert config_from_dict({"tune": {"search_space": space, "num_samples": 0}})  # no search, no check


@pytest.mark.parametrize(
    ("space", "reason"),
    [
        (
            {"model.dropout": {"uniform": [0.5, 1.5]}},
            r"can draw \{'model.dropout': 1.5\}: Input should be less than 1",
        ),
        ({"model.n_layers": {"randint": [0, 100]}}, r"can draw \{'model.n_layers': 0\}"),
        ({"model.arch": {"choice": ["lstm"]}}, r"can draw \{'model.arch': 'lstm'\}"),
        (
            {"train.lr": {"uniform": [0.001, 2.0]}},
            r"can draw \{'train.lr': 2.0\}: Input should be less than or equal to 1",
        ),
    ],
)
def test_every_value_a_search_can_draw_is_checked_when_params_load(space: dict, reason: str) -> None:
    """Before Ray starts: a bad draw found inside a trial costs a search."""
    with pytest.raises(PipelineError, match=r"tune\.search_space: " + reason):
        config_from_dict({"tune": {"search_space": space}})
