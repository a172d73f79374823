"""What a checkpoint carries besides the weights, without Ray: the epochs kept for `train.average_last`
(ending at the best epoch, integer buffers included, across a resume), fp16's loss scaler, and the precision
`auto` picks on a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import micro_batches, target_tokens
from pipeline.network.training_step import UpdateStep, resolve_precision
from pipeline.training.checkpoint import Checkpointer, TrainState, averaged_best_weights
from tests.seq2seq_toys import sgd, toy_model, toy_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VAL_LOSSES = [3.0, 2.0, 1.0, 1.5, 1.7]  # the best epoch is 2


def _with_integer_buffer() -> nn.Module:
    """A Linear and a BatchNorm, whose `num_batches_tracked` is an int64 buffer."""
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))


def _set_epoch_weights(model: nn.Module, epoch: int) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float(epoch))
    model[1].num_batches_tracked.fill_(10 * epoch)


def _checkpointer(
    model: nn.Module, rank: int = 0, scaler: torch.amp.GradScaler | None = None
) -> Checkpointer:
    optimizer, scheduler = sgd(model)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return Checkpointer(model, optimizer, scheduler, scaler, rank, 1, torch.device("cpu"))


def _round_trip(payload: dict) -> dict:
    """A payload through torch.save and the weights_only load that `read_checkpoint` does."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def _epochs(model: nn.Module, state: TrainState, epochs: range, count: int) -> None:
    for epoch in epochs:
        _set_epoch_weights(model, epoch)
        state.record({"epoch": epoch, "val_loss": VAL_LOSSES[epoch]})
        state.keep_weights(model, count)


def test_average_last_averages_the_epochs_ending_at_the_best_one_across_a_resume() -> None:
    model = _with_integer_buffer()
    uninterrupted = TrainState()
    _epochs(model, uninterrupted, range(5), count=2)

    resumed_model = _with_integer_buffer()
    before = TrainState()
    _epochs(resumed_model, before, range(3), count=2)
    saved = _round_trip(_checkpointer(resumed_model).payload(before, []))
    state = _checkpointer(_with_integer_buffer()).restore(saved)
    _epochs(resumed_model, state, range(3, 5), count=2)

    for kept in (uninterrupted, state):
        averaged = averaged_best_weights(_round_trip({"state": kept.shared_fields()})["state"])
        assert averaged is not None
        torch.testing.assert_close(averaged["0.weight"], torch.full((3, 3), 1.5))  # epochs 1 and 2
        assert averaged["1.num_batches_tracked"].dtype == torch.int64
        assert int(averaged["1.num_batches_tracked"]) == 20, "integer buffers come from the best epoch"
        assert len(kept.recent_weights) == 2 and float(kept.recent_weights[-1]["0.bias"][0]) == 4.0


def test_only_rank_0_keeps_the_epoch_weights_after_a_resume() -> None:
    state = TrainState()
    _epochs(_with_integer_buffer(), state, range(2), count=2)
    saved = _round_trip(_checkpointer(_with_integer_buffer()).payload(state, []))
    restored = _checkpointer(_with_integer_buffer(), rank=1).restore(saved)
    assert restored.recent_weights == [] and restored.best_weights == []
    assert restored.epoch == 1 and restored.best_val_loss == 2.0


def test_a_resumed_fp16_run_keeps_the_loss_scale_and_updates_as_the_uninterrupted_one() -> None:
    split, config = toy_split(), TrainConfig(batch_size=100_000, precision="fp16", label_smoothing=0.0)
    batch = np.arange(len(split))

    def step(update: UpdateStep) -> None:
        update(micro_batches(split, batch, 0, 1, 1, 1), target_tokens(split, batch))

    model = toy_model("gru_attention")
    update = UpdateStep(model, *sgd(model), config, torch.device("cpu"))
    step(update)
    update.scaler.update(new_scale=1024.0)  # a scale that a run reaches after overflows, not the initial one
    checkpointer = Checkpointer(
        model, update.optimizer, update.scheduler, update.scaler, 0, 1, torch.device("cpu")
    )
    saved = _round_trip(checkpointer.payload(TrainState(), []))

    fresh = toy_model("gru_attention", seed=1)
    resumed = UpdateStep(fresh, *sgd(fresh), config, torch.device("cpu"))
    Checkpointer(
        fresh, resumed.optimizer, resumed.scheduler, resumed.scaler, 0, 1, torch.device("cpu")
    ).restore(saved)
    assert resumed.scaler.get_scale() == 1024.0
    assert resumed.scaler.state_dict() == update.scaler.state_dict()
    step(update)
    step(resumed)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


@pytest.mark.parametrize(
    ("native_bf16", "asked", "expected"),
    [(True, "auto", "bf16"), (False, "auto", "fp16"), (False, "fp16", "fp16"), (True, "bf16", "bf16")],
)
def test_auto_precision_on_a_gpu_is_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, asked: str, expected: str
) -> None:
    """torch.cuda.is_bf16_supported() counts emulation (True on a V100 or T4): only the native answer counts.
    The device query is replaced (this machine has no GPU); the decision is the code under test."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert resolve_precision(asked, torch.device("cuda", 0)) == expected


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(PipelineError, match=r"train\.precision bf16: Tesla T4 has no native bfloat16"):
        resolve_precision("bf16", torch.device("cuda", 0))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_checkpoint_files_stay_plain_tensors(tmp_path: Path) -> None:
    """The scaler and the kept weights load with weights_only=True, as every checkpoint must."""
    model = toy_model("gru")
    state = TrainState()
    _epochs(_with_integer_buffer(), state, range(2), count=2)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    torch.save(_checkpointer(model, scaler=scaler).payload(state, []), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded["scaler"]["scale"] == scaler.get_scale() and len(loaded["state"]["best_weights"]) == 2
