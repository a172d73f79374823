"""The small project the cluster-in-a-box tests (and their benchmark) run: tiny models, a corpus under
corpus/ for DVC to track, the Ray Data engine and a train stage of 2 workers. (Tune stays off: a search is
tested in tests/test_tune_stage.py, and a train stage shows what late workers and a lost host do.)"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import TINY_PARAMS, deep_merge, write_pair_files

EPOCHS = 3
BOX_PARAMS = deep_merge(
    TINY_PARAMS,
    {
        "data": {"source": "corpus/box", "src_lang": "en", "tgt_lang": "art", "engine": "ray"},
        # Small batches: enough updates that the tiny model learns, and epochs long enough to be killed in.
        "train": {"epochs": EPOCHS, "batch_size": 600, "lr": 0.01},
        "runtime": {"num_workers": 2},
    },
)


def write_corpus(project: Path) -> None:
    """corpus/box/train.{en,art}: 1,500 built-in pairs (validation and test are carved from them); and
    to_translate.txt, 40 source lines, a file in the project for `translate --input`."""
    from pipeline.data.builtin_corpus import generate_corpus

    pairs = generate_corpus(1500, seed=13)
    write_pair_files(project / "corpus" / "box", pairs)
    (project / "to_translate.txt").write_text("".join(f"{s}\n" for s, _ in pairs[:40]), encoding="utf-8")
