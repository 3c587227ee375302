"""A plain-text loss log beside W&B: ``<run>/losses.csv`` with one row per training batch.

Rows are ``batch,step,loss`` (global batch index, optimizer step, loss). Losses are kept as
tensors and written every ``flush_every`` batches and whenever a checkpoint is saved, so the log
never forces a GPU sync per step. The checkpoint callback saves after this one has taken the batch's
row (:class:`callbacks.checkpointing.RunCheckpoint` runs last), and the rows are fsynced before the
checkpoint is written: every row a checkpoint covers is on disk before it, even after a SIGKILL or a
power loss. A resumed run appends; rows after the checkpoint it resumed from (written before a kill,
replayed by the resume) are dropped first, so the file always matches the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class LossLog(Callback):
    def __init__(self, path: str | Path, flush_every: int = 50):
        self.path = Path(path)
        self.flush_every = flush_every
        self._pending: list[tuple[int, int, torch.Tensor]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if self.path.exists():
            rows = self.path.read_text().splitlines()
            kept = [rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) < done]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("\n".join(kept) + "\n")
            os.replace(tmp, self.path)  # a kill while rewriting leaves the old file, never a cut one
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("batch,step,loss\n")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero or outputs is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands callbacks the loss it back-propagates, divided by accumulate_grad_batches (its closure
        # normalises every batch so); the row is the batch's own loss, as training_step and train/loss give it
        loss = loss.detach() * trainer.accumulate_grad_batches
        self._pending.append((trainer.fit_loop.total_batch_idx, trainer.global_step, loss))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:  # before the checkpoint file is written: every row it covers is on disk first
            self.flush()
            if self.path.exists():
                with self.path.open("a") as f:
                    os.fsync(f.fileno())  # also the rows an earlier flush left in the page cache (power loss)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([p[2].float() for p in self._pending]).cpu().tolist()
        with self.path.open("a") as f:
            for (batch, step, _), value in zip(self._pending, values):
                f.write(f"{batch},{step},{value!r}\n")
        self._pending.clear()


def read_loss_log(path: str | Path) -> dict[int, float]:
    """``{batch index: loss}`` from a ``losses.csv``."""
    rows = Path(path).read_text().splitlines()[1:]
    return {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows if r}
