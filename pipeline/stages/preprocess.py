"""Stage `preprocess`: data/prepared -> tokenizers trained on train, every split encoded -> data/processed.

Tokenizers see the training split only, so validation/test unknown-token rates (in meta.json) are honest.
Splits are encoded in memory rather than with `Dataset.map`: map would write cache files into
data/prepared, which DVC tracks as the previous stage's output.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer

from pipeline import paths
from pipeline.config import SPLITS, PipelineConfig, PreprocessConfig
from pipeline.data.prepared import load_prepared
from pipeline.data.processed import ProcessedSplit, encode_split, save_processed, unk_rate
from pipeline.network.tokenization import train_tokenizer

logger = logging.getLogger(__name__)


def run(config: PipelineConfig) -> None:
    prepared = load_prepared(paths.PREPARED_DIR, config.data)
    src_tokenizer, tgt_tokenizer = train_tokenizers(*prepared["train"], config.preprocess)
    splits = {name: encode_split(name, *prepared[name], src_tokenizer, tgt_tokenizer) for name in SPLITS}
    meta = {
        "src_lang": config.data.src_lang,
        "tgt_lang": config.data.tgt_lang,
        "src_vocab_size": src_tokenizer.get_vocab_size(),
        "tgt_vocab_size": tgt_tokenizer.get_vocab_size(),
        "tokenizer": config.preprocess.tokenizer,
        "joint_vocab": config.preprocess.joint_vocab,
        "lowercase": config.preprocess.lowercase,
        "pairs": {name: len(split) for name, split in splits.items()},
        "unk_rate": {name: _unk_rates(split) for name, split in splits.items()},
    }
    save_processed(paths.PROCESSED_DIR, src_tokenizer, tgt_tokenizer, splits, meta)
    logger.info(
        "%s tokenizers (vocab src %d, tgt %d%s) -> %s; test unk rate src %.2f%%, tgt %.2f%%",
        config.preprocess.tokenizer,
        meta["src_vocab_size"],
        meta["tgt_vocab_size"],
        ", joint" if config.preprocess.joint_vocab else "",
        paths.PROCESSED_DIR,
        100 * meta["unk_rate"]["test"]["src"],
        100 * meta["unk_rate"]["test"]["tgt"],
    )


def train_tokenizers(src: list[str], tgt: list[str], config: PreprocessConfig) -> tuple[Tokenizer, Tokenizer]:
    """One tokenizer per language, or one shared by both (the same object twice) when joint_vocab."""
    if config.joint_vocab:
        logger.info("training a joint %s tokenizer on %d training pairs", config.tokenizer, len(src))
        joint = train_tokenizer([*src, *tgt], config)
        return joint, joint
    logger.info("training %s tokenizers on %d training pairs", config.tokenizer, len(src))
    return train_tokenizer(src, config), train_tokenizer(tgt, config)


def _unk_rates(split: ProcessedSplit) -> dict[str, float]:
    return {"src": round(unk_rate(split.src_ids), 6), "tgt": round(unk_rate(split.tgt_ids), 6)}
