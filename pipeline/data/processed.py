"""data/processed: the tokenizers and token-id splits that `preprocess` writes and later stages read.

Layout (this module is the one place that knows it):

    data/processed/
      src_tokenizer.json   Hugging Face `tokenizers` file for the source side
      tgt_tokenizer.json   ... and the target side (joint vocab: the same tokenizer saved twice)
      encoded/             DatasetDict (save_to_disk), splits train/validation/test, columns
                           src, tgt (text) and src_ids, tgt_ids (int32 token ids, no special tokens)
      meta.json            languages, vocab sizes, tokenizer kind, pairs and unk rate per split
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pipeline.config import SPLITS
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, read_json_object, write_json
from pipeline.network.tokenization import UNK_ID, encode_texts, load_tokenizer
from pipeline.paths import PROCESSED_DIR

logger = logging.getLogger(__name__)

SRC_TOKENIZER = "src_tokenizer.json"
TGT_TOKENIZER = "tgt_tokenizer.json"
ENCODED_DIR = "encoded"
META = "meta.json"
ENCODE_CHUNK = 20_000  # sentences per encode_batch call: bounds memory and paces the progress log


@dataclass(frozen=True)
class ProcessedSplit:
    """One split: the cleaned text and its token ids (no <s>/</s>; batching adds them)."""

    src: list[str]
    tgt: list[str]
    src_ids: list[list[int]]
    tgt_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


@dataclass(frozen=True)
class ProcessedData:
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    meta: dict[str, Any]
    splits: dict[str, ProcessedSplit]

    @property
    def src_vocab_size(self) -> int:
        return int(self.meta["src_vocab_size"])

    @property
    def tgt_vocab_size(self) -> int:
        return int(self.meta["tgt_vocab_size"])


def encode_split(
    name: str, src: Sequence[str], tgt: Sequence[str], src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer
) -> ProcessedSplit:
    """Encode both sides in chunks, logging progress, so a large split shows it is moving."""
    src_ids: list[list[int]] = []
    tgt_ids: list[list[int]] = []
    for start in range(0, len(src), ENCODE_CHUNK):
        end = min(start + ENCODE_CHUNK, len(src))
        src_ids.extend(encode_texts(src_tokenizer, src[start:end]))
        tgt_ids.extend(encode_texts(tgt_tokenizer, tgt[start:end]))
        logger.info("encoded %s: %d/%d pairs", name, end, len(src))
    return ProcessedSplit(list(src), list(tgt), src_ids, tgt_ids)


def unk_rate(batch_ids: Sequence[Sequence[int]]) -> float:
    """Fraction of tokens that are <unk>: how much of a split the training vocabulary cannot represent."""
    total = sum(len(ids) for ids in batch_ids)
    unknown = sum(1 for ids in batch_ids for token in ids if token == UNK_ID)
    return unknown / total if total else 0.0


def save_processed(
    target: Path,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    splits: dict[str, ProcessedSplit],
    meta: dict[str, Any],
) -> None:
    """Write the whole layout into a temporary folder that replaces `target` only once complete."""
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    text = datasets.Value("string")
    features = datasets.Features({"src": text, "tgt": text, "src_ids": ids, "tgt_ids": ids})
    encoded = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"src": split.src, "tgt": split.tgt, "src_ids": split.src_ids, "tgt_ids": split.tgt_ids},
                features=features,
            )
            for name, split in splits.items()
        }
    )
    with atomic_dir(target) as tmp:
        src_tokenizer.save(str(tmp / SRC_TOKENIZER))
        tgt_tokenizer.save(str(tmp / TGT_TOKENIZER))
        encoded.save_to_disk(str(tmp / ENCODED_DIR))
        write_json(tmp / META, meta)


def load_processed(path: Path = PROCESSED_DIR, splits: Sequence[str] = SPLITS) -> ProcessedData:
    """Tokenizers, meta and the requested splits as Python lists; PipelineError when path is not complete."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path} not found: run `python -m pipeline preprocess` first")
    missing = [
        name for name in (SRC_TOKENIZER, TGT_TOKENIZER, ENCODED_DIR, META) if not (path / name).exists()
    ]
    if missing:
        raise PipelineError(
            f"{path} is incomplete (missing {', '.join(missing)}): run `python -m pipeline preprocess` again"
        )
    meta = read_json_object(path / META)
    encoded = datasets.load_from_disk(str(path / ENCODED_DIR))
    absent = [name for name in splits if name not in encoded]
    if absent:
        raise PipelineError(f"{path / ENCODED_DIR} has no split {', '.join(absent)}: rerun preprocess")
    loaded = {}
    for name in splits:
        columns = encoded[name].to_dict()
        loaded[name] = ProcessedSplit(columns["src"], columns["tgt"], columns["src_ids"], columns["tgt_ids"])
    return ProcessedData(
        load_tokenizer(path / SRC_TOKENIZER), load_tokenizer(path / TGT_TOKENIZER), meta, loaded
    )
