"""Torch-only GPU benchmark: a recipe's model trained on encoded arrays with the project's own model, batches
and training step, on a box with PyTorch but no Ray, MLflow, DVC or `datasets`.

    python -m benchmarks.gpu_torch --recipe recipes/multi30k-transformer.yaml --processed DIR \\
        [--budget-s 300] [--set train.epochs=30 ...] [--out FILE] [--result FILE]      # from the project root

DIR is a data/processed folder made by `dvc repro preprocess` (or `python -m pipeline preprocess`) with the
recipe's data and preprocess settings: the encoded splits, the tokenizers and the test text. Copy it to
the GPU box; nothing else travels.

The model, optimizer, schedule and step (`UpdateStep`: `train.precision`, bf16 on CUDA by default) are the
ones every Ray Train worker runs. One process takes the recipe's global batch (`train.batch_size` target
tokens), so its updates match the recipe's DDP run. Training stops at the recipe's epochs or at the time
budget, whichever comes first; then the test split is translated with the recipe's beam search.

`--out` appends every figure of the run, per-epoch history included, as a JSON line; `--result` writes the
run's table row in the result format of benchmarks/results.py.

Printed per run: parameters, epochs, training target tokens/s, peak GPU memory, an MFU estimate and test
BLEU (cased), lowercase BLEU and chrF. MFU = model FLOPs per target token x tokens/s / the GPU's dense
bf16 peak; the FLOPs are counted by `torch.utils.flop_counter` over forward and backward of sample batches
(padding included), the peak is the datasheet figure and, beside it, a measured bf16 matrix product.

`--compare-cpu` also translates the test split on the CPU, greedy and with the beam, and reports the share
of sentences whose translation is the same on both devices (and the CPU's BLEU): the check that evaluate,
`translate` and the served model give the CPU's output on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import flops_per_target_token, params_with
from benchmarks.results import write_result
from pipeline.config import PipelineConfig
from pipeline.data.processed import ProcessedData, load_processed
from pipeline.network.batching import micro_batches, target_tokens, token_budget_batches
from pipeline.network.encoded import EncodedSplit
from pipeline.network.model import build_model, count_parameters
from pipeline.network.model_files import LoadedModel
from pipeline.network.scoring import corpus_scores
from pipeline.network.training_step import UpdateStep, build_optimizer, compiled
from pipeline.network.translator import Translator, translate_and_score
from pipeline.params_file import assignment_overrides, config_from_dict

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), in FLOP/s, by a name's distinctive part.
DATASHEET_BF16_PEAK = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12}


def recipe_config(recipe: Path, assignments: list[str]) -> PipelineConfig:
    """params.yaml, the recipe over it, then KEY=VALUE assignments: what `set-params --recipe` would make."""
    raw = params_with(recipe, assignment_overrides(assignments))
    return config_from_dict(raw, f"{recipe} {' '.join(assignments)}".strip())


def measured_bf16_peak(device: torch.device) -> float:
    """FLOP/s of a large bf16 matrix product on random data: what this card really gives."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def datasheet_peak(name: str) -> float | None:
    for key, peak in DATASHEET_BF16_PEAK.items():
        if key in name:
            return peak
    return None


def train_for_budget(
    model: torch.nn.Module,
    config: PipelineConfig,
    train: EncodedSplit,
    device: torch.device,
    budget_s: float,
) -> dict[str, Any]:
    """The recipe's epochs of `UpdateStep`, or fewer when the budget runs out; per-epoch tokens/s."""
    settings = config.train
    steps_per_epoch = len(token_budget_batches(train, settings.batch_size, seed=0))
    optimizer, scheduler = build_optimizer(model, settings, steps_per_epoch * settings.epochs, device)
    update = UpdateStep(compiled(model, settings, device), optimizer, scheduler, settings, device)
    torch.manual_seed(settings.seed)
    model.train()
    started, epochs_done, history = time.perf_counter(), 0.0, []
    for epoch in range(settings.epochs):
        batches = token_budget_batches(train, settings.batch_size, seed=settings.seed * 1000 + epoch)
        epoch_start, tokens, steps = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)  # read once an epoch, as the workers do
        for indices in batches:
            shares = micro_batches(train, indices, 0, 1, settings.accumulate, settings.pad_multiple)
            steps += 1
            loss_sum += update(shares, target_tokens(train, indices))[1]
            tokens += target_tokens(train, indices)
            if time.perf_counter() - started >= budget_s:
                break
        loss = float(loss_sum) / tokens
        seconds = time.perf_counter() - epoch_start
        epochs_done += steps / len(batches)
        history.append({"epoch": epoch + 1, "loss": loss, "tokens_per_s": tokens / seconds})
        elapsed = time.perf_counter() - started
        print(
            f"  epoch {epoch + 1}/{settings.epochs}: loss {loss:.3f},"
            f" {tokens / seconds:,.0f} target tokens/s, {elapsed:.0f} s",
            flush=True,
        )
        if elapsed >= budget_s:
            break
    return {
        "epochs": round(epochs_done, 2),
        "train_seconds": time.perf_counter() - started,
        # The first epoch pays for warm-up (cuDNN/cuBLAS plans, allocator growth): left out if there are more.
        "tokens_per_s": statistics.median(h["tokens_per_s"] for h in history[1:] or history),
        "history": history,
    }


def cpu_agreement(
    loaded: LoadedModel,
    sources: list[str],
    references: list[str],
    config: PipelineConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The share of test sentences translated identically on `device` and on the CPU, greedy and with the
    recipe's beam (each Translator moves the model to its device), and the CPU's beam BLEU."""
    settings = config.evaluate
    result: dict[str, Any] = {}
    for name, beam_size in (("greedy", 1), ("beam", settings.beam_size)):
        on_device, on_cpu = (
            Translator(
                loaded,
                length_penalty=settings.length_penalty,
                max_len_ratio=settings.max_len_ratio,
                device=where,
            ).translate(sources, beam_size=beam_size, batch_size=settings.batch_size)
            for where in (device, torch.device("cpu"))
        )
        pairs = list(zip(on_device, on_cpu, strict=True))
        result[f"cpu_identical_{name}"] = sum(a == b for a, b in pairs) / len(pairs)
        result[f"cpu_differing_{name}"] = [(i, a, b) for i, (a, b) in enumerate(pairs) if a != b][:5]
    result["cpu_bleu"] = corpus_scores(on_cpu, references)["bleu"]
    loaded.model.to(device)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = recipe_config(args.recipe, [*args.set, *(["train.compile=true"] if args.compile else [])])
    device = torch.device(args.device)
    processed: ProcessedData = load_processed(args.processed, splits=("train", "test"))
    train = processed.encoded("train").in_memory()
    vocab = (processed.src_vocab_size, processed.tgt_vocab_size)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, *vocab)
    flops = flops_per_target_token(model, train, config.train)
    model = model.to(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    trained = train_for_budget(model, config, train, device, args.budget_s)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else 0.0

    loaded = LoadedModel(
        model.eval(),
        config.model,
        processed.src_tokenizer,
        processed.tgt_tokenizer,
        config.evaluate.decoding(),
        Path(args.processed),
    )
    sources, references = processed.texts("test")
    decode_start = time.perf_counter()
    _, scored = translate_and_score(loaded, sources, references, config.evaluate, device=device)
    result = {
        "name": args.name or args.recipe.stem,
        "recipe": str(args.recipe),
        "overrides": args.set,
        "arch": config.model.arch,
        "parameters": count_parameters(model),
        "batch_target_tokens": config.train.batch_size,
        "compiled": config.train.compile,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "budget_s": args.budget_s,
        **{key: value for key, value in trained.items() if key != "history"},
        "peak_gpu_mib": round(peak_mib),
        "train_flops_per_target_token": flops,
        "test_decode_seconds": time.perf_counter() - decode_start,
        **scored.scores,
        **scored.signatures,
        **(cpu_agreement(loaded, sources, references, config, device) if args.compare_cpu else {}),
        "history": trained["history"],
    }
    if on_gpu:
        name = result["device"]
        sheet, measured = datasheet_peak(name), measured_bf16_peak(device)
        achieved = flops * result["tokens_per_s"]
        result["achieved_tflops"] = achieved / 1e12
        result["measured_bf16_peak_tflops"] = measured / 1e12
        result["mfu_vs_measured_peak"] = achieved / measured
        result["mfu"] = achieved / sheet if sheet else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True, help="a recipes/*.yaml file")
    parser.add_argument("--processed", type=Path, required=True, help="a data/processed folder for it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training time budget, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile", action="store_true", help="train.compile: true (torch.compile; CUDA graphs)"
    )
    parser.add_argument("--name", default=None, help="the run's name in the table (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None, help="append the result as a JSON line here")
    parser.add_argument("--result", type=Path, default=None, help="write the run's table row (JSON) here")
    parser.add_argument(
        "--compare-cpu", action="store_true", help="also translate the test split on the CPU and compare"
    )
    args = parser.parse_args()
    result = run(args)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
    if args.result:
        write_result(args.result, "gpu_torch", [table_row(result)], result_notes(result))
    print_row(result)


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """The run's figures as one row of the benchmark's table."""
    mfu = result.get("mfu")
    return {
        "run": result["name"],
        "parameters M": result["parameters"] / 1e6,
        "epochs": result["epochs"],
        "train s": result["train_seconds"],
        "target tokens/s": result["tokens_per_s"],
        "peak GPU GiB": round(result["peak_gpu_mib"] / 1024, 1),
        "MFU %": None if mfu is None else 100 * mfu,
        "test BLEU": result["bleu"],
        "lowercase BLEU": result["bleu_lc"],
        "chrF": result["chrf"],
        "test decode s": result["test_decode_seconds"],
    }


def result_notes(result: dict[str, Any]) -> list[str]:
    notes = [f"{result['batch_target_tokens']:,} target tokens a batch"]
    if "measured_bf16_peak_tflops" in result:
        notes.append(f"a 8192³ bf16 matrix product ran at {result['measured_bf16_peak_tflops']:.0f} TFLOP/s")
    if "cpu_identical_beam" in result:
        notes.append(
            f"translated as on the CPU: greedy {result['cpu_identical_greedy']:.1%},"
            f" beam {result['cpu_identical_beam']:.1%} of test sentences"
        )
    return notes


def print_row(result: dict[str, Any]) -> None:
    mfu = result.get("mfu")
    print(
        f"{result['name']:<28} {result['arch']:<13} {result['parameters'] / 1e6:5.1f}M"
        f" {result['epochs']:6.2f} ep {result['train_seconds']:6.0f} s {result['tokens_per_s']:>10,.0f} tok/s"
        f" {result['peak_gpu_mib']:>7,} MiB  MFU {'-' if mfu is None else f'{mfu:.1%}'}"
        f"  BLEU {result['bleu']:.1f} lc {result['bleu_lc']:.1f} chrF {result['chrf']:.1f}",
        flush=True,
    )
    if "cpu_identical_beam" in result:
        print(
            f"{'':<28} same as the CPU: greedy {result['cpu_identical_greedy']:.1%},"
            f" beam {result['cpu_identical_beam']:.1%} (CPU BLEU {result['cpu_bleu']:.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
