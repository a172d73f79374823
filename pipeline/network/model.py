"""Encoder-decoder translation models, written to read top to bottom as the math: the two GRU models here,
the Transformer (arch transformer) in `transformer.py`, and `build_model`, the one mapping from config to
modules.

The three architectures share one interface (`Seq2Seq`): `encode` a source batch once, then run the decoder
over known tokens (teacher forcing, one call) or one token at a time (`decode_step`, used by search). Beam
search lays out and reorders what the decoder reads with `select_rows` (the memory, batch-first) and
`select_state` (the decoder state, batch on dim 1: a GRU's s [L,B,H], the Transformer's cache).

gru — Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder"
(bentrevett/pytorch-seq2seq tutorial 2). The whole sentence is squeezed into one vector c:
    encoder    h_s = GRU(E x_s, h_{s-1})                     c = h_S   (top layer, last real token)
    decoder    s_t = GRU([E y_{t-1}; c], s_{t-1})            s_0 = c   (every layer)
               p(y_t | y_<t, x) = softmax(W_o [E y_{t-1}; s_t; c])

gru_attention — Bahdanau et al. 2015, "Neural Machine Translation by Jointly Learning to Align and
Translate" (tutorial 3). The decoder looks back at every source position:
    encoder    h_s = [→h_s; ←h_s]                             bidirectional GRU over the packed source
               s_0 = tanh(W_b [→h_S; ←h_1])                   per layer
    attention  e_ts = v^T tanh(W_q s_{t-1} + W_k h_s)         W_k h_s computed once per batch
               a_t = softmax_s(e_t)  over real tokens only    padding gets -inf, hence weight 0
               c_t = Σ_s a_ts h_s
    decoder    s_t = GRU([E y_{t-1}; c_t], s_{t-1})
               p(y_t | y_<t, x) = softmax(W_o [s_t; c_t; E y_{t-1}])

Both GRU encoders run on packed sequences, so the content and amount of padding never change a result:
batched decoding equals one-sentence-at-a-time decoding (the Transformer masks padding to the same end).

Shapes: B batch, S source length, T target length, L layers, H hidden, E embedding, V vocabulary.
Conventions: id 0 is padding; `tgt_in` = <s> y_1 .. y_n, and the loss compares the logits with
`tgt_out` = y_1 .. y_n </s> (padding ignored). Dropout (config.dropout) acts on embeddings and between
stacked GRU layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import real_token_mask
from pipeline.network.tokenization import PAD_ID
from pipeline.network.transformer import (
    DecoderCache,
    TransformerDecoder,
    TransformerEncoder,
    TransformerMemory,
    token_embedding,
)

# ---------------------------------------------------------------------------------------------------------
# Encoder: h_s = GRU(E x_s, h_{s-1}), one direction (gru) or both (gru_attention)
# ---------------------------------------------------------------------------------------------------------


def _gru(inputs: int, hidden: int, n_layers: int, dropout: float, bidirectional: bool = False) -> nn.GRU:
    """A batch-first GRU stack with dropout between layers (nn.GRU warns if asked for it with one layer)."""
    between_layers = dropout if n_layers > 1 else 0.0
    return nn.GRU(
        inputs, hidden, n_layers, batch_first=True, dropout=between_layers, bidirectional=bidirectional
    )


class Encoder(nn.Module):
    def __init__(
        self, vocab: int, emb_dim: int, hidden_dim: int, n_layers: int, dropout: float, bidirectional: bool
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = _gru(emb_dim, hidden_dim, n_layers, dropout, bidirectional)

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Returns h [B,S,D*H] (zero at padding) and the final states [L,B,D*H], D = number of directions.

        Packing makes each sentence's final state the one after its last real token, not after padding.
        """
        embedded = self.dropout(self.embedding(src))  # [B,S,E]
        packed = pack_padded_sequence(embedded, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, final = self.rnn(packed)  # final: [L*D, B, H], back in batch order
        outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=src.size(1))
        directions = 2 if self.rnn.bidirectional else 1
        n_layers, batch, hidden = self.rnn.num_layers, src.size(0), self.rnn.hidden_size
        # [L*D,B,H] -> [L,B,D*H]: per layer, the forward state next to the backward one
        final = final.view(n_layers, directions, batch, hidden).transpose(1, 2).reshape(n_layers, batch, -1)
        return outputs, final


# ---------------------------------------------------------------------------------------------------------
# Additive attention: e_ts = v^T tanh(W_q s + W_k h_s), a_t = softmax over real source tokens
# ---------------------------------------------------------------------------------------------------------


class AdditiveAttention(nn.Module):
    def __init__(self, query_dim: int, memory_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.W_q = nn.Linear(query_dim, attention_dim, bias=False)
        self.W_k = nn.Linear(memory_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """W_k h_s for every source position: it does not depend on t, so it is computed once per batch."""
        return self.W_k(memory)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query s [B,Hq], keys W_k h [B,S,A], values h [B,S,M], mask [B,S] (True at real tokens).

        Returns the context c [B,M] and the weights a [B,S], exactly 0 on padding.
        """
        scores = self.v(torch.tanh(keys + self.W_q(query).unsqueeze(1))).squeeze(-1)  # e [B,S]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # a [B,S]
        context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # c = Σ_s a_s h_s  [B,M]
        return context, weights


# ---------------------------------------------------------------------------------------------------------
# What the decoder reads at every step. Every memory tensor is batch-first, so beam search reorders a memory
# with one index_select per field (`select_rows`). Every decoder state is layer-major with the batch on
# dim 1: s [L,B,H] as nn.GRU wants it, the Transformer's cached keys and values [L,B,h,t,d_k] likewise
# (`select_state`).
# ---------------------------------------------------------------------------------------------------------


class ContextMemory(NamedTuple):
    context: Tensor  # c [B,H]: the top encoder layer's final state


class AttentionMemory(NamedTuple):
    values: Tensor  # h [B,S,2H]
    keys: Tensor  # W_k h [B,S,A]
    mask: Tensor  # [B,S] True at real source tokens


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
# Decoders. forward(tokens [B,T], s, memory) -> (logits [B,T,V], s) runs over known input tokens: the whole
# target under teacher forcing, or a single step (T=1) during search.
# ---------------------------------------------------------------------------------------------------------


class ContextDecoder(nn.Module):
    """s_t = GRU([E y_{t-1}; c], s_{t-1}), s_0 = c; p(y_t) = softmax(W_o [E y_{t-1}; s_t; c])."""

    def __init__(self, vocab_size: int, emb_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.rnn = _gru(emb_dim + hidden_dim, hidden_dim, n_layers, dropout)
        self.W_o = nn.Linear(emb_dim + hidden_dim + hidden_dim, vocab_size)

    def start(self, outputs: Tensor, final: Tensor, mask: Tensor) -> tuple[ContextMemory, Tensor]:
        context = final[-1]  # c = h_S of the top layer [B,H]
        s0 = context.unsqueeze(0).expand(self.rnn.num_layers, -1, -1).contiguous()  # s_0 = c, every layer
        return ContextMemory(context), s0

    def forward(self, tokens: Tensor, state: Tensor, memory: ContextMemory) -> tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(tokens))  # E y_{t-1} [B,T,E]
        context = memory.context.unsqueeze(1).expand(-1, tokens.size(1), -1)  # c at every step [B,T,H]
        # The inputs do not depend on the outputs, so one GRU call covers all T steps.
        outputs, state = self.rnn(torch.cat([embedded, context], dim=-1), state)  # s_t [B,T,H]
        logits = self.W_o(torch.cat([embedded, outputs, context], dim=-1))  # [B,T,V]
        return logits, state


class AttentionDecoder(nn.Module):
    """c_t = attend(s_{t-1}, h);  s_t = GRU([E y_{t-1}; c_t], s_{t-1});
    p(y_t) = softmax(W_o [s_t; c_t; E y_{t-1}]).  The bridge s_0 = tanh(W_b [→h_S; ←h_1]) lives here too.
    """

    def __init__(self, vocab_size: int, emb_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        memory_dim = 2 * hidden_dim  # the bidirectional encoder's [→h; ←h]
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.W_b = nn.Linear(memory_dim, hidden_dim)  # bridge: s_0 = tanh(W_b [→h_S; ←h_1])
        self.attention = AdditiveAttention(hidden_dim, memory_dim, hidden_dim)
        self.rnn = _gru(emb_dim + memory_dim, hidden_dim, n_layers, dropout)
        self.W_o = nn.Linear(hidden_dim + memory_dim + emb_dim, vocab_size)

    def start(self, outputs: Tensor, final: Tensor, mask: Tensor) -> tuple[AttentionMemory, Tensor]:
        s0 = torch.tanh(self.W_b(final))  # [L,B,H], layer l from encoder layer l
        return AttentionMemory(outputs, self.attention.keys(outputs), mask), s0

    def forward(self, tokens: Tensor, state: Tensor, memory: AttentionMemory) -> tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(tokens))  # E y_{t-1} [B,T,E], all steps at once
        states, contexts = [], []
        for embedded_t in embedded.unbind(1):  # c_t needs s_{t-1}: a loop, only attention and GRU inside
            context, _ = self.attention(state[-1], memory.keys, memory.values, memory.mask)  # c_t [B,2H]
            output, state = self.rnn(torch.cat([embedded_t, context], dim=-1).unsqueeze(1), state)
            states.append(output.squeeze(1))
            contexts.append(context)
        # The output layer is the biggest matmul: one call over all steps, not T small ones.
        features = torch.cat([torch.stack(states, dim=1), torch.stack(contexts, dim=1), embedded], dim=-1)
        return self.W_o(features), state  # [B,T,V]


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
