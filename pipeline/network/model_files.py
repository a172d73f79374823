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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipeline.config import DECODING_KEYS, MAX_BEAM_SIZE, MAX_LEN_RATIO, ModelConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, not_a_regular_file, read_json_object, usual_permissions, write_json
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
VOCAB_SIZE_KEYS = ("src_vocab_size", "tgt_vocab_size")
MAX_VOCAB_SIZE = 2**32 - 1  # the tokenizers' ids are unsigned 32-bit integers
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
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or not 1 <= beam_size <= MAX_BEAM_SIZE:
        raise PipelineError(
            f"{source}: beam_size must be a whole number from 1 to {MAX_BEAM_SIZE}, got {beam_size!r}"
        )
    for name, value in (("length_penalty", length_penalty), ("max_len_ratio", ratio)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise PipelineError(f"{source}: {name} must be a non-negative number, got {value!r}")
    if not 0 < ratio <= MAX_LEN_RATIO:
        raise PipelineError(
            f"{source}: max_len_ratio must be above 0 and at most {MAX_LEN_RATIO:g}, got {ratio!r}"
        )
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
    _check_tokenizers_fit(
        (src_tokenizer, tgt_tokenizer),
        (model.src_vocab_size, model.tgt_vocab_size),
        ("the source tokenizer", "the target tokenizer"),
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
        usual_permissions(tmp / WEIGHTS_FILE)  # safetensors creates it owner-only; its siblings are not
        write_json(tmp / CONFIG_FILE, config)
        src_tokenizer.save(str(tmp / SRC_TOKENIZER_FILE))
        tgt_tokenizer.save(str(tmp / TGT_TOKENIZER_FILE))
        write_json(tmp / DECODING_FILE, decoding)


@dataclass(frozen=True)
class _CheckedFolder:
    model_config: ModelConfig
    vocab_sizes: tuple[int, int]  # source, target
    tokenizers: tuple[Tokenizer, Tokenizer]
    decoding: dict[str, Any]


def check_model_dir(path: Path | str) -> None:
    """Everything `load_model_dir` checks but the weights (files, settings, decoding, tokenizers), without
    reading them: for a caller that must refuse a bad folder before starting work that loads it elsewhere
    (a batch translation's model actors)."""
    _checked_folder(Path(path))


def load_model_dir(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from the folder's files alone; every failure names the file at fault."""
    path = Path(path)
    checked = _checked_folder(path)
    model_config, (src_vocab_size, tgt_vocab_size) = checked.model_config, checked.vocab_sizes
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise PipelineError(f"{weights_path} is not a readable safetensors file: {error}") from None
    try:
        # Built without memory first: weights of other shapes (or sizes no machine could allocate) are
        # refused before anything is allocated.
        with torch.device("meta"):
            shapes = build_model(model_config, src_vocab_size, tgt_vocab_size)
    except PipelineError as error:
        raise PipelineError(f"{config_path}: {error}") from None
    weights = {_plain_key(key): value for key, value in weights.items()}
    for alias, stored in tied_names(shapes).items():
        if stored in weights:  # the file holds a tied weight under its first name only
            weights.setdefault(alias, weights[stored])
    mismatch = _weights_mismatch(shapes.state_dict(), weights)
    if mismatch:
        raise PipelineError(f"{weights_path} does not match {config_path}: {mismatch}")
    model = build_model(model_config, src_vocab_size, tgt_vocab_size).to(device)
    model.load_state_dict(weights)
    model.eval()
    return LoadedModel(model, model_config, *checked.tokenizers, checked.decoding, path)


def _checked_folder(path: Path) -> _CheckedFolder:
    if not path.is_dir():
        raise PipelineError(f"model folder not found: {path}")
    missing = [name for name in MODEL_FILES if not os.path.lexists(path / name)]
    if missing:
        raise PipelineError(f"model folder {path} is incomplete: missing {', '.join(missing)}")
    for name in MODEL_FILES:  # there, but not a file: say what it is rather than call it missing
        kind = not_a_regular_file(path / name)
        if kind:
            raise PipelineError(f"{path / name} is {kind}, not a regular file: put the model's file there")

    config_path = path / CONFIG_FILE
    config = read_json_object(config_path)
    version, special_ids = config.get("format_version"), config.get("special_ids")
    if version != FORMAT_VERSION:
        raise PipelineError(f"{config_path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    if special_ids != SPECIAL_IDS:
        raise PipelineError(f"{config_path}: special ids {special_ids} differ from this code's {SPECIAL_IDS}")
    if not isinstance(config.get("model"), dict):
        raise PipelineError(f"{config_path}: 'model' must be an object of model settings")
    try:
        model_config = ModelConfig.model_validate(config["model"])
    except ValidationError as error:
        raise PipelineError(f"{config_path}: {_first_problem(error)}") from None
    src_vocab_size, tgt_vocab_size = (_vocab_size(config, key, config_path) for key in VOCAB_SIZE_KEYS)
    decoding = _check_decoding(read_json_object(path / DECODING_FILE), str(path / DECODING_FILE))

    tokenizers = []
    for name in (SRC_TOKENIZER_FILE, TGT_TOKENIZER_FILE):
        try:
            tokenizers.append(Tokenizer.from_file(str(path / name)))
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            raise PipelineError(f"{path / name} is not a valid tokenizer file: {error}") from None
    # A token id past the embedding would be an IndexError in the middle of a translation.
    _check_tokenizers_fit(
        (tokenizers[0], tokenizers[1]),
        (src_vocab_size, tgt_vocab_size),
        (str(path / SRC_TOKENIZER_FILE), str(path / TGT_TOKENIZER_FILE)),
    )
    return _CheckedFolder(
        model_config, (src_vocab_size, tgt_vocab_size), (tokenizers[0], tokenizers[1]), decoding
    )


def _first_problem(error: ValidationError) -> str:
    """A model settings error in one line (pydantic's own text adds the types and a documentation link)."""
    problems = error.errors()
    first = problems[0]
    key = ".".join(["model", *(str(part) for part in first["loc"])])
    message = first["msg"].removeprefix("Value error, ")
    shown = "" if first["type"] == "extra_forbidden" else f" (got {first.get('input')!r})"
    more = f"; and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
    return f"{key}: {message}{shown}{more}"


def _vocab_size(config: dict[str, Any], key: str, config_path: Path) -> int:
    value = config.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not len(SPECIAL_IDS) <= value <= MAX_VOCAB_SIZE
    ):
        raise PipelineError(
            f"{config_path}: {key} must be an integer from {len(SPECIAL_IDS)} to {MAX_VOCAB_SIZE:,}"
            f" (token ids are 32-bit), got {value!r}"
        )
    return value


def _check_tokenizers_fit(
    tokenizers: tuple[Tokenizer, Tokenizer], vocab_sizes: tuple[int, int], names: tuple[str, str]
) -> None:
    """Every id a tokenizer gives must have a row in the model's embedding of that side."""
    for side, tokenizer, vocab_size, name in zip(
        ("source", "target"), tokenizers, vocab_sizes, names, strict=True
    ):
        if tokenizer.get_vocab_size() > vocab_size:
            raise PipelineError(
                f"{name} has {tokenizer.get_vocab_size()} tokens, the model's {side} vocabulary"
                f" only {vocab_size}: they do not belong together"
            )


def _weights_mismatch(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str | None:
    """The first difference between the tensors the config builds and those in the file, in one line."""
    problems = [
        f"{key} is {list(weights[key].shape)} in the file, {list(tensor.shape)} by the config"
        for key, tensor in expected.items()
        if key in weights and weights[key].shape != tensor.shape
    ]
    problems += [f"{key} is missing from the file" for key in expected if key not in weights]
    problems += [f"{key} is in the file but not in the model" for key in weights if key not in expected]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")
