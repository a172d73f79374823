"""What a long stage prints while it works: one line per training epoch, and progress over a known total
(a bar on a terminal, a line every few seconds in a log). `python -m pipeline -q` silences both."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

QUIET_ENV = "PIPELINE_QUIET"  # set by `-q`; inherited by the Ray processes the stage starts
LOG_EVERY_S = 10.0  # without a terminal: one progress line at most this often

logger = logging.getLogger("pipeline.progress")


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def on_terminal() -> bool:
    return sys.stderr.isatty() and not quiet()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(metrics: dict[str, Any], epochs: int, elapsed_s: float, epochs_this_run: int) -> str:
    """`epoch 3/10: train loss 2.41, val loss 2.10, val BLEU 31.2, 4,800 target tokens/s, 0:04:12 elapsed,
    ETA 0:09:48` (epochs count from 1 here; the ETA extrapolates this process's epochs)."""
    done = metrics["epoch"] + 1
    eta = elapsed_s / max(epochs_this_run, 1) * (epochs - done)
    bleu = f", val BLEU {metrics['val_bleu']:.1f}" if metrics.get("val_bleu") else ""
    return (
        f"epoch {done}/{epochs}: train loss {metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f}"
        f"{bleu}, {metrics['tokens_per_sec']:,.0f} target tokens/s, {_duration(elapsed_s)} elapsed,"
        f" ETA {_duration(eta)}"
    )


class Progress:
    """Progress through `total` items: a tqdm bar on a terminal, else a log line every LOG_EVERY_S."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if on_terminal() and total:
            self.bar = tqdm(total=total, desc=what, unit="", file=sys.stderr, leave=False)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif not quiet() and time.monotonic() - self.last_line >= LOG_EVERY_S:
            self.last_line = time.monotonic()
            logger.info(
                "%s: %d/%d, %s elapsed",
                self.what,
                self.done,
                self.total,
                _duration(self.last_line - self.started),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
