"""How a search dimension's key travels through Ray Tune, without importing Ray: the tune stage with no
search, and the trials table, need only this."""

from __future__ import annotations

from typing import Any

# Tune flattens nested config keys with "/", and some searchers dislike dots: "model.emb_dim" travels
# as "model__emb_dim".
_KEY_SEPARATOR = "__"


def to_tune_key(dotted: str) -> str:
    return dotted.replace(".", _KEY_SEPARATOR)


def to_dotted_key(tune_key: str) -> str:
    return tune_key.replace(_KEY_SEPARATOR, ".")


def trial_overrides(trial_config: dict[str, Any]) -> dict[str, Any]:
    return {to_dotted_key(key): value for key, value in trial_config.items()}
