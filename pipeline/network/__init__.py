"""The network layer: text to token ids and back, encoded splits and batches, the models, decoding, the
training step, scoring, the model folder and the `Translator`.

Needs only torch, tokenizers, sacrebleu, safetensors, numpy and pydantic: nothing here imports Ray, MLflow,
DVC or `datasets` (tests/test_layers.py checks), so it runs on a GPU box that has PyTorch and little else.
"""
