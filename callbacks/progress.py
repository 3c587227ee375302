"""A progress bar for step-based training: shows ``step 120/400`` and the loss.

Lightning's bar reads ``Epoch 6/-2`` when a run is bounded by ``max_steps`` (``max_epochs=-1``);
with a handful of hand-picked images an "epoch" is a few batches and tells the user nothing.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class _StepMetrics:
    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            metrics = {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
        return metrics


class StepRichProgressBar(_StepMetrics, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)


class StepTQDMProgressBar(_StepMetrics, TQDMProgressBar):
    pass


def step_progress_bar():
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
