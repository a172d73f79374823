"""Beam search rules on one trained model: what masking <pad> and <s> and forcing </s> at the length limit
change, beside the rules without them, on the same weights and test split.

    python -m benchmarks.decoding --project DIR [--beam-size 5] [--out FILE]     # from the project root
    python -m benchmarks.decoding --project DIR --split validation --length-penalties 0.4,0.6,0.8,1.0,1.2

DIR is a project after `train` (its models/ and data/processed/). Every variant translates the test split
with the evaluate stage's `Translator` and the model folder's decoding settings. The rules without the
masking or the forcing are re-created here, for one variant's run only, by replacing the next-token scoring
the search uses (`decoding.next_token_log_probs`):
- "no <pad>/<s> mask": <pad> and <s> keep their probabilities, so the search may pick them;
- "limit without </s>": a hypothesis at its length limit ends there with its score as it is, without the
  probability of </s>.
Rows: lowercase BLEU, BLEU and chrF on the split, the hypotheses that reached their length limit, and the
decoding seconds. With `--length-penalties`, one row per length penalty instead, with the shipped rules:
how a default penalty is chosen (on the validation split; the test split takes no part).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.results import write_result
from pipeline.network import decoding, translator
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID

Scoring = Callable[[Tensor, Tensor], Tensor]
SHIPPED: Scoring = decoding.next_token_log_probs  # the search's scoring as the pipeline ships it


def without_special_mask(logits: Tensor, at_limit: Tensor) -> Tensor:
    """The search's scoring with <pad> and <s> left as the model scores them."""
    masked = SHIPPED(logits, at_limit)
    masked[:, [PAD_ID, BOS_ID]] = torch.log_softmax(logits.float(), dim=-1)[:, [PAD_ID, BOS_ID]]
    return masked


def limit_without_eos(logits: Tensor, at_limit: Tensor) -> Tensor:
    """The search's scoring with a hypothesis at its limit ending at no cost: </s> scores 0 there."""
    log_probs = SHIPPED(logits, at_limit)
    log_probs[at_limit, EOS_ID] = 0.0
    return log_probs


VARIANTS: dict[str, Scoring] = {
    "as shipped": SHIPPED,
    "no <pad>/<s> mask": without_special_mask,
    "limit without </s>": limit_without_eos,
}


@contextlib.contextmanager
def searching_with(scoring: Scoring, counts: dict[str, int]) -> Iterator[None]:
    """The search scores next tokens with `scoring`; `counts` gets the hypotheses whose length (with </s>)
    reached their sentence's limit, and those holding <pad> or <s>."""
    search = translator.decode_batch

    def counted(model: Any, src: Tensor, src_lengths: Tensor, **settings: Any) -> list[list[int]]:
        hypotheses = search(model, src, src_lengths, **settings)
        limits = decoding.max_lengths(src_lengths, settings.get("max_len_ratio"), settings.get("max_len"))
        counts["at_limit"] += sum(
            len(ids) + 1 >= limit for ids, limit in zip(hypotheses, limits, strict=True)
        )
        counts["special"] += sum(PAD_ID in ids or BOS_ID in ids for ids in hypotheses)
        return hypotheses

    decoding.next_token_log_probs, translator.decode_batch = scoring, counted
    try:
        yield
    finally:
        decoding.next_token_log_probs, translator.decode_batch = SHIPPED, search


def run_variant(
    name: str,
    scoring: Scoring,
    project: Path,
    split: str,
    beam_size: int,
    length_penalty: float | None = None,
) -> dict[str, Any]:
    from pipeline.network.model_files import load_model_dir
    from pipeline.network.scoring import score_corpus

    sources, references = load_split(project, split)
    loaded = load_model_dir(project / "models")
    counts = {"at_limit": 0, "special": 0}
    started = time.perf_counter()
    with searching_with(scoring, counts):
        search = translator.Translator(loaded, length_penalty=length_penalty)
        hypotheses = search.translate(sources, beam_size=beam_size)
    seconds = time.perf_counter() - started
    scores = score_corpus(hypotheses, references).scores
    return {
        "decoding": name,
        "split": split,
        "beam size": beam_size,
        "length penalty": search.length_penalty,
        "lowercase BLEU": scores["bleu_lc"],
        "BLEU": scores["bleu"],
        "chrF": scores["chrf"],
        "hypotheses at the length limit": counts["at_limit"],
        "hypotheses with <pad> or <s>": counts["special"],
        "sentences": len(sources),
        "decoding s": seconds,
    }


def load_split(project: Path, split: str) -> tuple[list[str], list[str]]:
    from pipeline.data.processed import load_processed

    return load_processed(project / "data" / "processed", splits=(split,)).texts(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project after train")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--length-penalties", help="comma-separated: one row each, shipped rules")
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCHMARK_THREADS", "2")))
    if args.length_penalties:
        runs = [("as shipped", SHIPPED, float(alpha)) for alpha in args.length_penalties.split(",")]
    else:
        runs = [(name, scoring, None) for name, scoring in VARIANTS.items()]
    rows = []
    for name, scoring, alpha in runs:
        rows.append(run_variant(name, scoring, args.project, args.split, args.beam_size, alpha))
        print(rows[-1], flush=True)
    if args.out:
        write_result(args.out, "decoding", rows, [f"torch threads: {torch.get_num_threads()}"])


if __name__ == "__main__":
    main()
