"""Checkpoint safety, third pass (issue 33): the loss log's rows are on disk before the checkpoint that covers them, the
fall-back ``last.prev.ckpt`` is never an unreadable file nor the resumed-from checkpoint thrown away too early, and a
checkpoint holding pickled objects is refused as such. Each test reproduces the case as a user meets it."""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint
from callbacks.loss_log import LossLog
from conftest import PYTHON, REPO, demo_args, phantom_dm, quiet_trainer, run_train, train_in_process
from lightning_modules.resume import CheckpointReadError, read_checkpoint
from lightning_modules.unet import UNetFineTuning

TINY = {"pretrained": "tiny-random"}


class Killed(BaseException):
    """Stands for a SIGKILL in this process: nothing after it runs (Lightning's teardown writes no loss row)."""


class KilledAfterSave(AtomicCheckpointIO):
    """The real checkpoint writer, and the process dies the moment the checkpoint of step ``at`` is in place."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if checkpoint["global_step"] == self.at:
            raise Killed


class KilledAtStep(Callback):
    """The process dies at the end of step ``at`` (after the loss log has written the rows before it)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            raise Killed


class Recording(AtomicCheckpointIO):
    """The real checkpoint writer, noting after each save the step of ``last.ckpt`` and of ``last.prev.ckpt``, and the
    bytes of ``last.prev.ckpt``."""

    def __init__(self):
        super().__init__()
        self.after_saves: list[tuple[int, object]] = []
        self.prev_bytes: list[bytes] = []

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        prev = self.previous(Path(path))
        self.after_saves.append((read_checkpoint(path)["global_step"], step_of(prev)))
        self.prev_bytes.append(prev.read_bytes())


def step_of(path: Path):
    """The step a checkpoint file holds, ``"unreadable"``, or None when there is no file."""
    if not path.exists():
        return None
    try:
        return read_checkpoint(path)["global_step"]
    except CheckpointReadError:
        return "unreadable"


def fit(run: Path, root: Path, steps: int, every: int, io: AtomicCheckpointIO | None = None, extra: list | None = None,
        ckpt_path: Path | None = None, flush_every: int = 50) -> None:
    """A run as train.py sets it up: its callbacks in train.py's order (the checkpoint before the loss log), the atomic
    writer; ``extra`` callbacks before them, as a config's own."""
    callbacks = [*(extra or []), RunCheckpoint(run / "checkpoints" / "last.ckpt", every), LossLog(run / "losses.csv", flush_every)]
    trainer = quiet_trainer(steps, callbacks=callbacks, plugins=[io or AtomicCheckpointIO()])
    trainer.fit(UNetFineTuning(model=TINY, learning_rate=1e-3), datamodule=phantom_dm(root, run),
                ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(phantom_root, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run, checkpointed every 2 steps: the losses every interrupted run must end with."""
    run = tmp_path_factory.mktemp("uninterrupted")
    fit(run, phantom_root, 4, 2)
    return run


# ---------------------------------------------------------------------------------------------- 1. the loss rows
def test_the_checkpoint_is_saved_after_the_loss_log_has_taken_the_batchs_row(tmp_path):
    """train.py lists the checkpoint callback before the loss log; from the start of fit it runs after every other
    callback, so the row of a checkpoint's own batch is pending (then flushed by the save) when the checkpoint is saved."""
    checkpoint, log, other = RunCheckpoint(tmp_path / "last.ckpt"), LossLog(tmp_path / "losses.csv"), KilledAtStep(at=-1)
    trainer = quiet_trainer(1, callbacks=[checkpoint, log, other])
    try:
        checkpoint.setup(trainer, None, "fit")
    finally:
        checkpoint.teardown(trainer, None, "fit")  # the signal handlers it installed
    mine = [c for c in trainer.callbacks if c in (checkpoint, log, other)]
    assert mine == [log, other, checkpoint]


@pytest.mark.parametrize("kill", ["right_after_the_step_2_save",
                                  pytest.param("at_step_3_after_later_rows_were_written", marks=pytest.mark.slow)])
def test_kill_after_a_checkpoint_then_resume_gives_the_uninterrupted_loss_log(uninterrupted, phantom_root, tmp_path, kill):
    """Killed right after the step-2 checkpoint, the log holds that checkpoint's own batch's row (it was written, and
    fsynced, before the checkpoint); killed later, the rows written after the checkpoint are replayed by the resume
    and not doubled. Either way the resumed run's losses.csv equals the uninterrupted one, row for row."""
    if kill == "right_after_the_step_2_save":
        killing = {"io": KilledAfterSave(at=2)}
    else:  # rows flushed at every batch, so the log runs ahead of the checkpoint when the kill comes
        killing = {"extra": [KilledAtStep(at=3)], "flush_every": 1}
    with pytest.raises(Killed):
        fit(tmp_path, phantom_root, 4, 2, **killing)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2
    rows = [row.split(",")[:2] for row in (tmp_path / "losses.csv").read_text().splitlines()[1:]]
    assert rows[:2] == [["0", "1"], ["1", "2"]], rows  # with the step-2 checkpoint's own batch (index 1)
    fit(tmp_path, phantom_root, 4, 2, ckpt_path=last)
    assert (tmp_path / "losses.csv").read_text() == (uninterrupted / "losses.csv").read_text()


@pytest.mark.slow
def test_sigkill_after_the_step_10_save_then_resume_keeps_every_loss_row(reference_run, tmp_path):
    """The issue's case end to end (there: ``--trainer.max_steps 40 --checkpoint_every_n_steps 20``; here the reference
    run's 24 steps, saves every 5): kill -9 shortly after the step-10 save, ``--ckpt_path last``. The log already holds
    the checkpoint's own batch's row (batch 9, step 10), and after the resume losses.csv equals the uninterrupted run's,
    row for row."""
    common = demo_args(tmp_path, "--run_name", "killed", "--trainer.callbacks=[]", "--wandb_mode", "disabled",
                       "--trainer.max_steps", "24")
    run = tmp_path / "runs" / "killed"
    prev = run / "checkpoints" / "last.prev.ckpt"  # appears with the second save (step 10), before its rename
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *common, "--trainer.callbacks+=synthetic.testing.StepDelay"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not prev.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # the save is done; the next is 5 batches of at least 0.05 s away
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-3000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 10
    assert "\n9,10," in (run / "losses.csv").read_text()  # written before the checkpoint that covers it
    run_train(*common, "--ckpt_path", "last")
    assert (run / "losses.csv").read_text() == (reference_run / "losses.csv").read_text()


# ---------------------------------------------------------------------------------------------- 2. the fall-back
@pytest.mark.parametrize("last_ckpt", ["truncated", pytest.param("intact", marks=pytest.mark.slow)])
def test_resuming_from_last_prev_keeps_it_until_a_newer_checkpoint_exists(uninterrupted, phantom_root, tmp_path, last_ckpt):
    """As train.py advises for a truncated last.ckpt: ``--ckpt_path .../last.prev.ckpt``. The next save must not move
    last.ckpt (unreadable, or from the line of training abandoned) into last.prev.ckpt: the checkpoint resumed from
    stays there, byte for byte, until the run's own newer checkpoint is in place; only then is that one the fall-back."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    checkpoints = run / "checkpoints"
    last, prev = checkpoints / "last.ckpt", checkpoints / "last.prev.ckpt"
    assert (step_of(last), step_of(prev)) == (4, 2)
    if last_ckpt == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    resumed_from = prev.read_bytes()
    io = Recording()
    fit(run, phantom_root, 6, 2, io=io, ckpt_path=prev)
    # after the first save (step 4): the new last.ckpt, and still the step-2 checkpoint it resumed from as the fall-back
    assert io.after_saves == [(4, 2), (6, 4)] and io.prev_bytes[0] == resumed_from
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert (step_of(last), step_of(prev)) == (6, 4)


def test_resumed_from_last_prev_and_killed_after_the_first_save_leaves_two_good_checkpoints(uninterrupted, phantom_root,
                                                                                           tmp_path):
    """Killed right after its first save, a run resumed from last.prev.ckpt leaves that file as it was and a readable
    new last.ckpt: nothing is lost wherever the kill lands."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    last, prev = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.prev.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed_from = prev.read_bytes()
    with pytest.raises(Killed):
        fit(run, phantom_root, 6, 2, io=KilledAfterSave(at=4), ckpt_path=prev)
    assert prev.read_bytes() == resumed_from and step_of(last) == 4


def tiny_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_checkpoint", "zeroed_middle"])
def test_an_unreadable_last_checkpoint_is_never_rotated_into_last_prev(tmp_path, damage):
    """A last.ckpt left unreadable by something else than this process (a copy cut short, a full disk under another
    tool): the next save replaces it, says so, and leaves the good last.prev.ckpt alone."""
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    prev = io.previous(last)
    torch.save(tiny_checkpoint(1), prev)
    torch.save(tiny_checkpoint(2), last)
    good = prev.read_bytes()
    data = last.read_bytes()
    zeroed = data[:len(data) // 3] + bytes(len(data) // 3) + data[2 * (len(data) // 3):]  # the directory intact
    last.write_bytes({"truncated": data[:-200], "empty": b"", "not_a_checkpoint": b"PK\x03\x04 no",
                      "zeroed_middle": zeroed}[damage])
    if damage == "zeroed_middle":  # torch cannot read it, though its zip directory reads
        with pytest.raises(CheckpointReadError):
            read_checkpoint(last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io.save_checkpoint(tiny_checkpoint(3), last)
    assert prev.read_bytes() == good and step_of(last) == 3
    assert any(f"{last} is unreadable" in str(w.message) and "last.prev.ckpt stays as it was" in str(w.message) for w in caught)
    io.save_checkpoint(tiny_checkpoint(4), last)  # the file this process wrote is known good: it becomes the fall-back
    assert (step_of(last), step_of(prev)) == (4, 3)


def test_a_readable_last_checkpoint_of_an_earlier_process_is_still_kept_as_last_prev(tmp_path):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    torch.save(tiny_checkpoint(1), last)
    io.save_checkpoint(tiny_checkpoint(2), last)
    assert (step_of(last), step_of(io.previous(last))) == (2, 1)


# ---------------------------------------------------------------------------------------------- W-3. pickled objects
def test_a_checkpoint_holding_a_pickled_object_is_refused_as_such_in_one_line(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    torch.save(tiny_checkpoint(1), AtomicCheckpointIO.previous(path))
    with pytest.raises(CheckpointReadError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message == (f"{path}: the checkpoint holds non-tensor objects (argparse.Namespace); refusing to unpickle it, which "
                       "could run arbitrary code (checkpoints written by train.py hold only tensors and plain data)")


def test_a_truncated_checkpoint_still_says_so_in_full_with_the_one_before_it(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(tiny_checkpoint(2), path)
    path.write_bytes(path.read_bytes()[:300])
    prev = AtomicCheckpointIO.previous(path)
    torch.save(tiny_checkpoint(1), prev)
    with pytest.raises(CheckpointReadError) as err:
        read_checkpoint(path)
    assert str(err.value) == (f"{path}: unreadable checkpoint (truncated or corrupt: PytorchStreamReader failed reading zip "
                              f"archive: failed finding central directory); the checkpoint before it is {prev}: resume "
                              f"from it with --ckpt_path {prev}")


def test_train_py_refuses_a_pickled_checkpoint_in_one_line_without_unsafe_advice(tmp_path):
    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, ckpt)
    code, _, err = train_in_process(*demo_args(tmp_path, "--run_name", "r", "--ckpt_path", str(ckpt), "--wandb_mode", "disabled"))
    lines = [line for line in err.splitlines() if "error" in line]  # (stderr holds the loaders' progress bars too)
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"train.py: error: {ckpt}: the checkpoint holds non-tensor objects (argparse.Namespace); "
                               "refusing to unpickle it, which could run arbitrary code (checkpoints written by train.py "
                               "hold only tensors and plain data)")
    assert "weights_only" not in err and "truncated" not in err


def test_with_accumulated_gradients_each_row_is_the_batchs_own_loss(phantom_root, tmp_path):
    """With ``accumulate_grad_batches`` 2 (the textual-inversion configs accumulate 4) Lightning passes callbacks the
    loss divided by 2; ``losses.csv`` holds each batch's loss as ``training_step`` computed it."""
    module = UNetFineTuning(model=TINY, learning_rate=1e-3)
    returned = []
    step = module.training_step
    module.training_step = lambda *a, **k: (lambda loss: (returned.append(float(loss)), loss)[1])(step(*a, **k))
    trainer = quiet_trainer(2, accumulate_grad_batches=2, callbacks=[LossLog(tmp_path / "losses.csv")])
    trainer.fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    rows = [line.split(",") for line in (tmp_path / "losses.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(returned) == 4
    assert [float(r[2]) for r in rows] == pytest.approx(returned, rel=1e-6)
