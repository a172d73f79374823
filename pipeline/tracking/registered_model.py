"""A registered model version back as a `Translator`: what `translate --model models:/...` serves from."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.network.translator import InputBounds, Translator
from pipeline.tracking.candidate import MODEL_DIR_ARTIFACT
from pipeline.tracking.store import download_model_dir


def load_translator(
    model_uri: str, device: str | None = None, bounds: InputBounds | None = None
) -> Translator:
    """`models:/name@alias` or `models:/name/version` -> a Translator from that version's model folder.
    `device` None: $PIPELINE_DEVICE, else auto."""
    if not model_uri.startswith("models:/") or model_uri.rstrip("/") == "models:":
        raise PipelineError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}")
    with tempfile.TemporaryDirectory() as tmp:
        # load_model_dir reads every file into memory, so the download can go once it returns.
        folder = download_model_dir(model_uri, Path(tmp), MODEL_DIR_ARTIFACT)
        return Translator.from_dir(folder, device=device, bounds=bounds)
