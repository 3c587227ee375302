"""Checkpoints of a run: one callback for when ``last.ckpt`` is written, one plugin for how.

* :class:`RunCheckpoint` writes ``<run>/checkpoints/last.ckpt`` every ``every_n_steps`` optimizer steps, at the batch
  that reaches ``max_steps``, at the end of training when it ended otherwise (``max_epochs``, ``max_time``, or a run
  without optimizer steps), and on SIGTERM (SLURM pre-emption, ``scancel``, ``kill``). Every save happens at the end of
  a training batch, where the loops describe a run in the middle of an epoch, so a resume continues exactly there.
* :class:`AtomicCheckpointIO` writes each file to a temporary name, fsyncs it and renames it over the target: a kill or
  a full disk during a save never leaves a truncated ``last.ckpt``.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from core.errors import UserError


class RunCheckpoint(Callback):
    """Write ``path`` periodically, at the last step, at the end of training and on SIGTERM.

    On SIGTERM the signal only sets a flag (Lightning's own handler, which raises in the middle of its loops where the
    saved state would not resume exactly, is replaced from the start of training); at the end of the current batch
    every rank agrees (one collective, in DDP only), ``path`` is saved and the trainer stops. ``train.py`` then exits
    with status 143. ``preempted_step`` is the step saved on SIGTERM, or None.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 100):
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)
        self.preempted_step: Optional[int] = None
        self._requested = False
        self._saved_step = -1
        self._previous_handler = None

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    # ------------------------------------------------------------------ SIGTERM
    def _on_sigterm(self, signum, frame) -> None:
        self._requested = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # arrived during setup, under Lightning's handler
            self._requested = True
            connector.received_sigterm = False  # handled here, at the end of the first batch

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    # ------------------------------------------------------------------ when to save
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        requested = self._requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and self.preempted_step is None:
            self._save(trainer)
            self.preempted_step = trainer.global_step
            trainer.should_stop = True
            return
        step = trainer.global_step
        if step == self._saved_step or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        periodic = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if periodic or 0 < trainer.max_steps <= step:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # training that ended otherwise than by max_steps; a run without optimizer steps still leaves its checkpoint
        step = trainer.global_step
        if self.preempted_step is None and ((step > 0 and step != self._saved_step) or not self.path.exists()):
            self._save(trainer)

    def state_dict(self) -> dict:
        return {}


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (disk full, permissions, ...); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, fsync it, then rename it over the target.

    A kill or a full disk during the save therefore never leaves a truncated ``last.ckpt``: the
    previous checkpoint stays until the new one is complete. A failed save raises
    :class:`CheckpointSaveError` naming the file and the cause, and removes the partial file.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint exists"
            raise CheckpointSaveError(err.errno, f"{path}: could not write the checkpoint ({err.strerror or err}); {kept}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
