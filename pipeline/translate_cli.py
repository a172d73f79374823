"""`python -m pipeline translate`: sentences from arguments or stdin, one translation per line on stdout."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError


def run_translate(sentences: Sequence[str], model: str, beam_size: int | None) -> int:
    """`model` is a model folder or an MLflow registry URI (models:/name/version or models:/name@alias)."""
    if beam_size is not None and beam_size < 1:
        raise PipelineError(f"--beam-size must be at least 1, got {beam_size}")
    if not sentences:
        sentences = [line.rstrip("\r\n") for line in sys.stdin]
    if model.startswith("models:/"):
        from pipeline.tracking import load_translator_from_registry  # MLflow only when asked for

        translator = load_translator_from_registry(model)
    else:
        from pipeline.translator import Translator  # torch is imported here, not for `--help`

        translator = Translator.from_dir(Path(model))
    for translation in translator.translate(list(sentences), beam_size=beam_size):
        # One line per input, always: a stray newline in an output would shift every later line.
        print(" ".join(translation.splitlines()))
    sys.stdout.flush()
    return 0
