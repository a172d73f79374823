"""The two GRU encoder-decoders, written to read top to bottom as the math; `model.py` builds them.

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

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.network.tokenization import PAD_ID

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
# with one index_select per field (`select_rows`, model.py). Every decoder state is layer-major with the
# batch on dim 1: s [L,B,H] as nn.GRU wants it (`select_state`, model.py).
# ---------------------------------------------------------------------------------------------------------


class ContextMemory(NamedTuple):
    context: Tensor  # c [B,H]: the top encoder layer's final state


class AttentionMemory(NamedTuple):
    values: Tensor  # h [B,S,2H]
    keys: Tensor  # W_k h [B,S,A]
    mask: Tensor  # [B,S] True at real source tokens


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
