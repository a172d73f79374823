"""data/processed: the tokenizers and token-id splits that `preprocess` writes and later stages read.

Layout (this module is the one place that knows it):

    data/processed/
      src_tokenizer.json   Hugging Face `tokenizers` file for the source side
      tgt_tokenizer.json   ... and the target side (joint vocab: the same tokenizer saved twice)
      encoded/<split>/     token ids of train, validation and test as flat .npy arrays
                           (`pipeline.network.encoded`: memory-mapped by training workers, no special tokens)
      text/<split>.arrow   the cleaned text of validation and test (references for BLEU, sources to translate)
      meta.json            languages, vocab sizes, tokenizer kind, id dtype, pairs and unk rate per split

Written a batch at a time (memory: one batch plus the tokenizers), read by memory-mapping.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from pipeline.config import SPLITS
from pipeline.data.arrow_text import read_texts
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, read_json_object, write_json
from pipeline.network.encoded import EncodedSplit, EncodedSplitWriter, flatten_ids, id_dtype
from pipeline.network.tokenization import UNK_ID, encode_texts, load_tokenizer
from pipeline.paths import PROCESSED_DIR

if TYPE_CHECKING:  # later stages read data/processed without knowing data/prepared
    from pipeline.data.prepared import PreparedData

logger = logging.getLogger(__name__)

SRC_TOKENIZER = "src_tokenizer.json"
TGT_TOKENIZER = "tgt_tokenizer.json"
ENCODED_DIR = "encoded"
TEXT_DIR = "text"
TEXT_SPLITS = ("validation", "test")  # the splits later stages need as text
META = "meta.json"


@dataclass(frozen=True)
class ProcessedData:
    """data/processed, checked: tokenizers and meta loaded, splits opened (mapped) on demand."""

    path: Path
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    meta: dict[str, Any]

    @property
    def src_vocab_size(self) -> int:
        return int(self.meta["src_vocab_size"])

    @property
    def tgt_vocab_size(self) -> int:
        return int(self.meta["tgt_vocab_size"])

    def split_dir(self, split: str) -> Path:
        return self.path / ENCODED_DIR / split

    def encoded(self, split: str) -> EncodedSplit:
        """A split's token ids, memory-mapped."""
        return EncodedSplit.open(self.split_dir(split))

    def texts(self, split: str) -> tuple[list[str], list[str]]:
        """(sources, references) of validation or test as cleaned, untokenized text."""
        return read_texts(self.path / TEXT_DIR / f"{split}.arrow")

    def pairs(self, split: str) -> int:
        return int(self.meta["pairs"][split])


# A batch of encoded pairs, flat: (source ids, source lengths, target ids, target lengths).
FlatBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# Split name -> its encoded batches in order: how an engine encodes (in this process, or Ray Data's actors).
SplitEncoder = Callable[[str], Iterable[FlatBatch]]


def local_encoder(prepared: PreparedData, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer) -> SplitEncoder:
    """Encode in this process, one Arrow batch of data/prepared at a time."""
    dtype = id_dtype(max(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size()))

    def encode(split: str) -> Iterator[FlatBatch]:
        for sources, targets in prepared.text_batches(split):
            src = flatten_ids(encode_texts(src_tokenizer, sources), dtype)
            tgt = flatten_ids(encode_texts(tgt_tokenizer, targets), dtype)
            yield src[0], src[1], tgt[0], tgt[1]

    return encode


def write_processed(
    target: Path,
    prepared: PreparedData,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    meta: dict[str, Any],
    encoder: SplitEncoder | None = None,
) -> dict[str, Any]:
    """Encode every split of `prepared` into a temporary folder that replaces `target` once complete;
    `encoder` (default: `local_encoder`) gives each split's encoded batches in order.

    Returns the meta.json written: `meta` plus the id dtype and, per split, pairs and unk rates.
    """
    encoder = encoder or local_encoder(prepared, src_tokenizer, tgt_tokenizer)
    vocab = max(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size())
    dtype = id_dtype(vocab)
    meta = {**meta, "id_dtype": dtype.name, "pairs": {}, "unk_rate": {}}
    with atomic_dir(target) as tmp:
        src_tokenizer.save(str(tmp / SRC_TOKENIZER))
        tgt_tokenizer.save(str(tmp / TGT_TOKENIZER))
        for name in SPLITS:
            writer = EncodedSplitWriter(tmp / ENCODED_DIR / name, dtype)
            unknown = np.zeros(2, dtype=np.int64)
            tokens = np.zeros(2, dtype=np.int64)
            for batch in encoder(name):
                written = writer.append_flat(*batch)
                unknown += [np.count_nonzero(ids == UNK_ID) for ids in written]
                tokens += [len(ids) for ids in written]
            meta["pairs"][name] = writer.close()
            meta["unk_rate"][name] = {
                side: round(float(unknown[i] / tokens[i]) if tokens[i] else 0.0, 6)
                for i, side in enumerate(("src", "tgt"))
            }
            logger.info("encoded %s: %d pairs", name, meta["pairs"][name])
        (tmp / TEXT_DIR).mkdir()
        for name in TEXT_SPLITS:
            shutil.copyfile(prepared.split_path(name), tmp / TEXT_DIR / f"{name}.arrow")
        write_json(tmp / META, meta)
    return meta


def load_processed(path: Path = PROCESSED_DIR, splits: Sequence[str] = SPLITS) -> ProcessedData:
    """Tokenizers and meta, with `splits` checked to be there; PipelineError when path is not complete."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path} not found: run `python -m pipeline preprocess` first")
    missing = [
        name
        for name in (SRC_TOKENIZER, TGT_TOKENIZER, ENCODED_DIR, TEXT_DIR, META)
        if not (path / name).exists()
    ]
    if missing:
        raise PipelineError(
            f"{path} is incomplete (missing {', '.join(missing)}): run `python -m pipeline preprocess` again"
        )
    meta = read_json_object(path / META)
    processed = ProcessedData(
        path.resolve(), load_tokenizer(path / SRC_TOKENIZER), load_tokenizer(path / TGT_TOKENIZER), meta
    )
    absent = [name for name in splits if not processed.split_dir(name).is_dir()]
    if absent or not isinstance(meta.get("pairs"), dict):
        raise PipelineError(f"{path / ENCODED_DIR} has no split {', '.join(absent)}: rerun preprocess")
    return processed
