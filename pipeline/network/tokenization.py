"""Text normalisation and subword (BPE) or word-level tokenizers from Hugging Face `tokenizers`, trained on
training text only.

`clean_text` is the one normalisation every text goes through: the prepare stage's corpus and every
sentence a `Translator` is given, so what users type is what the model was trained on.

Both kinds split on a metaspace ("▁" marks a preceding space) and isolate punctuation, so decoding is the
exact inverse of encoding for whitespace-normalised text: evaluation scores detokenized output against
untouched references.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pipeline.config import PreprocessConfig
from pipeline.errors import PipelineError
from pipeline.progress import on_terminal

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

# C0/C1 control characters that are not whitespace (whitespace ones such as \t become a space below),
# plus the byte-order mark, which some editors leave at the start of lines.
_CONTROL_CHARS = re.compile(
    "["
    + "".join(re.escape(chr(c)) for c in (*range(0x20), *range(0x7F, 0xA0)) if not chr(c).isspace())
    + "\ufeff]"
)


def clean_text(text: str) -> str:
    """NFC, no control characters, single spaces, no leading/trailing space."""
    text = _CONTROL_CHARS.sub("", text)
    # str.split() with no argument splits on every Unicode whitespace (tabs, NBSP, U+3000, ...).
    text = " ".join(text.split())
    return unicodedata.normalize("NFC", text)


def _new_tokenizer(config: PreprocessConfig) -> tuple[Tokenizer, trainers.Trainer]:
    if config.tokenizer == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=on_terminal(),  # the tokenizers library's own bar, on a terminal only
        )
    else:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=on_terminal(),  # the tokenizers library's own bar, on a terminal only
        )
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if config.lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str], config: PreprocessConfig) -> Tokenizer:
    tokenizer, trainer = _new_tokenizer(config)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise AssertionError(f"special token {token} must have id {expected_id}")
    if config.tokenizer == "bpe" and config.byte_fallback:
        tokenizer = with_byte_fallback(tokenizer)
    return tokenizer


BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def with_byte_fallback(tokenizer: Tokenizer) -> Tokenizer:
    """The trained BPE tokenizer, with the 256 byte tokens appended to its vocabulary and byte fallback on:
    a character never seen in training (a rare letter, a name's accent, an emoji) becomes its UTF-8 bytes
    instead of <unk>, so it survives into the model's input and, on the target side, back out of it."""
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    merges = [
        tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        for merge in spec["model"]["merges"]
    ]
    rebuilt = Tokenizer(models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True))
    rebuilt.add_special_tokens(SPECIAL_TOKENS)
    rebuilt.normalizer = tokenizer.normalizer
    rebuilt.pre_tokenizer = tokenizer.pre_tokenizer
    # Byte tokens back to characters first, then the metaspace back to spaces.
    rebuilt.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return rebuilt


def lowercases(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer lowercases its input (`preprocess.lowercase`): a model trained with it on the
    target side writes lowercase only."""
    return '"Lowercase"' in json.dumps(json.loads(tokenizer.to_str()).get("normalizer"))


def load_tokenizer(path: Path) -> Tokenizer:
    if not Path(path).is_file():
        raise PipelineError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens; batching adds <s>/</s> where the model needs them."""
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def decode_ids(tokenizer: Tokenizer, batch_ids: Sequence[Sequence[int]]) -> list[str]:
    """Detokenized text; special tokens (padding, start, end) are dropped."""
    return tokenizer.decode_batch([list(ids) for ids in batch_ids], skip_special_tokens=True)
