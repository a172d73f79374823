"""Tiny models trained on toy pairs, shared by the model, decoding and model-io tests.

Training is cached per process: the decoding and model-io tests reuse what the model tests trained.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, PreprocessConfig
from pipeline.network.batching import collate, source_tensor
from pipeline.network.decoding import greedy_decode
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import Seq2Seq, build_model
from pipeline.network.model_files import save_model_dir
from pipeline.network.tokenization import PAD_ID, encode_texts, train_tokenizer
from tests.helpers import torch_threads

Ids = Sequence[Sequence[int]]

N_SYMBOLS = 10
VOCAB_SIZE = 4 + N_SYMBOLS  # the four special ids, then symbols 4..13
# Each arch reads its own sizes: hidden_dim the GRUs, n_heads and ff_dim the Transformer.
TINY = {"emb_dim": 32, "hidden_dim": 64, "n_layers": 1, "dropout": 0.0, "n_heads": 4, "ff_dim": 64}


def reverse_pairs(n: int = 12, n_empty: int = 2, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Sources of 5-8 symbols; targets reversed, except the first `n_empty`: empty targets (</s> at once)."""
    rng = random.Random(seed)
    sources = [[rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randint(5, 8))] for _ in range(n)]
    targets = [[] if i < n_empty else source[::-1] for i, source in enumerate(sources)]
    return sources, targets


def greedy_accuracy(model: Seq2Seq, sources: Ids, targets: Ids) -> float:
    src, lengths = source_tensor(sources)
    hypotheses = greedy_decode(model, src, lengths, max_len_ratio=2.0)
    return sum(h == list(t) for h, t in zip(hypotheses, targets, strict=True)) / len(targets)


def train_until_memorised(
    model: Seq2Seq,
    sources: Ids,
    targets: Ids,
    max_steps: int = 600,
    lr: float = 1e-2,
) -> int:
    """Full-batch Adam until greedy decoding reproduces every target; returns the steps it took."""
    split = EncodedSplit.from_lists(sources, targets)
    batch = collate(split, np.arange(len(split)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch_threads(1):
        for step in range(1, max_steps + 1):
            model.train()
            logits = model(batch.src, batch.src_lengths, batch.tgt_in)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=PAD_ID
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 0 and greedy_accuracy(model, sources, targets) == 1.0:
                break
    model.eval()
    return step


@dataclass(frozen=True)
class TrainedToy:
    model: Seq2Seq
    sources: list[list[int]]
    targets: list[list[int]]
    steps: int
    seconds: float


@functools.cache
def trained_reverser(arch: str) -> TrainedToy:
    """A tiny model of `arch` that has memorised `reverse_pairs()` (empty targets included)."""
    torch.manual_seed(0)
    sources, targets = reverse_pairs()
    model = build_model(ModelConfig(arch=arch, **TINY), VOCAB_SIZE, VOCAB_SIZE)
    started = time.perf_counter()
    steps = train_until_memorised(model, sources, targets)
    return TrainedToy(model, sources, targets, steps, time.perf_counter() - started)


def random_model(arch: str, n_layers: int = 1, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Seq2Seq:
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, **{**TINY, "n_layers": n_layers})
    return build_model(config, vocab_size, vocab_size).eval()


def toy_split(n: int = 40, seed: int = 0) -> EncodedSplit:
    """n random pairs of 3-11 source and 2-13 target symbols."""
    rng = random.Random(seed)
    sources = [[rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randint(3, 11))] for _ in range(n)]
    targets = [[rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randint(2, 13))] for _ in range(n)]
    return EncodedSplit.from_lists(sources, targets)


def toy_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, **TINY), VOCAB_SIZE, VOCAB_SIZE)


def sgd(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Plain SGD: the weights move by the gradient itself, so equal updates mean equal gradients (Adam's
    first step, about lr times the gradient's sign, would magnify rounding in near-zero gradients)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# ------------------------------------------------------------ a word-level toy pair, saved as a model folder

SRC_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
TGT_WORDS = ["uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho"]
DECODING = {"beam_size": 2, "length_penalty": 1.0, "max_len_ratio": 2.0}


def word_pairs(n: int = 14, seed: int = 3) -> list[tuple[str, str]]:
    """A toy language pair: each word has one translation, and the word order is reversed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.randrange(len(SRC_WORDS)) for _ in range(rng.randint(2, 5))]
        pairs.append((" ".join(SRC_WORDS[w] for w in words), " ".join(TGT_WORDS[w] for w in reversed(words))))
    return pairs


def save_word_model(folder: Path, arch: str) -> tuple[Path, list[tuple[str, str]]]:
    """A tiny `arch` model that has memorised the toy pairs, saved with real word tokenizers."""
    pairs = word_pairs()
    tokenizer_config = PreprocessConfig(tokenizer="word", vocab_size=100)
    src_tokenizer = train_tokenizer([s for s, _ in pairs], tokenizer_config)
    tgt_tokenizer = train_tokenizer([t for _, t in pairs], tokenizer_config)
    sources = encode_texts(src_tokenizer, [s for s, _ in pairs])
    targets = encode_texts(tgt_tokenizer, [t for _, t in pairs])
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, **TINY)
    model = build_model(config, src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size())
    train_until_memorised(model, sources, targets)
    path = folder / "models"
    save_model_dir(path, model, config, src_tokenizer, tgt_tokenizer, DECODING)
    return path, pairs
