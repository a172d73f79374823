"""CPU training throughput of the Transformer against GRU + attention at equal parameter count.

    python -m benchmarks.arch_throughput [--data ../shared/data/multi30k] [--batches 10] [--epochs 3] \\
        [--out FILE]

The Transformer is `recipes/multi30k-transformer-cpu.yaml`'s; the `gru_attention` model takes the
hidden size that brings its parameter count closest to it (same embedding width, same joint vocabulary,
same data). Both run the very `train_step` of every Ray Train worker in the bare loop of
`benchmarks/common.py`: one process, one torch thread, the recipe's per-worker batch of target tokens,
`--batches` batches an epoch; the figure is the median of the epochs after the first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import REPO_ROOT, bare_loop_tokens_per_sec, median, prepared_builtin_corpus
from benchmarks.quality import DEFAULT_DATA
from benchmarks.results import write_result
from pipeline.config import ModelConfig
from pipeline.network.model import build_model, count_parameters
from pipeline.params_file import read_recipe

RECIPE = REPO_ROOT / "recipes" / "multi30k-transformer-cpu.yaml"


def matching_gru_attention(transformer, vocab: tuple[int, int]):
    """The one-layer gru_attention config with the transformer's emb_dim closest to it in parameters."""
    target = count_parameters(build_model(transformer, *vocab))
    candidates = [
        transformer.model_copy(update={"arch": "gru_attention", "n_layers": 1, "hidden_dim": hidden})
        for hidden in range(64, 2049, 16)
    ]
    return min(candidates, key=lambda config: abs(count_parameters(build_model(config, *vocab)) - target))


def model_name(model_config: ModelConfig) -> str:
    sizes = (
        f"d {model_config.emb_dim}"
        if model_config.arch == "transformer"
        else f"emb {model_config.emb_dim}, hidden {model_config.hidden_dim}"
    )
    return f"{model_config.arch} ({sizes})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Multi30k folder")
    parser.add_argument("--batches", type=int, default=10, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = parser.parse_args()
    recipe = read_recipe(RECIPE)
    data = {"source": str(args.data.resolve()), "src_lang": "de", "tgt_lang": "en"}
    config, processed = prepared_builtin_corpus({"data": data, "preprocess": recipe["preprocess"]})
    transformer = config.model.model_validate({**config.model.model_dump(), **recipe["model"]})
    train_config = config.train.model_validate({**config.train.model_dump(), **recipe["train"]})
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    split = processed.encoded("train")
    print("| model | parameters | target tokens/s (1 thread) | per parameter, vs transformer |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for model_config in (transformer, matching_gru_attention(transformer, vocab)):
        rates, _ = bare_loop_tokens_per_sec(
            model_config, train_config, split, vocab, args.epochs, max_batches=args.batches
        )
        parameters = count_parameters(build_model(model_config, *vocab))
        rows.append((model_config, parameters, median(rates[1:] or rates)))
    base = rows[0][2] * rows[0][1]
    for model_config, parameters, rate in rows:
        print(
            f"| {model_name(model_config)} | {parameters / 1e6:.2f} M | {rate:,.0f}"
            f" | {rate * parameters / base:.2f} |"
        )
    if args.out:
        figures = [
            {"model": model_name(model_config), "parameters M": parameters / 1e6, "target tokens/s": rate}
            for model_config, parameters, rate in rows
        ]
        write_result(args.out, "arch_throughput", figures)


if __name__ == "__main__":
    main()
