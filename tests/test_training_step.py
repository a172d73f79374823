"""The training step on its own (no Ray): padded lengths, losses read once, precision, compile, the global
batch's micro-batches, weight decay groups, checkpoint averaging and the two losses reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.network.batching import (
    collate,
    micro_batches,
    target_tokens,
    token_budget_batches,
    update_shares,
)
from pipeline.network.encoded import EncodedSplit
from pipeline.network.training_step import (
    UpdateStep,
    build_optimizer,
    compiled,
    decay_groups,
    sequence_losses,
)
from pipeline.training.checkpoint import average_weights
from tests.seq2seq_toys import sgd, toy_model, toy_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ("gru", "gru_attention", "transformer")


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 120, "label_smoothing": 0.1, "lr": 1e-2, **overrides})


@pytest.mark.parametrize("arch", ARCHS)
def test_lengths_padded_to_a_multiple_give_the_loss_of_the_shortest_padding(arch: str) -> None:
    split, model = toy_split(), toy_model(arch).eval()
    indices = np.arange(len(split))
    tight, padded = collate(split, indices, pad_multiple=1), collate(split, indices, pad_multiple=8)
    assert padded.src.size(1) % 8 == 0 and padded.tgt_in.size(1) % 8 == 0
    assert padded.tgt_in.size(1) > tight.tgt_in.size(1), "the test must pad something"
    with torch.no_grad():
        losses = [
            sequence_losses(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out, 0.1)
            for batch in (tight, padded)
        ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)


def test_the_smoothed_and_the_plain_loss_come_from_the_same_logits() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    target[0, 3:] = 0  # padding
    smoothed, nll = sequence_losses(logits, target, label_smoothing=0.1)
    flat_logits, flat_target = logits.reshape(-1, 11), target.reshape(-1)
    expected = F.cross_entropy(flat_logits, flat_target, ignore_index=0, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(smoothed, expected)
    torch.testing.assert_close(
        nll, F.cross_entropy(flat_logits, flat_target, ignore_index=0, reduction="sum")
    )
    equal = sequence_losses(logits, target, label_smoothing=0.0)
    assert float(equal[0]) == float(equal[1])


def _epoch(update: UpdateStep, split: EncodedSplit, config: TrainConfig) -> float:
    """An epoch's plain losses as the worker sums them: on the device, read once at the end."""
    on_device = torch.zeros(())
    for batch in token_budget_batches(split, config.batch_size, seed=1):
        shares = micro_batches(split, batch, 0, 1, config.accumulate, config.pad_multiple)
        on_device += update(shares, target_tokens(split, batch))[1]
    return float(on_device)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_losses_summed_on_the_device_are_each_updates_loss_before_its_step(accumulate: int) -> None:
    """The sum read once an epoch equals the losses computed apart, batch by batch, with the weights each
    update started from: every micro-batch counted once, none after its optimizer step."""
    split, config = toy_split(), train_config(accumulate=accumulate)
    model = toy_model("gru_attention")
    update = UpdateStep(model, *build_optimizer(model, config, 100), config, torch.device("cpu"))
    summed, expected = torch.zeros(()), 0.0
    for batch in token_budget_batches(split, config.batch_size, seed=1):
        whole = collate(split, batch)
        with torch.no_grad():
            logits = model(whole.src, whole.src_lengths, whole.tgt_in)
            expected += float(sequence_losses(logits, whole.tgt_out, config.label_smoothing)[1])
        summed += update(micro_batches(split, batch, 0, 1, accumulate, 1), target_tokens(split, batch))[1]
    assert float(summed) == pytest.approx(expected, rel=1e-5)


def test_accumulated_micro_batches_give_the_update_of_the_whole_batch() -> None:
    """What makes the global batch independent of the number of workers: its gradient is the same however
    it is split, because every share divides by the global batch's token count."""
    split = toy_split()
    weights = []
    for accumulate in (1, 4):
        config = train_config(accumulate=accumulate, batch_size=100_000, label_smoothing=0.0)
        model = toy_model("transformer")
        update = UpdateStep(model, *sgd(model), config, torch.device("cpu"))
        _epoch(update, split, config)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-4, atol=1e-5)


def _rank_gradients(split: EncodedSplit, config: TrainConfig, rank: int, world: int) -> list[torch.Tensor]:
    """The gradient one rank hands to DDP's all-reduce for one global batch of the whole split."""
    batch = np.arange(len(split))
    model = toy_model("gru_attention")
    update = UpdateStep(model, *sgd(model), config, torch.device("cpu"), world_size=world)
    update(micro_batches(split, batch, rank, world, 1, 1), target_tokens(split, batch))
    return [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize("denominator", ["global", "rank"])
def test_two_ranks_average_to_the_batch_mean_or_to_the_mean_of_rank_means(denominator: str) -> None:
    """DDP averages the ranks' gradients. Divided by the global token count, that average is the whole
    batch's gradient per token; divided by each rank's own count, it is the mean of two per-token means,
    which differs when the shares have unequal token counts."""
    split = toy_split()
    config = train_config(batch_size=100_000, label_smoothing=0.0, grad_clip=1e9)
    shares = update_shares(np.arange(len(split)), 0, 2, 1) + update_shares(np.arange(len(split)), 1, 2, 1)
    rank_tokens = [target_tokens(split, share) for share in shares]
    assert rank_tokens[0] != rank_tokens[1], "the test needs shares of unequal token counts"
    whole = _rank_gradients(split, config, 0, 1)
    as_global = [_rank_gradients(split, config, rank, 2) for rank in range(2)]
    chosen = config.model_copy(update={"loss_denominator": denominator})
    ranks = [_rank_gradients(split, chosen, rank, 2) for rank in range(2)]
    averaged = [(first + second) / 2 for first, second in zip(*ranks, strict=True)]
    if denominator == "global":
        for got, expected in zip(averaged, whole, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        return
    # A rank's summed-loss gradient is its global-mode gradient times (global tokens / 2).
    total = sum(rank_tokens)
    means = [
        [gradient * total / 2 / tokens for gradient in gradients]
        for gradients, tokens in zip(as_global, rank_tokens, strict=True)
    ]
    expected_mean_of_means = [(first + second) / 2 for first, second in zip(*means, strict=True)]
    for got, expected in zip(averaged, expected_mean_of_means, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    pairs = zip(averaged, whole, strict=True)
    differs = [not torch.allclose(got, w, rtol=1e-3, atol=1e-6) for got, w in pairs]
    assert any(differs), "the mean of rank means should differ from the batch mean"


def test_every_rank_and_micro_batch_gets_its_share_of_a_global_batch_once() -> None:
    batch = np.arange(10)
    shares = [share for rank in range(2) for share in update_shares(batch, rank, 2, 3)]
    assert sorted(np.concatenate([s for s in shares if s is not None]).tolist()) == list(range(10))
    assert update_shares(np.arange(3), 1, 2, 2) == [update_shares(np.arange(3), 1, 2, 2)[0], None]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_a_tiny_model(precision: str) -> None:
    split, config = toy_split(), train_config(precision=precision, label_smoothing=0.0)
    model = toy_model("gru_attention")
    optimizer, scheduler = build_optimizer(model, config, 60)
    update = UpdateStep(model, optimizer, scheduler, config, torch.device("cpu"))
    assert update.scaler.is_enabled() == (precision == "fp16")
    tokens = sum(target_tokens(split, b) for b in token_budget_batches(split, config.batch_size, seed=1))
    losses = [_epoch(update, split, config) / tokens for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_one_fp16_update_with_clipping_equals_the_fp32_update() -> None:
    """Loss scaling undone before clipping: with SGD (which, unlike Adam, moves by the gradient's size) and a
    clip norm every gradient exceeds, a missing or late unscale would clip the scaled gradient and move the
    weights by the clip norm divided by the scale."""
    split = toy_split()
    batch = np.arange(len(split))
    deltas = {}
    for precision in ("fp32", "fp16"):
        config = train_config(precision=precision, label_smoothing=0.0, grad_clip=0.05)
        model = toy_model("gru_attention")
        start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        update = UpdateStep(model, *sgd(model), config, torch.device("cpu"))
        update(micro_batches(split, batch, 0, 1, 1, 1), target_tokens(split, batch))
        deltas[precision] = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - start
    assert float(deltas["fp32"].norm()) == pytest.approx(0.5 * 0.05, rel=1e-3), "the clip norm must bind"
    assert float((deltas["fp16"] - deltas["fp32"]).norm()) < 0.02 * float(deltas["fp32"].norm())


@pytest.mark.slow
def test_a_compiled_step_equals_an_eager_one() -> None:
    split = toy_split(n=16)
    batches = token_budget_batches(split, 400, seed=1)[:2]
    results = []
    for compile_ in (False, True):
        config = train_config(compile=compile_, label_smoothing=0.0, pad_multiple=8)
        model = toy_model("transformer")
        update = UpdateStep(
            compiled(model, config, torch.device("cpu")), *sgd(model), config, torch.device("cpu")
        )
        losses = [
            float(update(micro_batches(split, b, 0, 1, 1, 8), target_tokens(split, b))[1]) for b in batches
        ]
        results.append((losses, model.state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    for key, value in results[0][1].items():
        torch.testing.assert_close(value, results[1][1][key], rtol=1e-3, atol=1e-5)


def test_weight_decay_skips_biases_norms_and_embeddings() -> None:
    model = toy_model("transformer")
    decayed, exempt = decay_groups(model, 0.01)
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert any(name.endswith("bias") for name in exempt_names)
    assert any("norm" in name for name in exempt_names)
    assert any("embedding" in name for name in exempt_names)
    assert all(model.get_parameter(name).ndim == 2 and "embedding" not in name for name in decayed_names)
    optimizer, _ = build_optimizer(model, train_config(adam_beta2=0.98), 10)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    everything, none = build_optimizer(model, train_config(weight_decay_scope="all"), 10)[0].param_groups
    assert len(everything["params"]) == len(list(model.parameters())) and not none["params"]


def test_averaging_checkpoints_gives_the_mean_of_their_weights() -> None:
    states = [toy_model("gru", seed=seed).state_dict() for seed in range(3)]
    averaged = average_weights(states)
    for key in states[0]:
        torch.testing.assert_close(averaged[key], sum(state[key] for state in states) / 3)
    assert average_weights(states[:1]).keys() == states[0].keys()


def test_an_update_mixes_length_buckets_and_an_epoch_covers_every_pair_once() -> None:
    """`train.length_buckets` N: each global batch joins N length-sorted sub-batches of batch_size / N
    tokens (the very batches of that budget, in their shuffled order), so it spans N ranges of target
    length instead of one; every pair is in exactly one batch."""
    split = toy_split(n=400, seed=3)
    lengths = split.tgt_lengths() + 1
    one_range = token_budget_batches(split, 240, seed=5)
    mixed = token_budget_batches(split, 240, seed=5, length_buckets=4)
    sub_batches = token_budget_batches(split, 60, seed=5)
    for batches in (one_range, mixed):
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(split)))
    expected = [np.concatenate(sub_batches[i : i + 4]) for i in range(0, len(sub_batches), 4)]
    assert [batch.tolist() for batch in mixed] == [batch.tolist() for batch in expected]
    assert all(lengths[sub].max() * len(sub) <= 60 for sub in sub_batches if len(sub) > 1)
    spans = [np.mean([np.ptp(lengths[batch]) for batch in batches]) for batches in (one_range, mixed)]
    assert spans[0] <= 1.0 < spans[1], spans  # one length range per update, against several
