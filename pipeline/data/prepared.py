"""data/prepared: the prepare stage's output, which preprocess reads. This module is the one place that
knows its layout.

    data/prepared/
      train.arrow, validation.arrow, test.arrow   Arrow IPC streams, string columns `src` and `tgt`
                                                  (`datasets.Dataset.from_file` opens them too)
      corpus.json                                 source (and the Hub version read), languages and pairs
                                                  per split, so the next stage can tell data made for
                                                  another language pair
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import SPLITS, DataConfig
from pipeline.data.arrow_text import check_text_columns, iter_text_batches, read_texts
from pipeline.errors import PipelineError
from pipeline.files import read_json_object, write_json

if TYPE_CHECKING:  # preprocess reads data/prepared without the corpus sources
    from pipeline.data.sources import RawCorpus

CORPUS_INFO = "corpus.json"
SPLIT_FILE = "{split}.arrow"


def write_corpus_info(folder: Path, corpus: RawCorpus, pairs: dict[str, int]) -> None:
    """The last file the prepare stage writes into its (temporary) folder: what the splits hold."""
    info = {
        "source": corpus.source,
        "hub": corpus.hub.record() if corpus.hub else None,
        "src_lang": corpus.src_lang,
        "tgt_lang": corpus.tgt_lang,
        "pairs": pairs,
    }
    write_json(folder / CORPUS_INFO, info)


@dataclass(frozen=True)
class PreparedData:
    """data/prepared, checked: each split's file and size, read on demand."""

    path: Path
    pairs: dict[str, int]
    hub: dict[str, Any] | None = None  # the Hub version read (`HubVersion.record()`), for hf: sources

    def split_path(self, split: str) -> Path:
        return self.path / SPLIT_FILE.format(split=split)

    def text_batches(self, split: str) -> Iterator[tuple[list[str], list[str]]]:
        """(sources, targets) one Arrow batch at a time."""
        return iter_text_batches(self.split_path(split))

    def texts(self, split: str) -> tuple[list[str], list[str]]:
        """A whole split as two lists: for the (small) evaluation splits."""
        return read_texts(self.split_path(split))


def load_prepared(path: Path, data: DataConfig) -> PreparedData:
    """The prepare stage's output; PipelineError when missing, incomplete or made for other languages."""
    path = Path(path)
    info_path = path / CORPUS_INFO
    if not path.is_dir():
        raise PipelineError(f"{path} not found: run `python -m pipeline prepare` first")
    if not info_path.is_file():
        raise PipelineError(
            f"{path} is incomplete (no {CORPUS_INFO}): run `python -m pipeline prepare` again"
        )
    info = read_json_object(info_path)
    if (info.get("src_lang"), info.get("tgt_lang")) != (data.src_lang, data.tgt_lang):
        raise PipelineError(
            f"{path} holds {info.get('src_lang')}->{info.get('tgt_lang')} but params say "
            f"{data.src_lang}->{data.tgt_lang}: run `python -m pipeline prepare` again"
        )
    pairs = info.get("pairs")
    hub = info.get("hub")
    prepared = PreparedData(
        path, pairs if isinstance(pairs, dict) else {}, hub if isinstance(hub, dict) else None
    )
    for name in SPLITS:
        if not prepared.split_path(name).is_file() or not isinstance(prepared.pairs.get(name), int):
            raise PipelineError(
                f"{path} has no {name} split ({SPLIT_FILE.format(split=name)}): "
                "run `python -m pipeline prepare` again"
            )
        check_text_columns(prepared.split_path(name))  # before tokenizers are trained on it
    if not prepared.pairs["train"]:
        raise PipelineError(f"{path}: the train split is empty: run `python -m pipeline prepare` again")
    return prepared
