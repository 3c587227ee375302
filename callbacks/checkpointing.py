"""Checkpoints of a run: one callback for when ``last.ckpt`` is written, one plugin for how.

* :class:`RunCheckpoint` writes ``<run>/checkpoints/last.ckpt`` every ``every_n_steps`` optimizer steps, at the batch
  that reaches ``max_steps``, at the end of training when it ended otherwise (``max_epochs``, ``max_time``, or a run
  without optimizer steps), and on SIGTERM (SLURM pre-emption, ``scancel``, ``kill``) or SIGINT (Ctrl-C; a second
  Ctrl-C aborts at once without saving). Every save happens at the end of a training batch, where the loops describe a
  run in the middle of an epoch, so a resume continues exactly there; it runs after every other callback's end of that
  batch, so what they write for the batch (the loss log's row) is on disk before the checkpoint that covers it.
* :class:`AtomicCheckpointIO` checks the free space, writes each file to a temporary name, fsyncs it, keeps the previous
  file as ``<name>.prev.ckpt`` and renames the new one over the target: a kill or a full disk during a save never leaves
  a truncated ``last.ckpt``, and should one ever be unreadable the one before it is still there. Only a checkpoint known
  to be good becomes ``<name>.prev.ckpt``: one this process wrote or resumed from, or one whose zip records all pass
  their CRC checks; and a run resumed from ``<name>.prev.ckpt`` keeps it until it has written a newer checkpoint itself.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from core.errors import InsufficientSpaceError, UserError, check_free_space


class RunCheckpoint(Callback):
    """Write ``path`` periodically, at the last step, at the end of training and on SIGTERM or SIGINT.

    A SIGTERM or the first SIGINT only sets a flag (Lightning's own SIGTERM handler, which raises in the middle of its
    loops where the saved state would not resume exactly, and Python's KeyboardInterrupt are replaced from the start of
    fit); at the end of the current batch every rank agrees (one collective, in DDP only), ``path`` is saved and the
    trainer stops. ``train.py`` then exits with status 143 (SIGTERM) or 130 (SIGINT). A second SIGINT restores the
    default action and so ends the process at once. ``preempted_step`` is the step saved on a signal, or None;
    ``stopped_by`` names the signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, path: str | Path, every_n_steps: int = 100):
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)
        self.preempted_step: Optional[int] = None
        self.stopped_by: Optional[str] = None  # "SIGTERM" or "SIGINT"
        self._requested = False
        self._saved_step = -1
        self._previous_handlers: dict = {}

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    # ------------------------------------------------------------------ SIGTERM and SIGINT
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            if self._requested:  # the second Ctrl-C: no more waiting
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
                return
            print("\nCtrl-C: saving at the end of this batch, then stopping (Ctrl-C again to abort without saving)",
                  file=sys.stderr, flush=True)
        self._requested = True
        self.stopped_by = self.stopped_by or name

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._run_last(trainer)
        if threading.current_thread() is threading.main_thread():
            # from the start of fit: a Ctrl-C during preparation stops at the first batch end too
            for sig in self.SIGNALS:
                self._previous_handlers.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._on_signal)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.setup(trainer, pl_module, "fit")  # Lightning installs its SIGTERM handler between setup and here
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:  # arrived during setup, under Lightning's handler
            self._requested = True
            self.stopped_by = self.stopped_by or "SIGTERM"
            connector.received_sigterm = False  # handled here, at the end of the first batch

    def _run_last(self, trainer: Trainer) -> None:
        """Move this callback after every other one. Its ``on_train_batch_end`` saves, and the checkpoint must see the
        batch as the others leave it: the loss log's row of the checkpoint's own batch is pending until the loss log's
        ``on_train_batch_end``, and only a save after it writes that row first (a SIGKILL after the save otherwise lost
        it for good: the resume starts after that batch). Lightning orders its own ``Checkpoint`` callbacks last in the
        same way, but train.py turns those off."""
        callbacks = list(trainer.callbacks)
        if self in callbacks and callbacks[-1] is not self:
            callbacks.remove(self)
            trainer.callbacks = callbacks + [self]  # a new list: a hook loop running now (setup) goes on over the old one

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous_handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self._previous_handlers = {}

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

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def checkpoint_bytes(obj) -> int:
    """The bytes of tensor data in a (nested) checkpoint: what ``torch.save`` will write, less a little metadata."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(checkpoint_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in obj)
    return 0


def file_identity(path: Path) -> Optional[tuple[int, int, int, int]]:
    """Device, inode, size and modification time of ``path`` (None if it is not there): the same file, unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def unreadable_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete torch checkpoint, or None. It reads the zip directory at the end of the file (gone
    from a truncated one) and checks every record's CRC (bytes damaged in the middle), unpickling nothing: one read of
    the file, asked only of a ``last.ckpt`` this process neither wrote nor resumed from, at its first save."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive without torch's data.pkl"
            bad = archive.testzip()
            if bad is not None:
                return f"its record {bad} fails its CRC check"
    except (zipfile.BadZipFile, OSError) as err:
        return str(err) or type(err).__name__
    return None


def is_write_failure(err: BaseException) -> bool:
    """What ``torch.save`` raises when the file system fails under it: ``OSError``, or a ``RuntimeError`` from its zip
    writer ("PytorchStreamWriter failed writing file …", "[enforce fail at inline_container.cc] unexpected pos …")."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and
                                        any(s in str(err) for s in ("PytorchStreamWriter", "inline_container", "file write failed")))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Check the free space, write each checkpoint to a temporary file beside it, fsync it, keep the previous file as
    ``<name>.prev.ckpt`` (a hard link: no extra space) and rename the new one over the target.

    A kill or a full disk during the save therefore never leaves a truncated ``last.ckpt``: the previous checkpoint
    stays until the new one is complete. A failed save raises :class:`CheckpointSaveError` naming the file, the cause
    and the free space, and removes the partial file; so does a save that would not fit (checked before writing).

    The file replaced becomes ``<name>.prev.ckpt`` only when it is known good (:meth:`_keep_previous`), so the fall-back
    is never an unreadable file, and the checkpoint a run resumed from survives until the run has written a newer one.
    """

    MARGIN = 8 * 2**20  # pickle structure, zip records, other files written meanwhile

    def __init__(self) -> None:
        super().__init__()
        self._written: dict[Path, tuple] = {}  # the file this process last wrote at each path
        self._resumed_from: Optional[tuple] = None  # the file this process resumed from

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        checkpoint = super().load_checkpoint(path, *args, **kwargs)
        self._resumed_from = file_identity(Path(path))  # read whole: known good
        return checkpoint

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint exists"
        try:
            check_free_space(path, checkpoint_bytes(checkpoint) + self.MARGIN, "checkpoint")
        except InsufficientSpaceError as err:
            raise CheckpointSaveError(errno.ENOSPC, f"{err.strerror}; nothing written, {kept}") from None
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._keep_previous(path)
            os.replace(tmp, path)
            self._written[path] = file_identity(path)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if not is_write_failure(err):
                raise
            cause = (err.strerror if isinstance(err, OSError) and err.strerror else
                     "torch's writer failed, most likely a full disk: " + str(err).strip().splitlines()[0][:160])
            free = shutil.disk_usage(path.parent).free / 2**20
            raise CheckpointSaveError(getattr(err, "errno", None) or errno.EIO,
                                      f"{path}: could not write the checkpoint ({cause}); {kept}; "
                                      f"{free:.1f} MiB free on that file system") from None

    @staticmethod
    def previous(path: Path) -> Path:
        return path.with_name(path.stem + ".prev" + path.suffix)

    def _keep_previous(self, path: Path) -> None:
        """``last.ckpt`` → ``last.prev.ckpt`` without a moment in which neither exists complete, when ``last.ckpt`` is
        known good: this process wrote it or resumed from it, or (a file of an earlier process) its zip records pass their
        CRC checks. A run resumed from ``last.prev.ckpt`` (as train.py advises when ``last.ckpt`` is unreadable) keeps it until it has
        written a newer checkpoint: ``last.ckpt`` is then from another line of training, or unreadable."""
        current = file_identity(path)
        if current is None:
            return
        prev = self.previous(path)
        if current not in (self._written.get(path), self._resumed_from):
            if self._resumed_from is not None and file_identity(prev) == self._resumed_from:
                return
            why = unreadable_reason(path)
            if why is not None:
                rank_zero_warn(f"{path} is unreadable ({why}): the new checkpoint replaces it, and {prev.name} stays as it was")
                return
        link = path.with_name(f".{path.name}.prev-{os.getpid()}")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)  # no copy; on file systems without hard links the previous file is not kept
        except OSError:
            return
        os.replace(link, prev)
