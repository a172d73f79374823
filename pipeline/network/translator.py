"""Text in, text out: what users, the evaluate stage and the served MLflow model all call.

A sentence goes through the same steps as training text did: the prepare stage's cleaning (`clean_text`:
NFC, control characters removed, whitespace collapsed), the source tokenizer, </s> appended
(`source_tensor`), then decoding and detokenization. Sentences are decoded in batches of similar length
(little padding, and beam search stops each batch once its longest sentence is done) and returned in the
caller's order.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import MAX_BEAM_SIZE, EvaluateConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import source_tensor
from pipeline.network.decoding import decode_batch
from pipeline.network.model_files import LoadedModel, load_model_dir
from pipeline.network.scoring import CorpusScores, score_corpus
from pipeline.network.tokenization import clean_text, decode_ids, encode_texts
from pipeline.progress import Progress

logger = logging.getLogger(__name__)

DEVICE_ENV = "PIPELINE_DEVICE"  # auto | cpu | cuda: where the served model and `translate` run
# What one request (a `translate` run, one call of the served model) may ask for: decoding time grows with
# both, and one 20,000-word line held a worker for minutes. Longer sentences are cut, more are refused.
MAX_INPUT_TOKENS_ENV = "PIPELINE_MAX_INPUT_TOKENS"
MAX_SENTENCES_ENV = "PIPELINE_MAX_SENTENCES"
DEFAULT_MAX_INPUT_TOKENS = 256  # subword tokens per sentence: well above what training kept (data.max_tokens)
DEFAULT_MAX_SENTENCES = 1000  # sentences per request: a standard test set (Multi30k's 1,000) in one go
# A sentence is cut to max_tokens x this many characters before it is tokenized: the tokenizer's memory
# grows with the text it is given (one 50 MB line took 9.5 GB), not with the tokens kept. A subword token
# spans a few characters, so a sentence cut here is one the token cut shortens anyway, unless its words
# average over this many characters (a base64 blob); the warning names it either way.
CHARS_PER_INPUT_TOKEN = 64
_LISTED = 10  # sentence numbers a truncation warning lists before "and N more"
# On a GPU, batches are cut by padded source tokens (count x longest, times the beam), not by count:
# short sentences then fill the device, long ones cannot run it out of memory.
GPU_BATCH_TOKENS = 16384


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """ "auto" (the default, or $PIPELINE_DEVICE): CUDA when there is a GPU, else the CPU; "cpu" forces it,
    "cuda" (or "cuda:N") asks for a GPU. A torch.device is taken as it is (already resolved)."""
    if isinstance(name, torch.device):
        return name
    # A bad value from the environment names the variable: the user may not know it is set.
    source = f" (from ${DEVICE_ENV})" if not name and os.environ.get(DEVICE_ENV) else ""
    name = str(name or os.environ.get(DEVICE_ENV) or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Only what the model can run on: torch also knows mps, meta, cpu:0 and more, which failed later with a
    # traceback or an error blaming the weights file.
    kind, colon, index = name.partition(":")
    if name != "cpu" and not (kind == "cuda" and (not colon or index.isdigit())):
        raise PipelineError(f"unknown device {name!r}{source}: use auto, cpu or cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            f"device {name!r}{source} asked for, but torch sees no CUDA GPU here (use auto or cpu)"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(
            f"device {name!r}{source} asked for, but torch sees {torch.cuda.device_count()} GPU(s) here"
        )
    return device


def check_beam_size(beam_size: int, name: str = "beam size") -> None:
    """Within the bounds evaluate.beam_size has: a beam's memory and time grow with its width."""
    if not 1 <= beam_size <= MAX_BEAM_SIZE:
        raise PipelineError(f"{name} must be from 1 to {MAX_BEAM_SIZE}, got {beam_size}")


@dataclass(frozen=True)
class InputBounds:
    """Per request: source tokens per sentence (longer ones are cut) and sentences (more are refused)."""

    max_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    max_sentences: int = DEFAULT_MAX_SENTENCES

    @classmethod
    def resolve(cls, max_tokens: int | None = None, max_sentences: int | None = None) -> InputBounds:
        """Given values (`translate`'s options) first, then $PIPELINE_MAX_INPUT_TOKENS and
        $PIPELINE_MAX_SENTENCES (how a served model is set), then the defaults."""
        return cls(
            _bound(max_tokens, "--max-input-tokens", MAX_INPUT_TOKENS_ENV, DEFAULT_MAX_INPUT_TOKENS),
            _bound(max_sentences, "--max-sentences", MAX_SENTENCES_ENV, DEFAULT_MAX_SENTENCES),
        )

    def check_count(self, count: int, unit: str) -> None:
        if count > self.max_sentences:
            raise PipelineError(
                f"over {self.max_sentences} {unit}s in one request: give at most {self.max_sentences}"
                f" (translate --max-sentences, ${MAX_SENTENCES_ENV} for a served model) or split the input"
            )

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_INPUT_TOKEN

    def cut_texts(self, sentences: Sequence[str]) -> list[str]:
        """Each sentence's first max_chars characters: what the tokenizer is given, so that its memory stays
        bounded whatever the length of a line."""
        return [sentence[: self.max_chars] for sentence in sentences]

    def cut(
        self,
        source_ids: list[list[int]],
        unit: str,
        first_number: int = 1,
        text_lengths: Sequence[int] = (),
    ) -> list[list[int]]:
        """Each sentence's first max_tokens ids; a warning names the sentences cut (numbered from
        `first_number`), also those `cut_texts` shortened (`text_lengths`: their lengths before)."""
        lengths = list(text_lengths) or [0] * len(source_ids)
        long = [
            number
            for number, (ids, chars) in enumerate(zip(source_ids, lengths, strict=True), start=first_number)
            if len(ids) > self.max_tokens or chars > self.max_chars
        ]
        if not long:
            return source_ids
        listed = ", ".join(map(str, long[:_LISTED]))
        if len(long) > _LISTED:
            listed += f" and {len(long) - _LISTED} more"
        logger.warning(
            "%s %s: over %d tokens, only the first %d translated (translate --max-input-tokens, $%s for a"
            " served model)",
            unit if len(long) == 1 else f"{unit}s",
            listed,
            self.max_tokens,
            self.max_tokens,
            MAX_INPUT_TOKENS_ENV,
        )
        return [ids[: self.max_tokens] for ids in source_ids]


def _bound(given: int | None, option: str, env: str, default: int) -> int:
    if given is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        option = f"${env}"
        try:
            given = int(text)
        except ValueError:
            raise PipelineError(f"{option} must be a positive integer, got {text!r}") from None
    if given < 1:
        raise PipelineError(f"{option} must be a positive integer, got {given}")
    if given > sys.maxsize:  # Python's slicing and counting of lines take no larger number
        raise PipelineError(f"{option} must be at most {sys.maxsize}, got {given}")
    return given


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """No TF32 while decoding on a GPU: cuDNN's GRU and float32 matrix products may use it by default,
    and its 10-bit mantissa turns near-ties in greedy and beam choices into different words from the
    CPU's. Decoding is latency-bound, so full float32 costs little; the previous settings come back."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """(start, end) slices of `lengths` (sorted longest first) whose padded size stays within max_tokens."""
    slices, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and lengths[start] * (end - start + 1) <= max_tokens:
            end += 1
        slices.append((start, end))
        start = end
    return slices


class Translator:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        length_penalty: float | None = None,
        max_len_ratio: float | None = None,
        device: str | torch.device | None = "cpu",
        batch_tokens: int | None = None,
        bounds: InputBounds | None = None,
    ) -> None:
        """Decoding settings default to the model folder's decoding.json; evaluate may override them.
        `device` None or "auto" picks CUDA when present; `batch_tokens` (default: GPU_BATCH_TOKENS on a
        GPU, none on the CPU) cuts batches by padded tokens instead of by count. `bounds`: what one call
        of `translate` may ask for (None: anything, for evaluate's own test split)."""
        self.loaded = loaded
        self.bounds = bounds
        self.device = resolve_device(device)
        self.batch_tokens = (
            GPU_BATCH_TOKENS if batch_tokens is None and self.device.type == "cuda" else batch_tokens
        )
        self.model = loaded.model.to(self.device).eval()
        self.beam_size: int = loaded.decoding["beam_size"]
        self.length_penalty = loaded.decoding["length_penalty"] if length_penalty is None else length_penalty
        self.max_len_ratio = loaded.decoding["max_len_ratio"] if max_len_ratio is None else max_len_ratio

    @classmethod
    def from_dir(
        cls, path: Path | str, device: str | torch.device | None = "cpu", bounds: InputBounds | None = None
    ) -> Translator:
        device = resolve_device(device)
        return cls(load_model_dir(path, device=device), device=device, bounds=bounds)

    def translate(
        self,
        sentences: Sequence[str],
        beam_size: int | None = None,
        batch_size: int = 64,
        unit: str = "sentence",
        first_number: int = 1,
    ) -> list[str]:
        """One translation per sentence, in order; an empty (or all-whitespace) sentence gives "".

        `unit` is what messages call an input ("stdin line", "argument"), numbered from `first_number`
        (a later chunk of a stream goes on counting)."""
        beam_size = self.beam_size if beam_size is None else beam_size
        check_beam_size(beam_size)
        if batch_size < 1:
            raise PipelineError(f"batch size must be at least 1, got {batch_size}")
        text_lengths = [len(sentence) for sentence in sentences]
        if self.bounds is not None:
            self.bounds.check_count(len(sentences), unit)
            sentences = self.bounds.cut_texts(sentences)
        for number, sentence in enumerate(sentences, start=first_number):
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: an undecodable byte, or a "\ud800" escape
                raise PipelineError(
                    f"{unit} {number}: not valid text (\\u{ord(sentence[error.start]):04x} at position"
                    f" {error.start}); give UTF-8"
                ) from None
        cleaned = [clean_text(sentence) for sentence in sentences]
        source_ids = encode_texts(self.loaded.src_tokenizer, cleaned)
        if self.bounds is not None:
            source_ids = self.bounds.cut(source_ids, unit, first_number, text_lengths)
        translations = [""] * len(cleaned)
        # Longest first: the first batch shows the worst-case memory at once, not at the end.
        order = sorted((i for i, ids in enumerate(source_ids) if ids), key=lambda i: -len(source_ids[i]))
        progress = Progress(len(order), "translating")
        if self.batch_tokens:
            padded = [(len(source_ids[i]) + 1) * beam_size for i in order]
            slices = token_batches(padded, self.batch_tokens)
        else:
            slices = [(start, start + batch_size) for start in range(0, len(order), batch_size)]
        with exact_float32(self.device):
            for start, end in slices:
                indices = order[start:end]
                src, lengths = source_tensor([source_ids[i] for i in indices])
                hypotheses = decode_batch(
                    self.model,
                    src.to(self.device),
                    lengths,
                    beam_size=beam_size,
                    length_penalty=self.length_penalty,
                    max_len_ratio=self.max_len_ratio,
                )
                texts = decode_ids(self.loaded.tgt_tokenizer, hypotheses)
                for index, text in zip(indices, texts, strict=True):
                    translations[index] = text
                progress.update(len(indices))
        progress.close()
        return translations


def translate_and_score(
    loaded: LoadedModel,
    sources: Sequence[str],
    references: Sequence[str],
    settings: EvaluateConfig,
    device: str | torch.device | None = None,
) -> tuple[list[str], CorpusScores]:
    """Beam search with the evaluate settings, then BLEU and chrF with their signatures: what evaluate, the
    gate and the torch-only GPU benchmark use."""
    translator = Translator(
        loaded,
        length_penalty=settings.length_penalty,
        max_len_ratio=settings.max_len_ratio,
        device=device or settings.device,
    )
    hypotheses = translator.translate(
        list(sources), beam_size=settings.beam_size, batch_size=settings.batch_size
    )
    return hypotheses, score_corpus(hypotheses, references)
