"""Encoder-decoder translation models: the interface the three architectures share (`Seq2Seq`) and
`build_model`, the one mapping from config to modules. The two GRU models are in `gru.py`, the Transformer
(arch transformer) in `transformer.py`.

The three architectures share one interface (`Seq2Seq`): `encode` a source batch once, then run the decoder
over known tokens (teacher forcing, one call) or one token at a time (`decode_step`, used by search). Beam
search lays out and reorders what the decoder reads with `select_rows` (the memory, batch-first) and
`select_state` (the decoder state, batch on dim 1: a GRU's s [L,B,H], the Transformer's cache).

Shapes: B batch, S source length, T target length, L layers, H hidden, E embedding, V vocabulary.
Conventions: id 0 is padding; `tgt_in` = <s> y_1 .. y_n, and the loss compares the logits with
`tgt_out` = y_1 .. y_n </s> (padding ignored). Dropout (config.dropout) acts on embeddings and between
stacked GRU layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import real_token_mask
from pipeline.network.gru import AttentionDecoder, AttentionMemory, ContextDecoder, ContextMemory, Encoder
from pipeline.network.transformer import (
    DecoderCache,
    TransformerDecoder,
    TransformerEncoder,
    TransformerMemory,
    token_embedding,
)

# ---------------------------------------------------------------------------------------------------------
# What the decoder reads at every step (memories batch-first, states with the batch on dim 1): see gru.py
# and transformer.py for each architecture's.
# ---------------------------------------------------------------------------------------------------------

Memory = ContextMemory | AttentionMemory | TransformerMemory
State = Tensor | DecoderCache  # GRU s [L,B,H]; the Transformer's self-attention cache


def select_rows(memory: Memory, index: Tensor) -> Memory:
    """The memory of sentences `index` (repeats allowed): how beams are laid out and reordered."""
    return type(memory)(*(field.index_select(0, index) for field in memory))


def select_state(state: State, index: Tensor) -> State:
    """The decoder state of rows `index` (repeats allowed), the batch being dim 1 of every tensor in it."""
    if isinstance(state, Tensor):
        return state.index_select(1, index)
    return state.select(index)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


Decoder = ContextDecoder | AttentionDecoder | TransformerDecoder


class Seq2Seq(nn.Module):
    def __init__(self, encoder: Encoder | TransformerEncoder, decoder: Decoder, config: ModelConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = config

    @property
    def src_vocab_size(self) -> int:
        return self.encoder.embedding.num_embeddings

    @property
    def tgt_vocab_size(self) -> int:
        return self.decoder.embedding.num_embeddings

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Memory, State]:
        """Everything the decoder needs from the source: its memory and the initial state (GRU s_0 [L,B,H],
        an empty Transformer cache)."""
        outputs, final = self.encoder(src, src_lengths)
        mask = real_token_mask(src_lengths, src.size(1), src.device)
        return self.decoder.start(outputs, final, mask)

    def decode_step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State]:
        """One step: previous tokens y_{t-1} [B] and state s_{t-1} -> logits [B,V] for y_t, and s_t."""
        logits, state = self.decoder(tokens.unsqueeze(1), state, memory)
        return logits.squeeze(1), state

    def forward(
        self,
        src: Tensor,
        src_lengths: Tensor,
        tgt_in: Tensor,
        teacher_forcing: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Logits [B,T,V] for tgt_out given tgt_in (<s> first).

        With teacher_forcing < 1, each step's input is, per sentence and independently with probability
        1 - teacher_forcing, the model's own argmax at the previous step instead of the reference token
        (scheduled sampling, Bengio et al. 2015). The coins come from `generator` (on src's device) or,
        when None, from torch's global RNG, so `torch.manual_seed` makes a run repeatable. The steps run
        one after another for every architecture (the Transformer's too, through its cache): a step's
        input is known only once the step before it has run.
        """
        memory, state = self.encode(src, src_lengths)
        if teacher_forcing >= 1.0:
            logits, _ = self.decoder(tgt_in, state, memory)
            return logits
        steps = []
        tokens = tgt_in[:, 0]
        for t in range(tgt_in.size(1)):
            step_logits, state = self.decode_step(tokens, state, memory)
            steps.append(step_logits)
            if t + 1 < tgt_in.size(1):
                reference = tgt_in[:, t + 1]
                coins = torch.rand(reference.shape, generator=generator, device=reference.device)
                use_reference = coins < teacher_forcing
                tokens = torch.where(use_reference, reference, step_logits.argmax(dim=-1))
        return torch.stack(steps, dim=1)


# The ModelConfig settings each architecture reads in `build_model` (and `_transformer`). The others have
# no effect on it, so what is recorded about a model (the registry's tags) leaves them out.
_COMMON_SETTINGS = ("arch", "emb_dim", "n_layers", "dropout")
ARCH_SETTINGS: dict[str, tuple[str, ...]] = {
    "gru": (*_COMMON_SETTINGS, "hidden_dim"),
    "gru_attention": (*_COMMON_SETTINGS, "hidden_dim"),
    "transformer": (
        *_COMMON_SETTINGS,
        "n_heads",
        "ff_dim",
        "ff_activation",
        "tie_embeddings",
        "share_embeddings",
    ),
}


def settings_in_use(model: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `model` (a ModelConfig as a dict) that its architecture reads; all of them for an
    architecture this code does not know (a model folder written by another version)."""
    used = ARCH_SETTINGS.get(str(model.get("arch")))
    if used is None:
        return dict(model)
    return {key: value for key, value in model.items() if key in used}


def build_model(config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    """The one mapping from config to modules: training, tuning and loading must build the same network."""
    if config.arch == "transformer":
        return Seq2Seq(*_transformer(config, src_vocab_size, tgt_vocab_size), config)
    attention = config.arch == "gru_attention"
    sizes = (config.emb_dim, config.hidden_dim, config.n_layers, config.dropout)
    encoder = Encoder(src_vocab_size, *sizes, bidirectional=attention)
    decoder = (AttentionDecoder if attention else ContextDecoder)(tgt_vocab_size, *sizes)
    return Seq2Seq(encoder, decoder, config)


def _transformer(
    config: ModelConfig, src_vocab_size: int, tgt_vocab_size: int
) -> tuple[TransformerEncoder, TransformerDecoder]:
    """emb_dim is the model width d; n_layers counts encoder layers and decoder layers alike."""
    if config.share_embeddings and src_vocab_size != tgt_vocab_size:
        raise PipelineError(
            "model.share_embeddings needs one vocabulary for both sides (preprocess.joint_vocab: true), "
            f"but the source vocabulary has {src_vocab_size} tokens and the target {tgt_vocab_size}"
        )
    src_embedding = token_embedding(src_vocab_size, config.emb_dim)
    shared = config.share_embeddings
    tgt_embedding = src_embedding if shared else token_embedding(tgt_vocab_size, config.emb_dim)
    sizes = (config.n_heads, config.ff_dim, config.n_layers, config.dropout, config.ff_activation)
    encoder = TransformerEncoder(src_embedding, *sizes)
    decoder = TransformerDecoder(tgt_embedding, *sizes, tie_output=config.tie_embeddings)
    return encoder, decoder


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: what tuning trades against quality and speed."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
