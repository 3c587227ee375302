"""``best.ckpt``: the checkpoint with the best validation metric among those whose monitored copy rate is within a limit.

Plain fine-tuning keeps improving its FID while it starts to copy its training patients (docs/memorization.md), so
"the last checkpoint" and "the lowest FID" are both the wrong choice for a model that is to be shared.
:class:`BestCheckpoint` (a ``trainer.callbacks`` entry beside a ``MemorizationMonitor`` and the callback that logs the
metric, e.g. ``FIDCallback``) applies one rule at every validation:

* the **candidate** is the model at this validation's step; its **copy rate** is the ``MemorizationMonitor``'s check at
  the same step (set ``val_check_interval`` and the monitor's ``every_n_steps`` so they meet; a validation without a
  check at its step is recorded and skipped);
* it is **eligible** when that copy rate is at or below ``copy_rate_limit``;
* among the eligible candidates the one with the lowest ``metric`` (``mode: max``: the highest) is written to
  ``<run>/checkpoints/best.ckpt``; ``metric`` is a logged key, or the mean of the keys below it (``val/fid``: the mean of
  ``FIDCallback``'s ``val/fid/<prompt>``).

``<run>/best.json`` holds the rule, every candidate (step, metric, copy rate, eligible) and the step chosen (null while
none was eligible); the callback's state is in ``last.ckpt``, so a resumed run goes on choosing as the straight run
would. ``python export.py runs/<name> OUT --ckpt best`` exports the chosen checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from core.cache import atomic_write
from core.errors import UserError

BEST_FILE, RECORD_FILE = "best.ckpt", "best.json"


class BestCheckpointError(UserError, ValueError):
    """A BestCheckpoint that cannot apply its rule."""


class BestCheckpoint(Callback):
    """Keep ``checkpoints/best.ckpt``: the best ``metric`` among the validations whose copy rate (the
    ``MemorizationMonitor``'s check at the same step) is at most ``copy_rate_limit``.

    Args:
        copy_rate_limit: the highest copy rate a chosen checkpoint may have (a fraction, 0 to 1). The monitor's
            threshold flags about its calibration quantile's complement of held-out images too (e.g. 0.05 at 0.95),
            so a limit near that rate means "copies no more than unseen patients look copied".
        metric: a logged key, or the prefix of several (their mean); default ``val/fid`` (``FIDCallback``).
        mode: ``min`` (FID, losses) or ``max`` (AUROC).
    """

    def __init__(self, copy_rate_limit: float, metric: str = "val/fid", mode: Literal["min", "max"] = "min"):
        if not isinstance(copy_rate_limit, (int, float)) or not 0 <= copy_rate_limit <= 1:
            raise BestCheckpointError(f"BestCheckpoint copy_rate_limit: {copy_rate_limit!r}; expected a fraction from 0 to 1")
        if mode not in ("min", "max"):
            raise BestCheckpointError(f"BestCheckpoint mode: {mode!r}; expected min or max")
        if not str(metric).strip():
            raise BestCheckpointError("BestCheckpoint metric: empty; expected a logged key such as val/fid or val/loss")
        self.copy_rate_limit, self.metric, self.mode = float(copy_rate_limit), str(metric).rstrip("/"), mode
        self.candidates: list[dict] = []
        self.best: Optional[dict] = None
        self._monitor = None

    # ------------------------------------------------------------------ the rule
    @property
    def rule(self) -> str:
        lowest = "lowest" if self.mode == "min" else "highest"
        return (f"the {lowest} {self.metric} among the validations whose MemorizationMonitor copy rate at the same step "
                f"is at most {self.copy_rate_limit:g}")

    def metric_value(self, metrics: dict) -> Optional[float]:
        """``metric`` from logged ``metrics``: the key itself, else the mean of the keys below it; None if absent."""
        if self.metric in metrics:
            return float(metrics[self.metric])
        below = [float(v) for k, v in metrics.items() if k.startswith(self.metric + "/")]
        return sum(below) / len(below) if below else None

    def consider(self, step: int, value: Optional[float], check: Optional[dict]) -> bool:
        """Record the candidate at ``step``; True when it becomes the best (and is to be saved)."""
        rate = check["copy_rate"] if check is not None and check.get("step") == step else None
        eligible = value is not None and math.isfinite(value) and rate is not None and rate <= self.copy_rate_limit
        why = ("no metric logged" if value is None else "metric not finite" if not math.isfinite(value)
               else "no copy-rate check at this step" if rate is None else
               f"copy rate above {self.copy_rate_limit:g}" if not eligible else None)
        self.candidates.append({"step": step, "value": value, "copy_rate": rate, "eligible": eligible, "why_not": why})
        better = eligible and (self.best is None or (value < self.best["value"] if self.mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"step": step, "value": value, "copy_rate": rate}
        return better

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [c for c in trainer.callbacks if type(c).__name__ == "MemorizationMonitor"]
        if not monitors:
            raise BestCheckpointError("BestCheckpoint needs a MemorizationMonitor in trainer.callbacks: its copy rate "
                                      "limits which checkpoints may be chosen (docs/memorization.md)")
        self._monitor = monitors[0]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._monitor is None:
            return
        step = trainer.global_step
        if any(c["step"] == step for c in self.candidates):  # a second validation at one step (end of an epoch)
            return
        value = self.metric_value({k: float(v) for k, v in trainer.callback_metrics.items()})
        # FID is logged on rank 0 only: every rank takes rank 0's decision, and all of them save (FSDP gathers)
        value = trainer.strategy.broadcast(value, src=0)
        if self.consider(step, value, self._monitor.last_check):
            trainer.save_checkpoint(self.best_path(trainer), weights_only=False)
        if trainer.is_global_zero:
            self.write_record(trainer)

    # ------------------------------------------------------------------ where and what is written
    @staticmethod
    def run_dir(trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def best_path(self, trainer: Trainer) -> Path:
        return self.run_dir(trainer) / "checkpoints" / BEST_FILE

    def record(self) -> dict:
        return {"rule": self.rule, "metric": self.metric, "mode": self.mode, "copy_rate_limit": self.copy_rate_limit,
                "chosen_step": self.best["step"] if self.best else None, "chosen": self.best,
                "checkpoint": f"checkpoints/{BEST_FILE}" if self.best else None, "candidates": self.candidates}

    def write_record(self, trainer: Trainer) -> None:
        path = self.run_dir(trainer) / RECORD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(self.record(), indent=1) + "\n").encode())

    def state_dict(self) -> dict:
        return {"candidates": list(self.candidates), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.candidates = list(state.get("candidates", []))
        self.best = state.get("best")
