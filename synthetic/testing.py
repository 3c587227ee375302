"""Callbacks for exercising the suite itself (kill/resume tests, pre-emption drills), not for real training."""
from __future__ import annotations

import time

from lightning.pytorch import Callback


class StepDelay(Callback):
    """Sleep ``seconds`` after every training batch, so a test (or you, rehearsing a pre-emption) can signal a
    run in mid-training. It changes no number: the same batches, noise and weights as without it."""

    def __init__(self, seconds: float = 0.05):
        if seconds < 0:
            raise ValueError(f"seconds: {seconds!r}; expected >= 0")
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        time.sleep(self.seconds)
