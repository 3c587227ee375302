"""Checkpointing helpers: a final checkpoint whenever training ends, one on SIGTERM, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


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

    def _covered(self, step: int, trainer: Optional[Trainer] = None) -> bool:
        if trainer is not None and any(getattr(c, "saved_step", None) == step for c in trainer.callbacks
                                       if isinstance(c, PreemptionCheckpoint)):
            return True  # saved on SIGTERM at this batch: a second save at train end would describe another state
        return step == self._saved_step or (self.every_n_steps > 0 and step % self.every_n_steps == 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if 0 < trainer.max_steps <= step and not self._covered(step, trainer):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        # a run without optimizer steps (the projection "none" baseline) still leaves its (empty) checkpoint
        if (step > 0 and not self._covered(step, trainer)) or not self.path.exists():
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for the periodic ``last.ckpt``, without its end-of-training save.

    ``ModelCheckpoint.on_train_end`` saves ``last`` when it has not saved one yet (a run shorter than
    ``every_n_train_steps``); the file then exists already (:class:`FinalCheckpoint` wrote it at the last
    batch), so it would be versioned to ``last-v1.ckpt`` and hold the after-training loop state. The final
    step is :class:`FinalCheckpoint`'s job (and SIGTERM's :class:`PreemptionCheckpoint`'s).
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return None

    @property
    def state_key(self) -> str:
        # the key ModelCheckpoint's state had in checkpoints written before this class existed
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__):] if key.startswith(type(self).__qualname__) else key


class CheckpointSaveError(OSError):
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


class PreemptionCheckpoint(Callback):
    """On SIGTERM (SLURM pre-emption, ``scancel``, ``kill``) save ``path`` and stop cleanly.

    From the start of training this replaces Lightning's SIGTERM handler, which raises in the middle of
    its loops (after validation or an epoch's end), where the saved loop state would not resume exactly.
    Here the signal only sets a flag; at the end of the current batch, the same point where periodic
    checkpoints are written, every rank agrees (one collective, in DDP only), ``path`` is saved and the
    trainer stops. ``train.py`` then exits with status 143. ``saved_step`` is the step saved, or None.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.requested = False
        self.saved_step: Optional[int] = None
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # arrived during setup, under Lightning's handler
            self.requested = True
            connector.received_sigterm = False  # handled here, at the end of the first batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and self.saved_step is None:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step
            trainer.should_stop = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import signal
        import threading

        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
