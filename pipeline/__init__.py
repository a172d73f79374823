"""seq2seq-pipeline: parallel corpus -> registered, servable encoder-decoder translation model."""

__version__ = "0.1.0"
