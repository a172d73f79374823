"""Stage `preprocess`: data/prepared -> tokenizers trained on train, every split encoded -> data/processed.

With `train.init_from` set (continued training) no tokenizer is trained: the parent model's are used as they
are, so the encoded ids index its embeddings; meta.json's `tokenizers_from` names where they came from.

Tokenizers see the training split only (all of it, or a seeded random sample of
`preprocess.tokenizer_sample` pairs), so validation/test unknown-token rates (in meta.json) are honest.
Text streams from data/prepared's Arrow files a batch at a time, into the tokenizer trainer and
then through `encode_batch` into data/processed: memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pipeline import paths
from pipeline.config import PipelineConfig, PreprocessConfig, check_init_from_pinned
from pipeline.data.prepared import PreparedData, load_prepared
from pipeline.data.processed import SplitEncoder, write_processed
from pipeline.files import check_output_place
from pipeline.network.model_files import SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE
from pipeline.network.tokenization import load_tokenizer, lowercases, train_tokenizer

logger = logging.getLogger(__name__)

SAMPLE_SEED = 0  # the tokenizer sample is a property of the data, not of any other seed


def run(config: PipelineConfig) -> None:
    check_init_from_pinned(config.train)
    check_output_place(paths.PROCESSED_DIR, folder=True)  # before the tokenizers are trained
    init_from = config.train.init_from
    # A continued run keeps its parent's vocabulary: its embeddings have one row per token of those
    # tokenizers. Byte fallback spells a character they never saw in bytes, so a grown corpus loses none.
    parent = parent_tokenizers(init_from) if init_from is not None else None
    prepared = load_prepared(paths.PREPARED_DIR, config.data)
    src_tokenizer, tgt_tokenizer = parent or train_tokenizers(prepared, config.preprocess)
    with _encoder(config, prepared, src_tokenizer, tgt_tokenizer) as encoder:
        meta = _write(config, prepared, src_tokenizer, tgt_tokenizer, encoder)
    logger.info(
        "%s tokenizers (vocab src %d, tgt %d%s) -> %s; test unk rate src %.2f%%, tgt %.2f%%",
        meta["tokenizer"],
        meta["src_vocab_size"],
        meta["tgt_vocab_size"],
        ", joint" if meta["joint_vocab"] else "",
        paths.PROCESSED_DIR,
        100 * meta["unk_rate"]["test"]["src"],
        100 * meta["unk_rate"]["test"]["tgt"],
    )


def _write(
    config: PipelineConfig,
    prepared: PreparedData,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    encoder: SplitEncoder | None,
) -> dict:
    init_from = config.train.init_from
    if init_from is None:
        tokenizers: dict[str, Any] = {
            "tokenizer": config.preprocess.tokenizer,
            "joint_vocab": config.preprocess.joint_vocab,
            "lowercase": config.preprocess.lowercase,
            "tokenizer_sample": config.preprocess.tokenizer_sample,
        }
    else:  # what the parent's tokenizers are, read from them: preprocess's keys did not make them
        tokenizers = {
            "tokenizer": tokenizer_kind(tgt_tokenizer),
            "joint_vocab": src_tokenizer.to_str() == tgt_tokenizer.to_str(),
            "lowercase": lowercases(tgt_tokenizer),
            "tokenizer_sample": None,
            "tokenizers_from": init_from,
        }
    return write_processed(
        paths.PROCESSED_DIR,
        prepared,
        src_tokenizer,
        tgt_tokenizer,
        {
            "src_lang": config.data.src_lang,
            "tgt_lang": config.data.tgt_lang,
            "src_vocab_size": src_tokenizer.get_vocab_size(),
            "tgt_vocab_size": tgt_tokenizer.get_vocab_size(),
            **tokenizers,
            "hub": prepared.hub,  # carried forward: the training run logs it as its dataset's source
        },
        encoder,
    )


def parent_tokenizers(init_from: str) -> tuple[Tokenizer, Tokenizer]:
    """The source and target tokenizers of the model `train.init_from` names."""
    from pipeline.tracking.parent import parent_model_dir  # MLflow only for a continued run

    with parent_model_dir(init_from) as folder:
        tokenizers = (
            load_tokenizer(folder / SRC_TOKENIZER_FILE),
            load_tokenizer(folder / TGT_TOKENIZER_FILE),
        )
    logger.info(
        "train.init_from is set: using the tokenizers of %s, not training any (preprocess.tokenizer,"
        " vocab_size, min_frequency, joint_vocab, lowercase, byte_fallback and tokenizer_sample are"
        " not used)",
        init_from,
    )
    return tokenizers


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """`bpe` or `word`, as preprocess.tokenizer names the kind, from the tokenizer's own model."""
    model_type = json.loads(tokenizer.to_str())["model"]["type"]
    return {"BPE": "bpe", "WordLevel": "word"}.get(model_type, model_type)


@contextmanager
def _encoder(
    config: PipelineConfig, prepared: PreparedData, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer
) -> Iterator[SplitEncoder | None]:
    """Who encodes, by `data.engine`: this process (None: write_processed's default) or Ray Data's actors."""
    if config.data.engine == "local":
        yield None
        return
    from pipeline.data.ray_encode import ray_encoder  # Ray only when asked for
    from pipeline.training.ray_session import ray_session

    with ray_session():
        encoder = ray_encoder(prepared, src_tokenizer, tgt_tokenizer)
        try:
            yield encoder
        finally:
            encoder.close()  # before Ray stops: a write that failed between splits leaves no execution behind


def train_tokenizers(prepared: PreparedData, config: PreprocessConfig) -> tuple[Tokenizer, Tokenizer]:
    """One tokenizer per language, or one shared by both (the same object twice) when joint_vocab."""
    n_train = prepared.pairs["train"]
    sample = (
        config.tokenizer_sample if config.tokenizer_sample and config.tokenizer_sample < n_train else None
    )
    described = f"{sample:,} sampled" if sample else f"{n_train:,}"
    if config.joint_vocab:
        logger.info("training a joint %s tokenizer on %s training pairs", config.tokenizer, described)
        joint = train_tokenizer(training_text(prepared, ("src", "tgt"), sample), config)
        return joint, joint
    logger.info("training %s tokenizers on %s training pairs", config.tokenizer, described)
    return (
        train_tokenizer(training_text(prepared, ("src",), sample), config),
        train_tokenizer(training_text(prepared, ("tgt",), sample), config),
    )


def training_text(prepared: PreparedData, sides: tuple[str, ...], sample: int | None) -> Iterator[list[str]]:
    """Batches of training sentences of `sides`; with `sample`, only a seeded random subset of the pairs."""
    chosen = None
    if sample is not None:
        chosen = np.zeros(prepared.pairs["train"], dtype=bool)
        chosen[np.random.default_rng(SAMPLE_SEED).choice(len(chosen), sample, replace=False)] = True
    start = 0
    for sources, targets in prepared.text_batches("train"):
        picked = slice(None) if chosen is None else chosen[start : start + len(sources)]
        start += len(sources)
        for side, texts in (("src", sources), ("tgt", targets)):
            if side in sides:
                yield (
                    texts
                    if chosen is None
                    else [text for text, keep in zip(texts, picked, strict=True) if keep]
                )
