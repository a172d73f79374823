"""The configuration's schema: params.yaml's sections as typed, frozen pydantic models, validated strictly,
and errors that name each key's file and line. Reading and editing the file is `pipeline.params_file`.

Every section is keyed by the DVC stage that reads it, so `dvc.yaml` can list exactly the keys a stage
depends on. Unknown keys are refused (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import PipelineError

DEFAULT_PARAMS_PATH = Path("params.yaml")
SPLITS = ("train", "validation", "test")
# The evaluate keys that say how a model is decoded: a model folder's decoding.json holds exactly these.
DECODING_KEYS = ("beam_size", "length_penalty", "max_len_ratio")
# Their bounds, one definition for evaluate's settings, a model folder's decoding.json and `translate
# --beam-size`: a beam's memory and time grow with its width, and a sentence's decoding steps with the ratio
# (a beam of 100,000 or a ratio of 1e300 ran until killed).
MAX_BEAM_SIZE = 64
MAX_LEN_RATIO = 10.0
# Seeds go to numpy's and Optuna's generators, which take 0 to 2**32 - 1 only.
SEED_MAX = 2**32 - 1
# The suffixes that name a whole split's file in a corpus folder (`train.tsv` holds both sides), besides the
# two languages' own suffixes (`train.en`, `train.de`); `.gz` may follow a language's suffix.
FOLDER_FILE_KINDS = ("tsv", "jsonl", "parquet")
# The fewest target tokens an optimizer update may give each of its micro-batches (one short sentence): the
# smallest train.batch_size, and per micro-batch of a global batch cut over workers and accumulation.
MIN_MICRO_BATCH_TOKENS = 16


def _seed(default: int) -> Any:
    return Field(default, ge=0, le=SEED_MAX)


class _Section(BaseModel):
    # strict: a value is taken as the type YAML gives it, never converted ("64" is a string, 1 is not true,
    # true is not 1); a float key still takes a whole number. No float key takes .inf or .nan: an infinite
    # penalty or ratio would be written into reports and model folders that later refuse to load.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class BuiltinCorpusConfig(_Section):
    n_pairs: int = Field(20_000, ge=10, le=5_000_000)
    seed: int = _seed(13)
    # Sentences joined into one pair: 3 gives news-like lengths (mean ~36 tokens) for scale tests.
    sentences_per_pair: int = Field(1, ge=1, le=8)


class DataConfig(_Section):
    # builtin | hf:<dataset>[:<config>] | a local folder path
    source: str = "builtin"
    # hf: sources only: the Hub commit or tag to load. Unset, prepare resolves the current commit once and
    # records it (reports/prepare_metrics.json, MLflow's dataset inputs); set it to that commit to pin it.
    revision: str | None = Field(None, min_length=1)
    src_lang: str = Field("en", min_length=1)
    tgt_lang: str = Field("art", min_length=1)
    builtin: BuiltinCorpusConfig = BuiltinCorpusConfig()
    # Canonical split -> the name the source uses (file stem or Hub split). Unset entries are
    # auto-detected (validation: validation/valid/val/dev; test: test or the single test* name).
    split_names: dict[Literal["train", "validation", "test"], str] = Field(default_factory=dict)
    max_examples: int | None = Field(None, ge=1)
    max_tokens: int = Field(
        64, ge=1, description="drop pairs with a side longer than this (whitespace tokens)"
    )
    max_length_ratio: float = Field(4.0, ge=1.0)
    # Characters, not tokens: one "word" of a million characters (a base64 blob, a table) passes max_tokens,
    # and BPE training time grows faster than linearly in the longest word.
    max_chars: int = Field(1000, ge=1, description="drop pairs with a side longer than this (characters)")
    validation_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    seed: int = _seed(42)
    # Who runs prepare and preprocess: "local" (one process, streaming) or "ray" (Ray Data pipelines over
    # every core of every node). Both write the same files; local starts faster, so it stays the default.
    engine: Literal["local", "ray"] = "local"

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                f"{value!r} names no folder, and would read the project folder itself as a corpus: give"
                " 'builtin', 'hf:<dataset>[:<config>]' or a corpus folder such as corpus/de-en"
            )
        if value == "builtin" or value.startswith("hf:"):
            if value.startswith("hf:") and not value[3:].split(":")[0]:
                raise ValueError("'hf:' needs a dataset name, e.g. 'hf:bentrevett/multi30k'")
            return value
        if "://" in value or (":" in value.split("/")[0] and not Path(value).drive):
            raise ValueError(
                f"unknown source scheme in {value!r}: "
                "use 'builtin', 'hf:<dataset>[:<config>]' or a local folder"
            )
        return value

    @field_validator("revision")
    @classmethod
    def _revision_for_hub_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source", "")  # validated before revision: fields go in order
        if value is not None and not source.startswith("hf:"):
            raise ValueError("applies to hf: sources only (a local corpus is versioned by DVC)")
        return value

    @field_validator("src_lang", "tgt_lang")
    @classmethod
    def _not_a_file_kind(cls, value: str, info: ValidationInfo) -> str:
        """In a corpus folder `train.tsv` is a whole split's file, so a language named tsv cannot be told from
        it: the folder would seem to hold the split twice."""
        source = info.data.get("source", "")  # validated before the languages: fields go in order
        if value in FOLDER_FILE_KINDS and is_folder_source(source):
            raise ValueError(
                f"{value!r} is also the suffix of a whole split's file in a corpus folder (train.{value}"
                " holds both sides), so the folder's files cannot name that language: rename its files and"
                " this key (e.g. train.xx)"
            )
        return value

    @model_validator(mode="after")
    def _distinct_languages(self) -> DataConfig:
        if self.src_lang == self.tgt_lang:
            raise ValueError("src_lang and tgt_lang must differ")
        return self


def is_folder_source(source: str) -> bool:
    """Whether `data.source` names a local corpus folder (not the built-in corpus, not a Hub dataset)."""
    return source != "builtin" and not source.startswith("hf:")


def source_path(source: str) -> Path:
    """A folder `data.source` as a path, `~` and `~user` expanded; a PipelineError when the user is unknown
    here (Python raises a bare RuntimeError)."""
    try:
        return Path(source).expanduser()
    except RuntimeError:
        user = source[1:].split("/")[0]
        raise PipelineError(
            f"data.source {source!r}: there is no user {user!r} on this machine, so ~{user} names no home"
            " folder: give the corpus folder's path"
        ) from None


class PreprocessConfig(_Section):
    tokenizer: Literal["bpe", "word"] = "bpe"
    vocab_size: int = Field(4000, ge=16, le=1_000_000)
    min_frequency: int = Field(1, ge=1)
    joint_vocab: bool = False
    lowercase: bool = False
    # bpe: characters unseen in training become their UTF-8 bytes (256 more tokens), not <unk>.
    byte_fallback: bool = True
    # Train the tokenizers on a seeded random sample of this many training pairs (null: all of them).
    tokenizer_sample: int | None = Field(None, ge=1)


class ModelConfig(_Section):
    """For arch transformer, emb_dim is the model width d and n_layers the depth of the encoder and of the
    decoder each; hidden_dim is not used. The GRU archs ignore the transformer-only keys below."""

    arch: Literal["gru", "gru_attention", "transformer"] = "gru_attention"
    emb_dim: int = Field(128, ge=1, le=8192)
    hidden_dim: int = Field(256, ge=1, le=16384)
    n_layers: int = Field(1, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Transformer only.
    n_heads: int = Field(4, ge=1, le=128, description="attention heads; must divide emb_dim")
    ff_dim: int = Field(512, ge=1, le=65536, description="feed-forward inner width")
    ff_activation: Literal["relu", "gelu"] = "relu"
    tie_embeddings: bool = Field(True, description="output projection = target embedding matrix")
    share_embeddings: bool = Field(False, description="one embedding matrix for both sides (joint vocab)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.arch == "transformer" and self.emb_dim % self.n_heads:
            raise ValueError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}):"
                " each head gets emb_dim / n_heads dimensions"
            )
        return self


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    # The global batch: target tokens per optimizer update, across all workers (each takes its share), so
    # the number of workers changes no update; `accumulate` splits each worker's share further.
    batch_size: int = Field(
        8000, ge=MIN_MICRO_BATCH_TOKENS, description="target tokens per optimizer update, all workers"
    )
    accumulate: int = Field(1, ge=1, le=256, description="micro-batches per worker and update")
    # Each update joins this many length-sorted sub-batches of batch_size / N tokens drawn at random, so one
    # update mixes N ranges of sentence length (one range alone made updates noisier: see the docs).
    length_buckets: int = Field(2, ge=1, le=64, description="length ranges (sub-batches) mixed in one update")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    compile: bool = False  # torch.compile the model (CUDA graphs on a GPU)
    pad_multiple: int = Field(1, ge=1, le=128, description="padded lengths are multiples of this")
    average_last: int = Field(1, ge=1, le=100, description="average the weights of the last N epochs")
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    # matrices: weight matrices only, never biases, norms or embeddings (fairseq's and Hugging Face's
    # practice); all: every parameter, as torch.optim.AdamW does by default.
    weight_decay_scope: Literal["matrices", "all"] = "matrices"
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    # global: every micro-batch's summed loss over the global batch's target tokens (fairseq), so an
    # update is the same with 1 worker or 8; rank: over this rank's own tokens, so DDP averages the means
    # of unequal shares and a token in a short share weighs more.
    loss_denominator: Literal["global", "rank"] = "global"
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    teacher_forcing: float = Field(1.0, ge=0.0, le=1.0)
    early_stopping_patience: int = Field(3, ge=1)
    val_bleu_sentences: int = Field(200, ge=0, description="validation sentences decoded for BLEU each epoch")
    seed: int = _seed(0)

    @model_validator(mode="after")
    def _average_within_the_epochs(self) -> TrainConfig:
        if self.average_last > self.epochs:
            raise ValueError(
                f"train.average_last must be at most train.epochs ({self.average_last} > {self.epochs}):"
                " it averages the weights of the last N epochs"
            )
        return self


class CheckpointInterval(NamedTuple):
    """How often to checkpoint inside an epoch: exactly one of the two is set."""

    steps: int | None = None  # optimizer steps
    seconds: float | None = None


_MINUTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*m(?:in)?\s*")


def parse_checkpoint_every(value: Any) -> CheckpointInterval | None:
    """`runtime.checkpoint_every`: None (epoch ends only), a positive int (optimizer steps) or minutes as
    "10min", "2.5min" or "10m"."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return CheckpointInterval(steps=value)
    minutes = _MINUTES.fullmatch(value) if isinstance(value, str) else None
    if minutes and 0 < float(minutes[1]) < math.inf:
        return CheckpointInterval(seconds=float(minutes[1]) * 60)
    raise ValueError(
        "expected null (epoch ends only), a positive whole number of optimizer steps, "
        "or minutes such as '10min', '2.5min' or '10m'"
    )


class RuntimeConfig(_Section):
    """How a run is carried out, not what it computes: no DVC stage lists this section, so changing it
    (e.g. the cluster's storage_path) re-runs nothing, and run names (content hashes) ignore it."""

    # The hardware a run uses: with the global batch (train.batch_size) they change no update.
    num_workers: int = Field(2, ge=1)  # Ray Train workers (DDP ranks); one GPU each with use_gpu
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    storage_path: str = "runs/ray"
    max_failures: int = Field(2, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    # A Train worker group that cannot get its resources fails the stage after this long, once, instead of
    # retrying forever (Ray's default) with nothing on the screen.
    worker_start_timeout_s: float = Field(300.0, gt=0.0)
    # Mid-epoch checkpoints of the train stage: null (epoch ends only), N optimizer steps or "10min".
    checkpoint_every: int | str | None = None

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every_parses(cls, value: Any) -> Any:
        parse_checkpoint_every(value)  # raises with the accepted forms
        return value

    @field_validator("storage_path")
    @classmethod
    def _storage_path_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "empty: give a folder (runs/ray by default) or a URI such as s3://bucket/runs (an empty path"
                " would put Ray's checkpoints in the project folder itself)"
            )
        return value


class SearchDimension(_Section):
    """One search-space entry; exactly one of the keys is set."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="inclusive bounds")

    @field_validator("uniform", "loguniform", "randint", mode="before")
    @classmethod
    def _bounds_from_a_list(cls, value: Any) -> Any:
        """YAML gives bounds as a list, and strict mode takes only a tuple for a tuple (its items stay
        strict)."""
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDimension:
        set_keys = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        for key in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, key)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{key} bounds must be increasing, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self


TUNABLE_KEYS = (
    "model.arch",
    "model.emb_dim",
    "model.hidden_dim",
    "model.n_layers",
    "model.dropout",
    "model.n_heads",
    "model.ff_dim",
    "model.ff_activation",
    "train.lr",
)


class TuneConfig(_Section):
    num_samples: int = Field(4, ge=0, description="0 turns the search off")
    max_epochs: int = Field(3, ge=1)
    search_alg: Literal["optuna", "random"] = "optuna"
    metric: Literal["val_loss", "val_bleu"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = Field(1, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_examples: int | None = Field(None, ge=1, description="training pairs each trial sees (None: all)")
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)

    @field_validator("search_space")
    @classmethod
    def _tunable(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        unknown = sorted(set(space) - set(TUNABLE_KEYS))
        if unknown:
            raise ValueError(f"cannot tune {unknown}; tunable keys: {list(TUNABLE_KEYS)}")
        return space

    @model_validator(mode="after")
    def _metric_mode(self) -> TuneConfig:
        expected = "min" if self.metric == "val_loss" else "max"
        if self.mode != expected:
            raise ValueError(f"metric {self.metric} needs mode {expected!r}")
        return self


class EvaluateConfig(_Section):
    beam_size: int = Field(4, ge=1, le=MAX_BEAM_SIZE)
    length_penalty: float = Field(1.0, ge=0.0)
    # Choose the length penalty among these by BLEU on the validation split (then used for test and
    # recorded); empty: length_penalty as it is.
    length_penalty_search: list[float] = Field(default_factory=list, max_length=16)
    search_sentences: int = Field(500, ge=1, description="validation sentences the search decodes")
    max_len_ratio: float = Field(
        2.0, gt=0.0, le=MAX_LEN_RATIO, description="decode at most ratio * source length + 5 tokens"
    )
    batch_size: int = Field(128, ge=1)
    n_samples: int = Field(20, ge=0)
    # auto: a CUDA GPU when there is one (batches cut by tokens there), else the CPU; cpu forces the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("length_penalty_search")
    @classmethod
    def _penalties_not_negative(cls, values: list[float]) -> list[float]:
        if any(value < 0 for value in values):
            raise ValueError(f"length penalties must be 0 or more, got {values}")
        return values

    def decoding(self) -> dict[str, Any]:
        """The settings a model folder's decoding.json holds (`DECODING_KEYS`)."""
        return self.model_dump(include=set(DECODING_KEYS))


class RegisterConfig(_Section):
    model_name: str = Field("seq2seq-translator", min_length=1)
    min_improvement: float = Field(0.0, ge=0.0, description="BLEU points a challenger must gain")

    @field_validator("model_name")
    @classmethod
    def _mlflow_model_name(cls, value: str) -> str:
        """MLflow's rules for a registered model's name, checked here rather than after the register stage
        has logged the model: not blank, no '/' or ':', and not a path that resolves to another name."""
        if not value.strip():
            raise ValueError("is blank: give the registered model's name, e.g. seq2seq-translator")
        if "/" in value or ":" in value:
            raise ValueError("MLflow's registered model names cannot contain '/' or ':'")
        if value in (".", "..") or value.startswith(".."):
            raise ValueError("MLflow's registered model names cannot be '.' or start with '..'")
        return value


class TrackingConfig(_Section):
    experiment: str = Field("seq2seq-pipeline", min_length=1)


# `register` is params.yaml's section name, and the attribute too: as a field it hides only the class's
# `register` method (ABCMeta's, for virtual subclasses, which pydantic models do not support), never an
# instance's attribute, so pydantic's warning about the shadowed attribute is silenced for this class only.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning
    )

    class PipelineConfig(_Section):
        data: DataConfig = DataConfig()
        preprocess: PreprocessConfig = PreprocessConfig()
        model: ModelConfig = ModelConfig()
        train: TrainConfig = TrainConfig()
        runtime: RuntimeConfig = RuntimeConfig()
        tune: TuneConfig = TuneConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        register: RegisterConfig = RegisterConfig()
        tracking: TrackingConfig = TrackingConfig()

        @model_validator(mode="after")
        def _shared_embeddings_need_a_joint_vocabulary(self) -> PipelineConfig:
            _check_shared_embeddings(self.model, self.preprocess)
            return self

        @model_validator(mode="after")
        def _every_micro_batch_gets_tokens(self) -> PipelineConfig:
            """Each update's global batch is cut into num_workers x accumulate micro-batches by sentence
            count; a batch of fewer sentences leaves the rest empty, and each empty one still runs a full
            forward and backward pass (a placeholder, so that DDP's all-reduce goes on): train.batch_size 16
            with train.accumulate 256 made an epoch hundreds of times slower and reached none."""
            parts = self.runtime.num_workers * self.train.accumulate
            needed = MIN_MICRO_BATCH_TOKENS * parts
            if self.train.batch_size < needed:
                raise ValueError(
                    f"train.batch_size must give each of the runtime.num_workers x train.accumulate ="
                    f" {self.runtime.num_workers} x {self.train.accumulate} micro-batches of an update at"
                    f" least {MIN_MICRO_BATCH_TOKENS} target tokens: raise it from {self.train.batch_size} to"
                    f" {needed} or more, or lower train.accumulate (an empty micro-batch still costs a full"
                    " pass)"
                )
            return self

        @model_validator(mode="after")
        def _search_draws_valid_models(self) -> PipelineConfig:
            """Refuse a search space that can draw an invalid model or training setting now, before Ray
            starts, not in a trial hours into a search."""
            space = self.tune.search_space
            if self.tune.num_samples == 0:
                return self
            # Only choices list every value; of a range, only the ends are checked below.
            ranged = [
                key for key in ("model.emb_dim", "model.n_heads") if key in space and not space[key].choice
            ]
            base = {"model": self.model.model_dump(), "train": self.train.model_dump()}
            for drawn in _draws_to_check(space):
                sections = {name: dict(values) for name, values in base.items()}
                for key, value in drawn.items():
                    section, _, name = key.partition(".")
                    sections[section][name] = value
                try:
                    model = ModelConfig.model_validate(sections["model"])
                    TrainConfig.model_validate(sections["train"])
                    _check_shared_embeddings(model, self.preprocess)
                except ValueError as error:  # pydantic's ValidationError is one too
                    reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
                    reason = reason.removeprefix("Value error, ")
                    raise ValueError(f"tune.search_space can draw {drawn}: {reason}") from None
                if model.arch == "transformer" and ranged:
                    raise ValueError(
                        f"tune.search_space can draw a transformer: give {' and '.join(ranged)} as a choice"
                        " of values, so that every model.emb_dim drawn is divisible by every model.n_heads"
                    )
            return self


def _check_shared_embeddings(model: ModelConfig, preprocess: PreprocessConfig) -> None:
    if model.arch == "transformer" and model.share_embeddings and not preprocess.joint_vocab:
        raise ValueError(
            "model.share_embeddings needs preprocess.joint_vocab: true (one vocabulary, two sides)"
        )


# The tunable keys that one rule ties together (a transformer's model.emb_dim must be divisible by its
# model.n_heads): their values are checked in every combination. Any other key's values are valid or not on
# their own, so each is checked once, next to the base values: the check costs the sum of the dimensions'
# sizes, not their product (a space of 12.8 million combinations held every stage at params load).
_COUPLED_KEYS = ("model.arch", "model.emb_dim", "model.n_heads")
MAX_COUPLED_DRAWS = 10_000


def _drawn_values(dim: SearchDimension) -> list[Any]:
    """All of a choice, the two ends of a range."""
    return dim.choice if dim.choice is not None else list(dim.uniform or dim.loguniform or dim.randint or ())


def _draws_to_check(space: dict[str, SearchDimension]) -> Iterator[dict[str, Any]]:
    """The draws that show whether a search can draw an invalid setting: every combination of the coupled
    keys' values, then each other value alone (all choices, and the ends of ranges)."""
    options = {key: _drawn_values(dim) for key, dim in space.items()}
    coupled = [key for key in space if key in _COUPLED_KEYS]
    combinations = math.prod(len(options[key]) for key in coupled)
    if combinations > MAX_COUPLED_DRAWS:
        raise ValueError(
            f"tune.search_space gives {combinations:,} combinations of {' x '.join(coupled)} to check, over"
            f" {MAX_COUPLED_DRAWS:,}: give fewer choices of these keys"
        )
    for values in itertools.product(*(options[key] for key in coupled)):
        yield dict(zip(coupled, values, strict=True))
    for key, values in options.items():
        if key not in coupled:
            for value in values:
                yield {key: value}
