"""The training step under real DDP: two gloo ranks in two processes, on global batches too small for every
rank to have a share. Every rank must take part in every all-reduce, or the replicas drift apart and the
next collective fails."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainConfig
from pipeline.network.batching import micro_batches, target_tokens
from pipeline.network.training_step import UpdateStep
from tests.seq2seq_toys import sgd, toy_model, toy_split

# One-sentence global batches leave rank 1 (and, accumulating 2, three of four shares) empty; the last
# batch has a share for everyone, so a rank that skipped an all-reduce has one left over.
GLOBAL_BATCHES = [np.array([0]), np.array([1]), np.array([2, 3]), np.array([4, 5, 6, 7, 8])]
ARCH = "gru_attention"


def _config(accumulate: int) -> TrainConfig:
    return TrainConfig(batch_size=100_000, accumulate=accumulate, label_smoothing=0.1, grad_clip=1e9)


def _train(rank: int, world: int, accumulate: int) -> dict[str, torch.Tensor]:
    """The updates of GLOBAL_BATCHES on one rank (world 1: the whole batch in one process)."""
    split, config = toy_split(n=10), _config(accumulate)
    model = toy_model(ARCH)
    stepped = DistributedDataParallel(model) if world > 1 else model
    update = UpdateStep(stepped, *sgd(model), config, torch.device("cpu"), world_size=world)
    for batch in GLOBAL_BATCHES:
        shares = micro_batches(split, batch, rank, world, accumulate, 1)
        update(shares, target_tokens(split, batch))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _rank(rank: int, directory: str, accumulate: int) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting for an all-reduce its peer never launched fails the test quickly.
    store = f"file://{directory}/store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        weights = _train(rank, 2, accumulate)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    save_file(weights, f"{directory}/rank{rank}.safetensors")


@pytest.mark.slow  # two spawned processes with a gloo group: seconds
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ranks_without_a_share_stay_in_step_and_match_one_process(tmp_path: Path, accumulate: int) -> None:
    split = toy_split(n=10)
    shares = [micro_batches(split, GLOBAL_BATCHES[0], rank, 2, accumulate, 1) for rank in range(2)]
    assert any(share.placeholder for rank_shares in shares for share in rank_shares), "needs an empty share"
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path), accumulate), nprocs=2)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    with torch.random.fork_rng():
        one_process = _train(0, 1, accumulate)
    start = toy_model(ARCH).state_dict()
    assert any(not torch.equal(start[name], one_process[name]) for name in start), "the updates moved nothing"
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"replicas differ at {name}"
        torch.testing.assert_close(tensor, one_process[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_placeholder_counts_no_tokens_and_adds_no_gradient() -> None:
    """What an empty share's stand-in contributes: loss 0, gradient 0, and no target tokens."""
    split, config = toy_split(n=10), _config(1)
    (share,) = micro_batches(split, GLOBAL_BATCHES[0], 1, 2, 1, 1)
    assert share.placeholder and share.n_target_tokens == 0 and share.src.size(0) == 1
    model = toy_model(ARCH)
    update = UpdateStep(model, *sgd(model), config, torch.device("cpu"), world_size=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    smoothed, nll = update([share], target_tokens(split, GLOBAL_BATCHES[0]))
    assert float(smoothed) == 0.0 and float(nll) == 0.0
    assert all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_every_rank_starts_from_the_same_weights_and_draws_its_own_dropout() -> None:
    """What each Ray Train worker builds (`worker.seeded_model`): equal weights, different dropout masks."""
    from types import SimpleNamespace

    from pipeline.config import ModelConfig
    from pipeline.training.worker import seeded_model
    from tests.seq2seq_toys import VOCAB_SIZE

    data = SimpleNamespace(src_vocab_size=VOCAB_SIZE, tgt_vocab_size=VOCAB_SIZE)
    loop = SimpleNamespace(model=ModelConfig(arch=ARCH, dropout=0.5), train=TrainConfig(seed=3), data=data)
    models, masks = [], []
    for rank in range(2):
        models.append(seeded_model(loop, rank))
        masks.append(torch.nn.functional.dropout(torch.ones(1000), p=0.5))
    for name, tensor in models[0].state_dict().items():
        assert torch.equal(tensor, models[1].state_dict()[name]), name
    assert not torch.equal(masks[0], masks[1]), "both ranks drew the same dropout mask"
