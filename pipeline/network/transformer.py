"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need"), pre-norm, written to
read top to bottom as the math. `model.build_model` assembles it into the same `Seq2Seq` as the GRU models.

    embedding   x_0 = dropout(√d · E x + PE)       PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(..)
    attention   Attn(Q, K, V) = softmax(Q K^T / √d_k + M) V            M = 0 where allowed, -inf elsewhere
                MultiHead(X, Y) = [head_1; ..; head_h] W^O     head_i = Attn(X W_i^Q, Y W_i^K, Y W_i^V)
    encoder     x = x + dropout(MultiHead(LN(x), LN(x)))            M hides padded source positions
                x = x + dropout(FFN(LN(x)))                         FFN(x) = W_2 act(W_1 x + b_1) + b_2
                h = LN(x_N)                                         act = ReLU or GELU (model.ff_activation)
    decoder     y = y + dropout(MultiHead(LN(y), LN(y)))            M causal: position t sees positions <= t
                y = y + dropout(MultiHead(LN(y), h))                M hides padded source positions
                y = y + dropout(FFN(LN(y)))
                p(y_t | y_<t, x) = softmax(W_o LN(y_N) + b_o)

Pre-norm (LayerNorm before each sublayer, one more after the last layer; Wang et al. 2019, Xiong et al.
2020) instead of the paper's post-norm: it trains stably without a long warm-up. Dropout is where the
paper puts it: on the embedding sums and on every sublayer's output. Attention runs through
`F.scaled_dot_product_attention` (fused kernels on GPU).

Weights shared (model config): `tie_embeddings` makes the output projection W_o the target embedding matrix
(Press & Wolf 2017); `share_embeddings` makes the source and target embeddings one matrix, which needs one
vocabulary for both sides (preprocess.joint_vocab): build_model checks that the sizes are equal. The
embeddings start at N(0, 1/d), so √d · E x and PE are of the same scale.

Padding never changes a result: the encoder and the cross-attention mask padded source keys, the causal
mask keeps real target positions from reading the padding after them, and encoder outputs are zeroed at
padding.

Decoding is incremental. `start` computes each layer's cross-attention keys and values of the source once
per batch (`TransformerMemory`); the decoder state is a `DecoderCache` of each layer's self-attention keys
and values of the positions decoded so far, in buffers with room for more, so a step runs the new token only
and writes its keys and values in place. Writing in place is for inference only: with gradients on (training
with scheduled sampling), autograd has saved the earlier steps' keys and values for backward, so each step
concatenates into fresh tensors instead. Under teacher forcing the cache starts empty and the whole target
runs in one parallel pass.

Shapes: B batch, S source length, T new target positions, t cached positions, L layers, h heads,
d model width (model.emb_dim), d_k = d / h, F feed-forward width (model.ff_dim), V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.network.batching import real_token_mask
from pipeline.network.tokenization import PAD_ID

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}

# ---------------------------------------------------------------------------------------------------------
# Embeddings: √d · E x + PE(position)
# ---------------------------------------------------------------------------------------------------------


def token_embedding(vocab_size: int, d_model: int) -> nn.Embedding:
    """E, initialised N(0, 1/d) so that √d · E x has unit scale, like the positional encoding."""
    embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
    nn.init.normal_(embedding.weight, std=d_model**-0.5)
    with torch.no_grad():
        embedding.weight[PAD_ID].zero_()
    return embedding


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """PE [T,d]: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d))."""
    even = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)  # 2i
    angles = positions.float().unsqueeze(1) / 10000.0 ** (even / d_model)  # [T, ceil(d/2)]
    encoding = torch.zeros(positions.size(0), d_model, device=positions.device)
    encoding[:, 0::2] = torch.sin(angles)
    encoding[:, 1::2] = torch.cos(angles[:, : d_model // 2])  # an odd d has one sine more than cosines
    return encoding


def embed(embedding: nn.Embedding, tokens: Tensor, first_position: int) -> Tensor:
    """√d · E x + PE for tokens [B,T] at positions first_position, first_position + 1, ..."""
    d_model = embedding.embedding_dim
    positions = torch.arange(first_position, first_position + tokens.size(1), device=tokens.device)
    return embedding(tokens) * math.sqrt(d_model) + sinusoidal_positions(positions, d_model)


# Not cuDNN's fused attention: it builds an execution plan for every new (batch, length) shape, and
# length-bucketed batches are nearly all new shapes (measured on an H100: 16 ms of CPU per call, a training
# step 10x slower than with the other kernels).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _linear(inputs: int, outputs: int) -> nn.Linear:
    """Glorot-uniform weights, zero bias: the usual Transformer initialisation."""
    layer = nn.Linear(inputs, outputs)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ---------------------------------------------------------------------------------------------------------
# Multi-head attention and the feed-forward block
# ---------------------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """MultiHead(X, Y) = [head_1; ..; head_h] W^O,  head_i = softmax(X W_i^Q (Y W_i^K)^T / √d_k + M) Y W_i^V.

    The keys and values Y W^K, Y W^V come in already projected (`keys_values`): the decoder projects the
    source once per batch and its own past positions once per step, and keeps them.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.W_q = _linear(d_model, d_model)
        self.W_k = _linear(d_model, d_model)
        self.W_v = _linear(d_model, d_model)
        self.W_out = _linear(d_model, d_model)  # W^O

    def _split_heads(self, x: Tensor) -> Tensor:
        """[B,T,d] -> [B,h,T,d_k]"""
        batch, length, d_model = x.shape
        return x.view(batch, length, self.n_heads, d_model // self.n_heads).transpose(1, 2)

    def keys_values(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Y W^K and Y W^V per head, [B,h,S,d_k] each."""
        return self._split_heads(self.W_k(inputs)), self._split_heads(self.W_v(inputs))

    def forward(
        self, inputs: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, is_causal: bool = False
    ) -> Tensor:
        """inputs X [B,T,d], keys and values [B,h,S,d_k], mask broadcastable to [B,h,T,S] (True: may attend).

        is_causal applies the causal mask aligned at the top left (query i sees keys <= i): right only when
        the keys start at the first query's position.
        """
        queries = self._split_heads(self.W_q(inputs))
        with sdpa_kernel(_SDPA_BACKENDS):
            heads = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=is_causal)
        return self.W_out(heads.transpose(1, 2).flatten(2))  # [B,h,T,d_k] -> [B,T,d] -> W^O


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x + b_1) + b_2, applied at every position alike."""

    def __init__(self, d_model: int, ff_dim: int, activation: str) -> None:
        super().__init__()
        self.W_1 = _linear(d_model, ff_dim)
        self.activation = ACTIVATIONS[activation]()
        self.W_2 = _linear(ff_dim, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_2(self.activation(self.W_1(x)))


# ---------------------------------------------------------------------------------------------------------
# Encoder: x = x + dropout(SelfAttn(LN(x))); x = x + dropout(FFN(LN(x))); h = LN(x_N)
# ---------------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff_dim: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.self_attention = MultiHeadAttention(d_model, n_heads)
        self.norm_feed_forward = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, ff_dim, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        normed = self.norm_attention(x)
        x = x + self.dropout(self.self_attention(normed, *self.self_attention.keys_values(normed), mask))
        return x + self.dropout(self.feed_forward(self.norm_feed_forward(x)))


class TransformerEncoder(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        n_heads: int,
        ff_dim: int,
        n_layers: int,
        dropout: float,
        activation: str,
    ) -> None:
        super().__init__()
        d_model = embedding.embedding_dim
        self.embedding = embedding  # may be the decoder's too (model.share_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, ff_dim, dropout, activation) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, None]:
        """h [B,S,d], zero at padding; no final state (the `Seq2Seq` encoder interface has a slot for one)."""
        real = real_token_mask(src_lengths, src.size(1), src.device)  # [B,S]
        mask = real[:, None, None, :]  # [B,1,1,S]: every head and query sees the real keys only
        x = self.dropout(embed(self.embedding, src, 0))
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x).masked_fill(~real.unsqueeze(-1), 0.0), None


# ---------------------------------------------------------------------------------------------------------
# What the decoder reads and keeps. The memory is batch-first like the GRU models' (beam search reorders it
# with `model.select_rows`); the cache is layer-major with the batch on dim 1 like a GRU state [L,B,H]
# (`model.select_state`).
# ---------------------------------------------------------------------------------------------------------


class TransformerMemory(NamedTuple):
    keys: Tensor  # h W^K of every decoder layer's cross-attention [B,L,h,S,d_k]
    values: Tensor  # h W^V [B,L,h,S,d_k]
    mask: Tensor  # [B,1,1,S] True at real source tokens


# Positions a cache's buffers grow by when a decoding step needs room (see DecoderCache.with_room).
CACHE_GROWTH = 16


class DecoderCache(NamedTuple):
    """Each layer's self-attention keys and values of the `length` positions decoded so far, held at the front
    of buffers with room for more: a decoding step writes its position in place, where concatenating would
    copy the whole cache once per layer and again to stack the layers. A cache is consumed by the call it is
    given to (that call writes into its buffers); use the cache the call returns. With gradients on, a call
    never writes into a cache's buffers: it returns a new cache of exactly `length` positions."""

    keys: Tensor  # [L,B,h,capacity,d_k], positions 0..length-1 filled
    values: Tensor  # [L,B,h,capacity,d_k]
    length: int  # t: positions decoded so far, so the next token sits at position t

    def select(self, index: Tensor) -> DecoderCache:
        """Rows `index` (repeats allowed), as beam search reorders and drops them: one copy per buffer."""
        return DecoderCache(self.keys.index_select(1, index), self.values.index_select(1, index), self.length)

    def with_room(self, n_new: int) -> DecoderCache:
        """This cache in buffers that hold n_new more positions; new buffers only when these are full."""
        needed = self.length + n_new
        if self.keys.size(3) >= needed:
            return self
        shape = (*self.keys.shape[:3], needed + CACHE_GROWTH, self.keys.size(4))
        keys, values = self.keys.new_empty(shape), self.values.new_empty(shape)
        keys[:, :, :, : self.length] = self.keys[:, :, :, : self.length]
        values[:, :, :, : self.length] = self.values[:, :, :, : self.length]
        return DecoderCache(keys, values, self.length)


# ---------------------------------------------------------------------------------------------------------
# Decoder: y = y + dropout(SelfAttn(LN(y))); y = y + dropout(CrossAttn(LN(y), h)); y = y + dropout(FFN(LN(y)))
# ---------------------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff_dim: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.norm_self_attention = nn.LayerNorm(d_model)
        self.self_attention = MultiHeadAttention(d_model, n_heads)
        self.norm_cross_attention = nn.LayerNorm(d_model)
        self.cross_attention = MultiHeadAttention(d_model, n_heads)
        self.norm_feed_forward = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, ff_dim, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        cached: tuple[Tensor, Tensor] | None,
        n_cached: int,
        source: tuple[Tensor, Tensor],
        source_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """y [B,T,d] at positions t..t+T-1 (t = n_cached); source cross-attention keys and values [B,h,S,d_k].
        `cached`: this layer's self-attention key and value buffers [B,h,capacity,d_k] holding positions
        0..t-1; None when nothing is cached (t = 0, as under teacher forcing). Positions t..t+T-1 are written
        into the buffers (`_writes_in_place`), or else joined to a copy of positions 0..t-1. Returns y and
        the self-attention keys and values of positions 0..t+T-1."""
        normed = self.norm_self_attention(y)
        keys, values = self.self_attention.keys_values(normed)
        if cached is not None:
            end = n_cached + y.size(1)
            if _writes_in_place():
                cached[0][:, :, n_cached:end] = keys
                cached[1][:, :, n_cached:end] = values
                keys, values = cached[0][:, :, :end], cached[1][:, :, :end]
            else:
                keys = torch.cat((cached[0][:, :, :n_cached], keys), dim=2)
                values = torch.cat((cached[1][:, :, :n_cached], values), dim=2)
        mask, is_causal = _causal_mask(y.size(1), n_cached, y.device)
        y = y + self.dropout(self.self_attention(normed, keys, values, mask, is_causal))
        y = y + self.dropout(self.cross_attention(self.norm_cross_attention(y), *source, source_mask))
        y = y + self.dropout(self.feed_forward(self.norm_feed_forward(y)))
        return y, keys, values


def _writes_in_place() -> bool:
    """Whether a decoding step may write into the cache's buffers: only with gradients off. With them on,
    attention has saved views of those buffers for backward, and an in-place write would make backward fail
    (or, worse, use the overwritten values)."""
    return not torch.is_grad_enabled()


def _causal_mask(n_new: int, n_cached: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for n_new queries after n_cached positions: new position i sees keys <= n_cached + i.

    One new token sees everything (a decoding step: no mask); a whole target from the start is SDPA's own
    is_causal (which lets the GPU use its fastest kernel); anything else gets an explicit mask.
    """
    if n_new == 1:
        return None, False
    if n_cached == 0:
        return None, True
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool, device=device).tril(n_cached), False


class TransformerDecoder(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        n_heads: int,
        ff_dim: int,
        n_layers: int,
        dropout: float,
        activation: str,
        tie_output: bool,
    ) -> None:
        super().__init__()
        d_model = embedding.embedding_dim
        self.n_heads = n_heads
        self.embedding = embedding  # may be the encoder's too (model.share_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, ff_dim, dropout, activation) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.W_o = nn.Linear(d_model, embedding.num_embeddings)  # the bias b_o stays its own even when tied
        nn.init.zeros_(self.W_o.bias)
        if tie_output:
            self.W_o.weight = self.embedding.weight  # W_o = E: one [V,d] matrix, two uses
        else:
            nn.init.xavier_uniform_(self.W_o.weight)

    def start(self, outputs: Tensor, final: None, mask: Tensor) -> tuple[TransformerMemory, DecoderCache]:
        """The cross-attention keys and values of h for every layer, once per batch, and an empty cache."""
        projected = [layer.cross_attention.keys_values(outputs) for layer in self.layers]
        keys = torch.stack([k for k, _ in projected], dim=1)  # [B,L,h,S,d_k]
        values = torch.stack([v for _, v in projected], dim=1)
        # The cache takes the projections' dtype (bf16 under autocast), so appending to it never up-casts.
        batch, d_k = outputs.size(0), keys.size(-1)
        empty = keys.new_zeros((len(self.layers), batch, self.n_heads, 0, d_k))
        return TransformerMemory(keys, values, mask[:, None, None, :]), DecoderCache(empty, empty, 0)

    def forward(
        self, tokens: Tensor, cache: DecoderCache, memory: TransformerMemory
    ) -> tuple[Tensor, DecoderCache]:
        """Logits [B,T,V] for tokens [B,T] at positions t..t+T-1 (t = cache.length), and the longer cache.

        Every position runs in parallel: T = the whole target under teacher forcing, T = 1 when decoding.
        """
        y = self.dropout(embed(self.embedding, tokens, cache.length))
        in_place = cache.length > 0 and _writes_in_place()
        if in_place:
            cache = cache.with_room(tokens.size(1))
        layer_keys, layer_values = [], []
        for index, layer in enumerate(self.layers):
            cached = (cache.keys[index], cache.values[index]) if cache.length else None
            source = (memory.keys[:, index], memory.values[:, index])
            y, keys, values = layer(y, cached, cache.length, source, memory.mask)
            layer_keys.append(keys)
            layer_values.append(values)
        logits, length = self.W_o(self.norm(y)), cache.length + tokens.size(1)
        if in_place:  # the layers wrote into the cache's buffers
            return logits, cache._replace(length=length)
        return logits, DecoderCache(torch.stack(layer_keys), torch.stack(layer_values), length)
