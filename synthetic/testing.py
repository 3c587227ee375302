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


class EMAChecksum(Callback):
    """At the end of training, every rank writes the sum of its EMA weights to ``<run>/ema_rank<r>.txt`` (a DDP check
    that every rank holds the same average)."""

    def on_train_end(self, trainer, pl_module) -> None:
        from pathlib import Path

        total = sum(float(p.double().sum()) for p in pl_module.ema.model.shadow_params)
        (Path(trainer.default_root_dir) / f"ema_rank{trainer.global_rank}.txt").write_text(repr(total))


class DropoutDraws(Callback):
    """Record, at every U-Net forward in training, four numbers drawn from the global RNG there (where dropout draws
    its masks), and write them per rank to ``<run>/dropout_draws_rank<r>.json`` at the end of training."""

    def __init__(self):
        self.draws: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        import torch

        def record(module, args) -> None:
            if module.training:
                self.draws.append(torch.rand(4).tolist())

        self._hook = pl_module.sd.unet.register_forward_pre_hook(record)

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        self._hook.remove()
        (Path(trainer.default_root_dir) / f"dropout_draws_rank{trainer.global_rank}.json").write_text(json.dumps(self.draws))


class StepTimer(Callback):
    """Write the mean wall seconds per training step (after ``warmup`` steps) to ``<run>/step_time.json``."""

    def __init__(self, warmup: int = 10):
        self.warmup = int(warmup)
        self._start = None
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self._start = time.perf_counter()
        elif self._start is not None:
            self._steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        if self._start is not None and self._steps:
            seconds = (time.perf_counter() - self._start) / self._steps
            (Path(trainer.default_root_dir) / "step_time.json").write_text(json.dumps({"seconds_per_step": seconds,
                                                                                       "steps_timed": self._steps}))
