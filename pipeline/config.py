"""The configuration's schema: params.yaml's sections as typed, frozen pydantic models, validated strictly,
and errors that name each key's file and line. Reading and editing the file is `pipeline.params_file`.

Every section is keyed by the DVC stage that reads it, so `dvc.yaml` can list exactly the keys a stage
depends on. Unknown keys are refused (a typo must not silently fall back to a default).

Each key's `description` is its reference text: docs/configuration.md's key tables are rendered from it
(`python -m pipeline.config_reference`).
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


def _seed(default: int, description: str) -> Any:
    return Field(default, ge=0, le=SEED_MAX, description=description)


class _Section(BaseModel):
    # strict: a value is taken as the type YAML gives it, never converted ("64" is a string, 1 is not true,
    # true is not 1); a float key still takes a whole number. No float key takes .inf or .nan: an infinite
    # penalty or ratio would be written into reports and model folders that later refuse to load.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class BuiltinCorpusConfig(_Section):
    n_pairs: int = Field(20_000, ge=10, le=5_000_000, description="Pairs the built-in corpus generates.")
    seed: int = _seed(13, "Seed of the built-in corpus generator.")
    sentences_per_pair: int = Field(
        1,
        ge=1,
        le=8,
        description=(
            "Sentences joined into one built-in pair; 3 gives news-like lengths (mean 39 source tokens)."
        ),
    )


class DataConfig(_Section):
    source: str = Field(
        "builtin",
        description=(
            "The corpus: `builtin` (generated, see `data.builtin`), `hf:<dataset>[:<config>]` (a Hugging Face"
            " Hub dataset or a local `datasets` folder), or a local folder of split files (`train.en` +"
            " `train.de`, `train.tsv`, ...; a single file is refused: put it in a folder as `train.tsv`),"
            " kept under `corpus/` so DVC sees it ([corpora.md](corpora.md)). Other schemes (`s3://...`) are"
            " refused; so are an empty value, which would read the project folder itself, and `~user` paths"
            " of a user this machine does not have."
        ),
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description=(
            "`hf:` sources only: the Hub commit or tag to load. `null` resolves the current commit at prepare"
            " and records it in `reports/prepare_metrics.json` and the MLflow run's dataset inputs; copy it"
            " here to pin it. Refused for other sources (a local corpus is versioned by DVC)."
        ),
    )
    src_lang: str = Field(
        "en",
        min_length=1,
        description=(
            "Source column or language code (any text column, e.g. `document`). Must differ from"
            " `data.tgt_lang`; with a corpus folder, not `tsv`, `jsonl` or `parquet`, which name a whole"
            " split's file there."
        ),
    )
    tgt_lang: str = Field(
        "art",
        min_length=1,
        description=(
            "Target column or language code (`art` is the built-in corpus's invented language); the rules"
            " of `data.src_lang` hold."
        ),
    )
    builtin: BuiltinCorpusConfig = Field(
        BuiltinCorpusConfig(),
        description=(
            "The built-in corpus, generated from a seed (English-like source, invented target language"
            " `art`): read when `data.source` is `builtin`."
        ),
    )
    split_names: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict,
        description=(
            "Maps `train`, `validation`, `test` to the split names the source uses (a file stem or a Hub"
            " split), e.g. `{validation: newstest2013, test: newstest2014}`. Unset ones are detected:"
            " validation as `validation`, `valid`, `val` or `dev`; test as `test` or the single `test*` name."
        ),
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N training pairs as loaded (quick runs); `null` keeps all.",
    )
    max_tokens: int = Field(
        64, ge=1, description="Drop training pairs with a side longer than this many whitespace tokens."
    )
    max_length_ratio: float = Field(
        4.0, ge=1.0, description="Drop training pairs whose side lengths differ by more than this factor."
    )
    max_chars: int = Field(
        1000,
        ge=1,
        description=(
            'Drop training pairs with a side longer than this many characters: one "word" of a million'
            " characters (a base64 blob, a table) passes `data.max_tokens`, and BPE training time grows"
            " faster than linearly in the longest word."
        ),
    )
    validation_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=0.5,
        description=(
            "Share of training pairs carved out as validation when the source has no validation split."
        ),
    )
    test_fraction: float = Field(
        0.05,
        gt=0.0,
        lt=0.5,
        description="Share of training pairs carved out as test when the source has no test split.",
    )
    seed: int = _seed(42, "Seed of the shuffle that carves validation and test splits.")
    engine: Literal["local", "ray"] = Field(
        "local",
        description=(
            "Who runs prepare and preprocess: `local` (one process, streaming; it starts faster) or `ray`"
            " (Ray Data pipelines over every core of every node). Both write the same files"
            " ([corpora.md](corpora.md#engines-local-or-ray-data))."
        ),
    )

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
    tokenizer: Literal["bpe", "word"] = Field("bpe", description="`bpe` (byte-pair encoding) or `word`.")
    vocab_size: int = Field(
        4000,
        ge=16,
        le=1_000_000,
        description="Vocabulary size of each tokenizer (of the joint one with `preprocess.joint_vocab`).",
    )
    min_frequency: int = Field(
        1, ge=1, description="Minimum count of a token or merge to enter the vocabulary."
    )
    joint_vocab: bool = Field(
        False, description="One tokenizer for both sides; needed by `model.share_embeddings`."
    )
    lowercase: bool = Field(
        False,
        description=(
            "Lowercase text before tokenizing; the model then writes lowercase only, and the registry's gate"
            " compares lowercase BLEU ([tracking.md](tracking.md#the-champion-gate))."
        ),
    )
    byte_fallback: bool = Field(
        True,
        description=(
            "`bpe` only: 256 byte tokens are added to the vocabulary, and a character unseen in training"
            " becomes its UTF-8 bytes instead of `<unk>`"
            " ([models-and-training.md](models-and-training.md#tokenizers))."
        ),
    )
    tokenizer_sample: int | None = Field(
        None,
        ge=1,
        description=(
            "Train the tokenizers on a seeded random sample of this many training pairs; `null` uses all."
        ),
    )


class ModelConfig(_Section):
    arch: Literal["gru", "gru_attention", "transformer"] = Field(
        "gru_attention",
        description=(
            "A GRU encoder-decoder, the same with attention, or a Transformer"
            " ([models-and-training.md](models-and-training.md#architectures))."
        ),
    )
    emb_dim: int = Field(
        128, ge=1, le=8192, description="Embedding size; for `transformer` the model width d."
    )
    hidden_dim: int = Field(
        256, ge=1, le=16384, description="GRU hidden size (GRU architectures only; `transformer` ignores it)."
    )
    n_layers: int = Field(
        1,
        ge=1,
        le=8,
        description="GRU layers; for `transformer` the encoder layers, and as many decoder layers.",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings and between layers.")
    # Transformer only: the GRU archs ignore the keys below.
    n_heads: int = Field(
        4, ge=1, le=128, description="Attention heads (`transformer` only); must divide `model.emb_dim`."
    )
    ff_dim: int = Field(512, ge=1, le=65536, description="Feed-forward inner width (`transformer` only).")
    ff_activation: Literal["relu", "gelu"] = Field(
        "relu", description="Feed-forward activation (`transformer` only)."
    )
    tie_embeddings: bool = Field(
        True, description="Output projection = target embedding matrix (`transformer` only)."
    )
    share_embeddings: bool = Field(
        False,
        description=(
            "One embedding matrix for both sides (`transformer` only); needs `preprocess.joint_vocab: true`."
        ),
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.arch == "transformer" and self.emb_dim % self.n_heads:
            raise ValueError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads}):"
                " each head gets emb_dim / n_heads dimensions"
            )
        return self


_BATCHES_DOC = "models-and-training.md#batches-precision-and-compile"
_CONTINUED_DOC = "models-and-training.md#continued-training"
REGISTRY_PREFIX = "models:/"
# A registered model's name: MLflow's rules (no '/' or ':'), and no '@', which starts an alias.
_REGISTRY_FORMS = re.compile(r"models:/(?P<name>[^/:@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/:@]+))")


class RegistryRef(NamedTuple):
    """A `models:/` URI taken apart: exactly one of `version` and `alias` is set."""

    name: str
    version: str | None
    alias: str | None


def registry_ref(uri: str) -> RegistryRef:
    """`models:/<name>/<version>` or `models:/<name>@<alias>`; a ValueError naming both forms otherwise."""
    match = _REGISTRY_FORMS.fullmatch(uri)
    if match is None:
        raise ValueError(
            f"{uri!r} is not a registered model: give models:/<name>/<version> or models:/<name>@<alias>"
        )
    return RegistryRef(match["name"], match["version"], match["alias"])


def check_init_from_pinned(train: TrainConfig) -> None:
    """A stage trains from a fixed parent only: an alias could move between runs of the same params."""
    value = train.init_from
    if value is None or not value.startswith(REGISTRY_PREFIX):
        return
    ref = registry_ref(value)
    if ref.alias is not None:
        raise PipelineError(
            f"train.init_from {value!r} is an alias, which can move: pin it to its version with"
            f" `python -m pipeline set-params train.init_from={value}`"
        )


class TrainConfig(_Section):
    epochs: int = Field(
        10,
        ge=1,
        description=(
            "Training epochs (at most: see `train.early_stopping_patience`); tune trials run"
            " `tune.max_epochs` instead."
        ),
    )
    batch_size: int = Field(
        8000,
        ge=MIN_MICRO_BATCH_TOKENS,
        description=(
            "The global batch: target tokens (padding included) per optimizer update, across all workers,"
            " each taking its share; the number of workers changes no update"
            f" ([models-and-training.md]({_BATCHES_DOC})). It must give each of the `runtime.num_workers` x"
            f" `train.accumulate` micro-batches of an update at least {MIN_MICRO_BATCH_TOKENS} target tokens"
            " ([Validation](#validation))."
        ),
    )
    accumulate: int = Field(
        1,
        ge=1,
        le=256,
        description=(
            "Micro-batches per worker and update, for a device that cannot hold its share at once; changes"
            " no update."
        ),
    )
    length_buckets: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Length-sorted sub-batches (of `train.batch_size` / N target tokens each, drawn at random) joined"
            " into one update, so an update mixes N ranges of sentence length (one range alone makes updates"
            " noisier); 1 makes each update one length range. Changes the updates, not their number"
            f" ([models-and-training.md]({_BATCHES_DOC}))."
        ),
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description=(
            "Autocast of the forward pass: `auto` (bf16 on a GPU, fp32 on the CPU), `bf16`, `fp16` (with a"
            " gradient scaler) or `fp32`. `bf16` on a GPU without bfloat16 is refused."
        ),
    )
    compile: bool = Field(
        False, description="`torch.compile` the model; on CUDA with CUDA graphs (mode `reduce-overhead`)."
    )
    pad_multiple: int = Field(
        1,
        ge=1,
        le=128,
        description=(
            "Padded source and target lengths are rounded up to a multiple of this; 8 makes shapes repeat,"
            " for `train.compile` and CUDA graphs."
        ),
    )
    average_last: int = Field(
        1,
        ge=1,
        le=100,
        description=(
            "Above 1: the trained model is the element-wise mean of the last N epochs' weights instead of the"
            " best checkpoint by validation loss; at most `train.epochs`."
        ),
    )
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay, on the parameters `train.weight_decay_scope` names."
    )
    weight_decay_scope: Literal["matrices", "all"] = Field(
        "matrices",
        description=(
            "`matrices`: weight matrices only, never biases, norms or embeddings (fairseq's and Hugging"
            " Face's practice); `all`: every parameter, as `torch.optim.AdamW` does by default."
        ),
    )
    adam_beta2: float = Field(
        0.999, gt=0.0, lt=1.0, description="AdamW's second-moment decay β2 (β1 is 0.9)."
    )
    loss_denominator: Literal["global", "rank"] = Field(
        "global",
        description=(
            "`global`: every micro-batch's summed loss over the global batch's target tokens (as fairseq), so"
            " an update is the same with 1 worker or 8; `rank`: over the rank's own tokens, so DDP averages"
            " the means of unequal shares and a token in a short share weighs more."
        ),
    )
    warmup_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of the steps spent in linear warm-up before cosine decay."
    )
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping: the largest gradient norm.")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="Label smoothing of the loss.")
    teacher_forcing: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description=(
            "Teacher forcing ratio; below 1 is scheduled sampling (step-wise, slow for `transformer`)."
        ),
    )
    early_stopping_patience: int = Field(
        3, ge=1, description="Epochs without a better validation loss before training stops."
    )
    val_bleu_sentences: int = Field(
        200,
        ge=0,
        description=(
            "Validation sentences decoded greedily each epoch for `val_bleu` (scored against their cleaned"
            " reference text, as evaluate scores); 0 turns it off."
        ),
    )
    seed: int = _seed(0, "Seed of model initialisation, batch order and the Optuna search.")
    init_from: str | None = Field(
        None,
        min_length=1,
        description=(
            "Continued training: start from this model's weights, vocabulary and architecture instead of"
            " from scratch: a model folder, `models:/<name>/<version>`, or `models:/<name>@<alias>`, which"
            " `set-params` pins to its version (a stage refuses an alias); `null` trains from scratch"
            f" ([models-and-training.md]({_CONTINUED_DOC}))."
        ),
    )

    @field_validator("init_from")
    @classmethod
    def _init_from_form(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(REGISTRY_PREFIX):
            registry_ref(value)  # raises with the two registry forms
        return value

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

    num_workers: int = Field(
        2,
        ge=1,
        description=(
            "Ray Train workers (DDP ranks); with `runtime.use_gpu`, the number of GPUs. Changes no update"
            " (see `train.batch_size`). On a local Ray, workers x `runtime.cpus_per_worker` may not exceed"
            " the machine's CPUs ([Validation](#validation))."
        ),
    )
    use_gpu: bool = Field(False, description="One GPU per worker and NCCL; `false` trains on CPUs with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs per worker; torch threads follow it.")
    storage_path: str = Field(
        "runs/ray",
        description=(
            "Ray Train/Tune storage for checkpoints and results; `s3://...` or an NFS path on a cluster. Not"
            " empty (that would put checkpoints in the project folder itself); a URI is opened and read once"
            " before Ray starts, and one that fails or gives no answer within 30 s stops the stage with one"
            " line."
        ),
    )
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts before a run fails (-1: unlimited)."
    )
    checkpoints_to_keep: int = Field(
        2, ge=1, description="Checkpoints kept by validation loss, besides the latest (tune trials keep 1)."
    )
    worker_start_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description=(
            "Seconds a Ray Train worker group may wait for its resources before the stage fails, once, with"
            " what it asked for and what the Ray instance has (Ray by itself retries forever with nothing on"
            " the screen)."
        ),
    )
    checkpoint_every: int | str | None = Field(
        None,
        description=(
            "Mid-epoch checkpoints of the train stage: `null` (epoch ends only), N optimizer steps, or"
            ' minutes as `"10min"`, `"2.5min"`, `"10m"`'
            " ([models-and-training.md](models-and-training.md#mid-epoch-checkpoints))."
        ),
    )

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

    choice: list[Any] | None = Field(None, description="Values to choose from (at least one).")
    uniform: tuple[float, float] | None = Field(None, description="`[low, high]`: a number drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(
        None, description="`[low, high]`, both above 0: a number drawn uniformly on a log scale."
    )
    randint: tuple[int, int] | None = Field(
        None, description="`[low, high]`: a whole number, both bounds included."
    )

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
    num_samples: int = Field(
        4, ge=0, description="Trials; 0 turns the search off and passes the `model` section through."
    )
    max_epochs: int = Field(3, ge=1, description="Epochs per trial; ASHA may stop a trial earlier.")
    search_alg: Literal["optuna", "random"] = Field("optuna", description="`optuna` (TPE) or `random`.")
    metric: Literal["val_loss", "val_bleu"] = Field(
        "val_loss", description="The trial result the search and ASHA compare."
    )
    mode: Literal["min", "max"] = Field(
        "min", description="`min` for `val_loss`, `max` for `val_bleu`; any other pairing is refused."
    )
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials at once; lowered to what the CPUs or the cluster can feed."
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs a trial runs before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA's reduction factor.")
    max_examples: int | None = Field(None, ge=1, description="Training pairs each trial sees; `null`: all.")
    search_space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description=(
            "Dimensions to search, each `key: {choice | uniform | loguniform | randint: ...}`: exactly one"
            " of the entry keys below, bounds increasing. Tunable keys: "
            + ", ".join(f"`{key}`" for key in TUNABLE_KEYS)
            + " ([search.md](search.md))."
        ),
    )

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
    beam_size: int = Field(
        4,
        ge=1,
        le=MAX_BEAM_SIZE,
        description=(
            "Beam width (1 is greedy decoding); written to the model's `decoding.json`. The same bound holds"
            " for a model folder's `decoding.json`, `translate --beam-size` and a served request's"
            " `beam_size`."
        ),
    )
    length_penalty: float = Field(
        1.0, ge=0.0, description="GNMT length penalty exponent lp in ((5 + length) / 6)^lp."
    )
    length_penalty_search: list[float] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Length penalties to try (e.g. `[0.6, 0.8, 1.0, 1.2]`): the one with the best BLEU on the first"
            " `evaluate.search_sentences` validation sentences is used for test, recorded in"
            " `reports/metrics.json` (`length_penalty`, `validation_bleu_length_penalty_*`) and registered"
            " with the model. Empty: `evaluate.length_penalty` as it is."
        ),
    )
    search_sentences: int = Field(
        500, ge=1, description="Validation sentences the length-penalty search decodes."
    )
    max_len_ratio: float = Field(
        2.0,
        gt=0.0,
        le=MAX_LEN_RATIO,
        description=(
            "Decode at most ratio x source length + 5 tokens; the same bound holds for a model folder's"
            " `decoding.json`."
        ),
    )
    batch_size: int = Field(
        128,
        ge=1,
        description="Sentences per decoding batch on the CPU (on a GPU batches are cut by tokens).",
    )
    n_samples: int = Field(20, ge=0, description="Test translations written to `reports/samples.jsonl`.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "`auto`: a CUDA GPU when there is one (batches cut by tokens there), else the CPU; `cpu` or"
            " `cuda` forces one."
        ),
    )

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
    model_name: str = Field(
        "seq2seq-translator",
        min_length=1,
        description=(
            "Registered model name in MLflow; MLflow's rules are checked when params load: not blank, no `/`"
            " or `:`, not `.` or starting with `..`."
        ),
    )
    min_improvement: float = Field(
        0.0,
        ge=0.0,
        description=(
            "Test BLEU points a new version must gain over the champion to take the `champion` alias."
        ),
    )

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
    experiment: str = Field(
        "seq2seq-pipeline",
        min_length=1,
        description="MLflow experiment; `MLFLOW_EXPERIMENT_NAME` wins when set.",
    )


# `register` is params.yaml's section name, and the attribute too: as a field it hides only the class's
# `register` method (ABCMeta's, for virtual subclasses, which pydantic models do not support), never an
# instance's attribute, so pydantic's warning about the shadowed attribute is silenced for this class only.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning
    )

    class PipelineConfig(_Section):
        data: DataConfig = Field(
            DataConfig(),
            description=(
                "The corpus and its cleaning: where the pairs come from, which pairs training drops, how"
                " validation and test splits are carved out when the source has none."
            ),
        )
        preprocess: PreprocessConfig = Field(
            PreprocessConfig(), description="The tokenizers, trained on the prepared training split."
        )
        model: ModelConfig = Field(
            ModelConfig(),
            description=(
                "The network. The tune stage takes these as the base values that its search space"
                " overrides; the train stage builds the model from them, with the search's best values"
                " (`reports/best_params.json`) laid over them."
            ),
        )
        train: TrainConfig = Field(
            TrainConfig(),
            description="The optimizer update and the training loop, for train and for every tune trial.",
        )
        runtime: RuntimeConfig = Field(
            RuntimeConfig(),
            description=(
                "How tune and train are carried out, not what they compute: the hardware, Ray Train/Tune"
                " storage, failures, checkpoints. No stage lists this section in `dvc.yaml`, so changing it"
                " re-runs nothing, and run names (content hashes) leave it out. With the global batch"
                " (`train.batch_size`), the hardware changes no update."
            ),
        )
        tune: TuneConfig = Field(
            TuneConfig(),
            description=(
                "The hyperparameter search: Ray Tune trials stopped early by ASHA; the best trial's values go"
                " to `reports/best_params.json` for train ([search.md](search.md))."
            ),
        )
        evaluate: EvaluateConfig = Field(
            EvaluateConfig(),
            description=(
                "Beam-search decoding of the test split and its scores. The decoding keys (`beam_size`,"
                " `length_penalty`, `max_len_ratio`) go into the model folder's `decoding.json`, and with it"
                " to the registered model."
            ),
        )
        register: RegisterConfig = Field(
            RegisterConfig(),
            description=(
                "The MLflow model registry: the registered model and the champion gate"
                " ([tracking.md](tracking.md#the-champion-gate))."
            ),
        )
        tracking: TrackingConfig = Field(
            TrackingConfig(),
            description=(
                "Where tune, train, evaluate and register log their MLflow runs; listed by no stage in"
                " `dvc.yaml`, so changing it re-runs nothing."
            ),
        )

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
