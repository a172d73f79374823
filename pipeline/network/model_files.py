"""The `models/` folder: everything needed to translate, and nothing pickled.

    model.safetensors     weights (safetensors: loading cannot run code, unlike torch.load of a pickle);
                          a tied weight (one parameter under several names) is stored once
    model_config.json     format version, ModelConfig fields, vocabulary sizes, special token ids
    src_tokenizer.json    Hugging Face `tokenizers` files
    tgt_tokenizer.json
    decoding.json         beam_size, length_penalty, max_len_ratio: how this model is meant to be decoded

The folder is written to a temporary sibling and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipeline.config import DECODING_KEYS, ModelConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, read_json_object, write_json
from pipeline.network.model import Seq2Seq, build_model
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
SRC_TOKENIZER_FILE = "src_tokenizer.json"
TGT_TOKENIZER_FILE = "tgt_tokenizer.json"
DECODING_FILE = "decoding.json"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE, DECODING_FILE)
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
# What DistributedDataParallel and torch.compile put in front of every state-dict key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class LoadedModel:
    model: Seq2Seq  # in eval mode
    model_config: ModelConfig
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    decoding: dict[str, Any]  # beam_size, length_penalty, max_len_ratio
    path: Path


def _plain_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{alias: stored name} for every parameter that also goes by an earlier name (the Transformer's tied
    and shared embeddings): safetensors refuses tensors that share memory, and storing a copy per name would
    write the biggest matrix of the model up to three times."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        stored = first_name.setdefault(id(parameter), name)
        if stored != name:
            aliases[name] = stored
    return aliases


def _check_decoding(decoding: dict[str, Any], source: str) -> dict[str, Any]:
    missing = [key for key in DECODING_KEYS if key not in decoding]
    unknown = sorted(set(decoding) - set(DECODING_KEYS))
    if missing or unknown:
        raise PipelineError(
            f"{source}: decoding settings need exactly {list(DECODING_KEYS)}"
            f" (missing {missing}, unknown {unknown})"
        )
    beam_size, length_penalty, ratio = (decoding[key] for key in DECODING_KEYS)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise PipelineError(f"{source}: beam_size must be a positive integer, got {beam_size!r}")
    for name, value in (("length_penalty", length_penalty), ("max_len_ratio", ratio)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise PipelineError(f"{source}: {name} must be a non-negative number, got {value!r}")
    if ratio <= 0:
        raise PipelineError(f"{source}: max_len_ratio must be positive, got {ratio!r}")
    return {"beam_size": beam_size, "length_penalty": float(length_penalty), "max_len_ratio": float(ratio)}


def save_model_dir(
    path: Path,
    model: Seq2Seq,
    model_config: ModelConfig,
    src_tokenizer: Tokenizer,
    tgt_tokenizer: Tokenizer,
    decoding: dict[str, Any],
) -> None:
    """Write the model folder atomically. Pass the plain module (unwrap DDP / torch.compile first)."""
    decoding = _check_decoding(decoding, "save_model_dir")
    for side, tokenizer, vocab_size in (
        ("source", src_tokenizer, model.src_vocab_size),
        ("target", tgt_tokenizer, model.tgt_vocab_size),
    ):
        if tokenizer.get_vocab_size() > vocab_size:
            raise PipelineError(
                f"the {side} tokenizer has {tokenizer.get_vocab_size()} tokens, the model's {side} vocabulary"
                f" only {vocab_size}: they do not belong together"
            )
    # safetensors refuses shared or strided storage: store plain, contiguous CPU copies, a tied weight once.
    aliases = tied_names(model)
    weights = {
        _plain_key(k): v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if k not in aliases
    }
    config = {
        "format_version": FORMAT_VERSION,
        "model": model_config.model_dump(mode="json"),
        "src_vocab_size": model.src_vocab_size,
        "tgt_vocab_size": model.tgt_vocab_size,
        "special_ids": SPECIAL_IDS,
    }
    with atomic_dir(Path(path)) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        src_tokenizer.save(str(tmp / SRC_TOKENIZER_FILE))
        tgt_tokenizer.save(str(tmp / TGT_TOKENIZER_FILE))
        write_json(tmp / DECODING_FILE, decoding)


def load_model_dir(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from the folder's files alone; every failure names the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"model folder not found: {path}")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise PipelineError(f"model folder {path} is incomplete: missing {', '.join(missing)}")

    config_path = path / CONFIG_FILE
    config = read_json_object(config_path)
    version, special_ids = config.get("format_version"), config.get("special_ids")
    if version != FORMAT_VERSION:
        raise PipelineError(f"{config_path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    if special_ids != SPECIAL_IDS:
        raise PipelineError(f"{config_path}: special ids {special_ids} differ from this code's {SPECIAL_IDS}")
    try:
        model_config = ModelConfig.model_validate(config.get("model"))
        src_vocab_size, tgt_vocab_size = int(config["src_vocab_size"]), int(config["tgt_vocab_size"])
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        raise PipelineError(f"{config_path}: invalid model configuration: {error}") from None
    decoding = _check_decoding(read_json_object(path / DECODING_FILE), str(path / DECODING_FILE))

    weights_path = path / WEIGHTS_FILE
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise PipelineError(f"{weights_path} is not a readable safetensors file: {error}") from None
    try:
        model = build_model(model_config, src_vocab_size, tgt_vocab_size).to(device)
    except PipelineError as error:
        raise PipelineError(f"{config_path}: {error}") from None
    weights = {_plain_key(key): value for key, value in weights.items()}
    for alias, stored in tied_names(model).items():
        if stored in weights:  # the file holds a tied weight under its first name only
            weights.setdefault(alias, weights[stored])
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise PipelineError(f"{weights_path} does not match {config_path}: {error}") from None
    model.eval()

    tokenizers = []
    for name in (SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE):
        try:
            tokenizers.append(Tokenizer.from_file(str(path / name)))
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            raise PipelineError(f"{path / name} is not a valid tokenizer file: {error}") from None
    return LoadedModel(model, model_config, tokenizers[0], tokenizers[1], decoding, path)
