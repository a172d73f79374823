"""params.yaml -> a validated, typed config. The only module that reads params.yaml.

Every section is keyed by the DVC stage that reads it, so `dvc.yaml` can list exactly the keys a stage
depends on. Unknown keys are refused (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError

DEFAULT_PARAMS_PATH = Path("params.yaml")
SPLITS = ("train", "validation", "test")
# The evaluate keys that say how a model is decoded: a model folder's decoding.json holds exactly these.
DECODING_KEYS = ("beam_size", "length_penalty", "max_len_ratio")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinCorpusConfig(_Section):
    n_pairs: int = Field(20_000, ge=10, le=5_000_000)
    seed: int = 13
    # Sentences joined into one pair: 3 gives news-like lengths (mean ~36 tokens) for scale tests.
    sentences_per_pair: int = Field(1, ge=1, le=8)


class DataConfig(_Section):
    # builtin | hf:<dataset>[:<config>] | a local folder path
    source: str = "builtin"
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
    seed: int = 42

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
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

    @model_validator(mode="after")
    def _distinct_languages(self) -> DataConfig:
        if self.src_lang == self.tgt_lang:
            raise ValueError("src_lang and tgt_lang must differ")
        return self


class PreprocessConfig(_Section):
    tokenizer: Literal["bpe", "word"] = "bpe"
    vocab_size: int = Field(4000, ge=16, le=1_000_000)
    min_frequency: int = Field(1, ge=1)
    joint_vocab: bool = False
    lowercase: bool = False
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
    batch_size: int = Field(4000, ge=16, description="target tokens per batch on each worker")
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    teacher_forcing: float = Field(1.0, ge=0.0, le=1.0)
    early_stopping_patience: int = Field(3, ge=1)
    val_bleu_sentences: int = Field(200, ge=0, description="validation sentences decoded for BLEU each epoch")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    seed: int = 0


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
    if minutes and float(minutes[1]) > 0:
        return CheckpointInterval(seconds=float(minutes[1]) * 60)
    raise ValueError(
        "expected null (epoch ends only), a positive whole number of optimizer steps, "
        "or minutes such as '10min', '2.5min' or '10m'"
    )


class RuntimeConfig(_Section):
    """How a run is carried out, not what it computes: no DVC stage lists this section, so changing it
    (e.g. the cluster's storage_path) re-runs nothing, and run names (content hashes) ignore it."""

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
    def _checkpoint_interval(cls, value: Any) -> Any:
        parse_checkpoint_every(value)  # raises with the accepted forms
        return value

    def checkpoint_interval(self) -> CheckpointInterval | None:
        return parse_checkpoint_every(self.checkpoint_every)


class SearchDimension(_Section):
    """One search-space entry; exactly one of the keys is set."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="inclusive bounds")

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
    beam_size: int = Field(4, ge=1, le=64)
    length_penalty: float = Field(1.0, ge=0.0)
    max_len_ratio: float = Field(2.0, gt=0.0, description="decode at most ratio * source length + 5 tokens")
    batch_size: int = Field(128, ge=1)
    n_samples: int = Field(20, ge=0)
    # auto: a CUDA GPU when there is one (batches cut by tokens there), else the CPU; cpu forces the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def decoding(self) -> dict[str, Any]:
        """The settings a model folder's decoding.json holds (`DECODING_KEYS`)."""
        return self.model_dump(include=set(DECODING_KEYS))


class RegisterConfig(_Section):
    model_name: str = Field("seq2seq-translator", min_length=1)
    min_improvement: float = Field(0.0, ge=0.0, description="BLEU points a challenger must gain")


class TrackingConfig(_Section):
    experiment: str = Field("seq2seq-pipeline", min_length=1)


class PipelineConfig(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # "register" would shadow pydantic's BaseModel.register, so the attribute is `registry`.
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _shared_embeddings_need_a_joint_vocabulary(self) -> PipelineConfig:
        _check_shared_embeddings(self.model, self.preprocess)
        return self

    @model_validator(mode="after")
    def _search_draws_valid_models(self) -> PipelineConfig:
        """Refuse a search space that can draw an invalid model or training setting now, before Ray starts,
        not in a trial hours into a search."""
        space = self.tune.search_space
        if self.tune.num_samples == 0:
            return self
        # Only choices list every value; of a range, only the ends are checked below.
        ranged = [key for key in ("model.emb_dim", "model.n_heads") if key in space and not space[key].choice]
        base = {"model": self.model.model_dump(), "train": self.train.model_dump()}
        for drawn in _draws(space):
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
                    f"tune.search_space can draw a transformer: give {' and '.join(ranged)} as a choice of"
                    " values, so that every model.emb_dim drawn is divisible by every model.n_heads"
                )
        return self


def _check_shared_embeddings(model: ModelConfig, preprocess: PreprocessConfig) -> None:
    if model.arch == "transformer" and model.share_embeddings and not preprocess.joint_vocab:
        raise ValueError(
            "model.share_embeddings needs preprocess.joint_vocab: true (one vocabulary, two sides)"
        )


def _draws(space: dict[str, SearchDimension]) -> Iterator[dict[str, Any]]:
    """Every combination of the values a search can draw: all choices, and the ends of ranges."""
    dimensions = dict(space)
    options = [
        dim.choice if dim.choice is not None else list(dim.uniform or dim.loguniform or dim.randint or ())
        for dim in dimensions.values()
    ]
    for values in itertools.product(*options):
        yield dict(zip(dimensions, values, strict=True))


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        # A cross-section rule names its key first ("tune.search_space can draw ..."): show it as the key.
        named, _, rest = message.partition(" ")
        if not problem["loc"] and "." in named and rest:
            key, message = named, rest
        value = problem.get("input")
        shown = (
            f" (got {value!r})"
            if problem["type"] != "extra_forbidden" and not isinstance(value, dict)
            else ""
        )
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "params") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_format_validation_error(error, source)) from None


def read_yaml_mapping(path: str | Path, what: str, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, read strictly: a missing, unreadable, non-UTF-8, invalid,
    empty (unless `allow_empty`) or non-mapping file, or a key given twice at any level (PyYAML would keep
    the last copy silently), is a PipelineError naming the file and line."""
    import yaml  # here, not at the top: the network layer imports this module on boxes without PyYAML

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise PipelineError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: not UTF-8 (byte {error.start})") from None
    try:
        raw = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PipelineError(f"{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {error}") from None
    if raw is None and allow_empty:
        return {}
    if raw is None:
        raise PipelineError(
            f"{path} is empty: expected a mapping of sections (see the project's params.yaml)"
        )
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise PipelineError(f"{path}:1: expected a mapping of sections at the top level, got a {kind}")
    return raw


def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first_line[key]})",
                        key_node.start_mark,
                    )
                first_line[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_config(path: str | Path = DEFAULT_PARAMS_PATH) -> PipelineConfig:
    path = Path(path)
    return config_from_dict(read_yaml_mapping(path, "parameters file"), str(path))


def with_overrides(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """Apply dotted-key overrides (e.g. the best Tune trial's {"model.hidden_dim": 256}) and re-validate."""
    raw = config.model_dump(mode="python", by_alias=True)
    for dotted_key, value in overrides.items():
        section, _, key = dotted_key.partition(".")
        if section not in raw or not key:
            raise PipelineError(f"override {dotted_key!r} does not name a section key")
        raw[section][key] = value
    return config_from_dict(raw, "overrides")


def merge_params(base: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """`base` with `overrides` laid over it, section by section: a nested mapping merges key by key (a
    recipe that sets `data.builtin.seed` keeps `data.builtin.n_pairs`), any other value replaces it.
    Returns a new dict; `base` is left as it was."""
    if not isinstance(overrides, dict):
        raise PipelineError(f"{source}: expected a mapping of sections at the top level")
    merged = copy.deepcopy(base)
    _merge_into(merged, overrides)
    return merged


def assignment_overrides(assignments: list[str]) -> dict[str, Any]:
    """`section.key=value` assignments (values parsed as YAML) as one nested mapping of overrides."""
    import yaml

    overrides: dict[str, Any] = {}
    for assignment in assignments:
        dotted, separator, value = assignment.partition("=")
        keys = dotted.strip().split(".")
        if not separator or not all(keys):
            raise PipelineError(f"expected section.key=value, got {assignment!r}")
        nested: Any = yaml.safe_load(value)
        for key in reversed(keys):
            nested = {key: nested}
        _merge_into(overrides, nested)
    return overrides


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe: parameter overrides in params.yaml's own shape (recipes/*.yaml)."""
    raw = read_yaml_mapping(path, "recipe")
    if not raw:
        raise PipelineError(f"{path}: a recipe is a mapping of params.yaml sections")
    return raw


def set_params(path: str | Path, assignments: list[str], recipe: str | Path | None = None) -> PipelineConfig:
    """Rewrite params.yaml with a recipe's overrides, then `section.key=value` assignments (values parsed as
    YAML), all validated before the file is touched.

    For machines without git, where `dvc exp run -S` is not available (a Ray job's uploaded copy), and to
    apply a recipe. Like `dvc exp run -S`, it edits the file round-trip: comments and key order stay.
    """

    path = Path(path)
    if path.exists():
        read_yaml_mapping(path, "parameters file")  # strict first: a bad file is named with its line
    document = _round_trip_load(path)
    overrides = read_recipe(recipe) if recipe is not None else {}
    overrides = merge_params(overrides, assignment_overrides(assignments), " ".join(assignments))
    _merge_into(document, overrides)
    described = " ".join([f"--recipe {recipe}"] * (recipe is not None) + list(assignments))
    config = config_from_dict(_plain(document), f"{path} with {described}")
    _round_trip_dump(document, path)
    return config


def _round_trip_load(path: Path) -> Any:
    from ruamel.yaml import YAML

    if not path.exists():
        return {}
    return YAML(typ="rt").load(path.read_text(encoding="utf-8")) or {}


def _round_trip_dump(document: Any, path: Path) -> None:
    from ruamel.yaml import YAML

    from pipeline.files import atomic_file

    writer = YAML(typ="rt")
    writer.indent(mapping=2, sequence=4, offset=2)
    writer.width = 4096  # never fold a long value onto a second line
    writer.representer.add_representer(  # `null`, as written by hand, not an empty value
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    with atomic_file(path) as handle:
        writer.dump(document, handle)


def _merge_into(node: Any, overrides: dict[str, Any]) -> None:
    """`merge_params`, in place, so the file's comments and key order stay where they were."""
    for key, value in overrides.items():
        current = node.get(key)
        if isinstance(value, dict) and value and isinstance(current, dict):
            _merge_into(current, value)
        else:
            node[key] = value


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists (what the config models validate)."""
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    return node
