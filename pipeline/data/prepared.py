"""data/prepared: the prepare stage's output, which preprocess reads. This module is the one place that
knows its layout.

A `datasets.DatasetDict` (splits train/validation/test, string columns `src`, `tgt`) saved with
`save_to_disk`, plus `corpus.json` naming the source and languages, so the next stage can tell when
data/prepared was made for another language pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import SPLITS, DataConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, read_json_object, write_json

if TYPE_CHECKING:  # preprocess reads data/prepared without the corpus sources
    from pipeline.data.cleaning import PreparedCorpus
    from pipeline.data.sources import RawCorpus

CORPUS_INFO = "corpus.json"

Texts = dict[str, tuple[list[str], list[str]]]  # split -> (source sentences, target sentences)


def save_prepared(prepared: PreparedCorpus, corpus: RawCorpus, target: Path) -> None:
    import datasets

    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    splits = {
        name: datasets.Dataset.from_dict(
            {"src": [src for src, _ in pairs], "tgt": [tgt for _, tgt in pairs]}, features=features
        )
        for name, pairs in prepared.splits.items()
    }
    with atomic_dir(target) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        write_json(
            tmp / CORPUS_INFO,
            {
                "source": corpus.source,
                "src_lang": corpus.src_lang,
                "tgt_lang": corpus.tgt_lang,
                "pairs": {name: len(pairs) for name, pairs in prepared.splits.items()},
            },
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
    info = read_json_object(info_path)
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
