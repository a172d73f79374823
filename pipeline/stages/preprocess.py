"""Stage `preprocess`: data/prepared -> tokenizers trained on train, every split encoded -> data/processed.

Tokenizers see the training split only, so validation/test unknown-token rates (in meta.json) are honest.
Splits are encoded in memory rather than with `Dataset.map`: map would write cache files into
data/prepared, which DVC tracks as the previous stage's output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer

from pipeline import paths
from pipeline.config import SPLITS, DataConfig, PipelineConfig, PreprocessConfig
from pipeline.data.encoded import ProcessedSplit, encode_split, save_processed, unk_rate
from pipeline.data.tokenization import train_tokenizer
from pipeline.errors import PipelineError
from pipeline.stages.prepare import CORPUS_INFO

logger = logging.getLogger(__name__)

Texts = dict[str, tuple[list[str], list[str]]]  # split -> (source sentences, target sentences)


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


def load_prepared(path: Path, data: DataConfig) -> Texts:
    """The prepare stage's output as lists of text; PipelineError when missing or made for other languages."""
    import datasets

    path = Path(path)
    info_path = path / CORPUS_INFO
    if not path.is_dir():
        raise PipelineError(f"{path} not found: run `python -m pipeline prepare` first")
    if not info_path.is_file():
        raise PipelineError(
            f"{path} is incomplete (no {CORPUS_INFO}): run `python -m pipeline prepare` again"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if (info.get("src_lang"), info.get("tgt_lang")) != (data.src_lang, data.tgt_lang):
        raise PipelineError(
            f"{path} holds {info.get('src_lang')}->{info.get('tgt_lang')} but params say "
            f"{data.src_lang}->{data.tgt_lang}: run `python -m pipeline prepare` again"
        )
    dataset = datasets.load_from_disk(str(path))
    texts: Texts = {}
    for name in SPLITS:
        if name not in dataset or {"src", "tgt"} - set(dataset[name].column_names):
            raise PipelineError(
                f"{path} has no {name} split with src/tgt columns: run `python -m pipeline prepare`"
            )
        columns = dataset[name].to_dict()
        texts[name] = (columns["src"], columns["tgt"])
    if not texts["train"][0]:
        raise PipelineError(f"{path}: the train split is empty: run `python -m pipeline prepare` again")
    return texts


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
