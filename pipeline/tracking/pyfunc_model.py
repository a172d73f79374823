"""The translation model as an MLflow pyfunc, logged as "models from code": nothing in it is pickled.

The register stage passes this file's *path* as `python_model` (`candidate.pyfunc_parts`). MLflow copies
the file into the logged model and, when the model is loaded (`mlflow.pyfunc.load_model`, `mlflow models
serve`), runs it as a module; the `mlflow.models.set_model(...)` call at the bottom hands MLflow the
instance. The alternative, passing a `PythonModel` object, would store it with cloudpickle, and loading a
pickle runs arbitrary code.

The network comes back through `load_model_dir` from the files of `models/`, logged as the artifact
`model_dir`: safetensors weights, JSON config, tokenizer JSON and decoding settings. The `pipeline` package
travels with the model (`code_paths`), so a server needs only the pinned requirements, not the project.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.errors import PipelineError
from pipeline.tracking.candidate import BEAM_SIZE_PARAM, MODEL_DIR_ARTIFACT

TEXT_COLUMN = "text"
BATCH_SIZE = 64


def input_sentences(model_input: Any) -> list[str]:
    """Source sentences from what a pyfunc caller may send.

    A DataFrame (its `text` column, else its first), a Series, a 1-D array, a list of strings, a dict
    {"text": [...]} or one string. `{"inputs": [...]}` and `{"dataframe_split": ...}` requests reach
    `predict` as a one-column DataFrame once MLflow has applied the signature.
    """
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            return []
        column = TEXT_COLUMN if TEXT_COLUMN in model_input.columns else model_input.columns[0]
        values: Any = model_input[column]
    elif isinstance(model_input, dict):
        values = (
            model_input[TEXT_COLUMN] if TEXT_COLUMN in model_input else next(iter(model_input.values()), [])
        )
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, np.ndarray):
        values = model_input.reshape(-1)
    else:
        values = model_input
    return [str(value) for value in values]


class TranslatorModel(PythonModel):
    """predict(sentences) -> translations, one string per input sentence, in order."""

    def load_context(self, context: PythonModelContext) -> None:
        # Imported here, not at the top: MLflow also runs this file when it logs the model, where only the
        # instance is needed. At load time `pipeline` is the copy in the model's code/ folder.
        from pipeline.network.translator import InputBounds, Translator

        # A CUDA GPU when the serving machine has one ($PIPELINE_DEVICE=cpu forces the CPU). A request's
        # size is bounded as `translate`'s is: $PIPELINE_MAX_INPUT_TOKENS, $PIPELINE_MAX_SENTENCES.
        self.translator = Translator.from_dir(
            context.artifacts[MODEL_DIR_ARTIFACT], device=None, bounds=InputBounds.resolve()
        )

    # MLflow applies the signature first, so `model_input` arrives as a one-column DataFrame whatever the
    # request's shape. A DataFrame hint is also one MLflow derives no schema from, so the explicit signature
    # stays in force (a `list[str]` hint would replace it; no hint makes MLflow warn on every load).
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        beam_size = (params or {}).get(BEAM_SIZE_PARAM)
        try:
            return self.translator.translate(
                input_sentences(model_input),
                beam_size=int(beam_size) if beam_size is not None else None,
                batch_size=BATCH_SIZE,
            )
        except PipelineError as error:
            # The server answers an MlflowException with its message and a 400, any other exception
            # with a generic message and a stack trace.
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(TranslatorModel())
