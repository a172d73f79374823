"""Progress output: the per-epoch line's content, periodic lines without a terminal, and `-q`."""

from __future__ import annotations

import logging

import pytest

from pipeline import progress
from pipeline.progress import Progress, epoch_line


def test_epoch_line_says_where_training_is_and_when_it_ends() -> None:
    metrics = {"epoch": 2, "train_loss": 2.4107, "val_loss": 2.1, "val_bleu": 31.24, "tokens_per_sec": 4800.4}
    line = epoch_line(metrics, epochs=10, elapsed_s=252, epochs_this_run=3)
    assert line == (
        "epoch 3/10: train loss 2.411, val loss 2.100, val BLEU 31.2, 4,800 target tokens/s,"
        " 0:04:12 elapsed, ETA 0:09:48"
    )


def test_without_a_terminal_progress_is_a_periodic_log_line_and_quiet_silences_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    counter = Progress(1000, "translating")
    counter.update(128)
    counter.update(128)
    counter.close()
    assert [record.getMessage().split(",")[0] for record in caplog.records] == [
        "translating: 128/1000",
        "translating: 256/1000",
    ]
    caplog.clear()
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    Progress(1000, "translating").update(500)
    assert caplog.records == []
