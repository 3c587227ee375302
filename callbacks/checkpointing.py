"""Checkpointing helpers: a final checkpoint whenever training ends."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class FinalCheckpoint(Callback):
    """Write ``path`` (normally ``<run>/checkpoints/last.ckpt``) for the last step of training.

    ``ModelCheckpoint`` writes ``last.ckpt`` every ``every_n_steps``; this saves the final step
    when it falls between two of those. It saves right after the batch that reaches ``max_steps``
    (not in ``on_train_end``), because there the loops still describe a run in the middle of an
    epoch: resuming it with a larger ``max_steps`` then continues exactly where it stopped.
    Training that ends otherwise (``max_epochs``, ``max_time``) is saved in ``on_train_end``.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 0):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _covered(self, step: int) -> bool:
        return step == self._saved_step or (self.every_n_steps > 0 and step % self.every_n_steps == 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if 0 < trainer.max_steps <= step and not self._covered(step):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and not self._covered(step):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step
