"""Reliability: atomic checkpoints, full disks, non-finite losses, odd image files, empty prompts, real images.

The kill tests (SIGKILL, SIGTERM per strategy) run train.py in subprocesses: see test_train_cli.py,
test_textual_inversion.py and test_projection.py.
"""
from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from callbacks.checkpointing import AtomicCheckpointIO, CheckpointSaveError
from datamodules.mimic_cxr import MIMICCXRDataModule, load_grayscale
from lightning_modules.base import NonFiniteLossError
from lightning_modules.unet import UNetFineTuning


# ---------------------------------------------------------------------------------------------- atomic checkpoints
def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_midway(obj, fh):
        fh.write(b"\x80\x02partial pickle")  # what a kill in the middle of torch.save leaves behind
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_disk_full_while_saving_is_one_clear_error(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def disk_full(obj, fh):
        fh.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"last.ckpt: could not write the checkpoint \(No space left on device\); "
                                                  r"the previous last.ckpt is intact"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------------------------- non-finite losses
def nan_at(module, bad_batches):
    real = module.diffusion_loss

    def loss(batch, generator):
        out = real(batch, generator)
        if module.trainer.fit_loop.total_batch_idx in bad_batches:
            out["loss"] = out["loss"] * float("nan")
        return out

    module.diffusion_loss = loss
    return module


def fit(phantom_root, tmp_path, module, steps=6, callbacks=(), **trainer_options):
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, batch_size=2, max_val_images=0,
                            cache_dir=str(tmp_path / "cache"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[ckpt, *callbacks],
                      plugins=[AtomicCheckpointIO()], **trainer_options)
    trainer.fit(module, dm)
    return trainer


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(phantom_root, tmp_path):
    module = nan_at(UNetFineTuning(model={"pretrained": "tiny-random"}), {3})
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at step 3 \(batch 3\).*on_nonfinite_loss: skip"):
        fit(phantom_root, tmp_path, module)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN never reached the weights


def test_nonfinite_loss_can_skip_the_batch(phantom_root, tmp_path):
    module = nan_at(UNetFineTuning(model={"pretrained": "tiny-random"}, on_nonfinite_loss="skip"), {1, 4})
    with pytest.warns(UserWarning, match=r"non-finite training loss \(nan\) at step 1 \(batch 1\): batch skipped"):
        trainer = fit(phantom_root, tmp_path, module)
    assert module.skipped_nonfinite == [1, 4] and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(ValueError, match="on_nonfinite_loss: unknown value 'ignore'"):
        UNetFineTuning(model={"pretrained": "tiny-random"}, on_nonfinite_loss="ignore")


@pytest.mark.slow
def test_a_skipped_batch_skips_the_optimizer_step_of_its_whole_accumulation_window(phantom_root, tmp_path):
    """accumulate_grad_batches 2, NaN at batch 2 (the first of the second window): the weights after that window are
    the weights before it (before: AdamW stepped on batch 3's gradients while the warning said "not updated"); the
    windows around it train."""
    from lightning.pytorch import Callback

    class Weights(Callback):
        after: dict = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.after[trainer.fit_loop.total_batch_idx] = torch.cat([p.detach().flatten() for p in module.trainable_parameters()])

    module = nan_at(UNetFineTuning(model={"pretrained": "tiny-random"}, on_nonfinite_loss="skip", learning_rate=1e-3), {2})
    weights = Weights()
    with pytest.warns(UserWarning, match=r"at step 1 \(batch 2\): batch skipped, and the optimizer step of its accumulation "
                                         r"window \(2 batches\) too: weights not updated"):
        trainer = fit(phantom_root, tmp_path, module, steps=3, callbacks=[weights], accumulate_grad_batches=2)
    after = weights.after
    assert trainer.global_step == 3 and module.skipped_nonfinite == [1]
    assert not torch.equal(after[1], after[0]) and not torch.equal(after[5], after[3])  # windows 1 and 3 stepped
    assert torch.equal(after[3], after[1])  # window 2 (batches 2, 3) did not
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- image files
def test_16_bit_png_and_rgba_are_read_correctly(tmp_path):
    gray16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "16bit.png")
    got = load_grayscale(tmp_path / "16bit.png", 64)
    np.testing.assert_allclose(got.astype(float), gray16 / 257.0, atol=1.0)  # scaled to 8 bits, not clipped
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = load_grayscale(tmp_path / "rgba.png", 64)
    assert abs(int(got[:, :30].mean()) - 200) <= 1 and got[:, 34:].max() == 0  # composited on black


def test_truncated_jpeg_is_named(tmp_path):
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "x.jpg", quality=90)
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises((OSError, ValueError), match="x.jpg"):
        load_grayscale(tmp_path / "x.jpg", 64)


def test_an_empty_prompt_template_is_refused(phantom_root, tmp_path):
    with pytest.raises(ValueError, match=r"prompt_templates: the prompt for \['No Finding'\] is empty"):
        MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], prompt_templates={"No Finding": "  "},
                           cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------- real images in W&B
class RecordingLogger:
    def __init__(self):
        self.keys = []

    def log_image(self, key, images, step, caption=None):
        self.keys.append((key, len(images)))


@pytest.mark.parametrize("log_real", [False, True])
def test_real_images_reach_the_logger_only_when_asked(phantom_root, tmp_path, log_real):
    from callbacks.sample_grid import SampleGrid

    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, cache_dir=str(tmp_path))
    module = UNetFineTuning(model={"pretrained": "tiny-random"})
    logger = RecordingLogger()
    trainer = SimpleNamespace(global_step=1, loggers=[logger], default_root_dir=str(tmp_path), datamodule=dm)
    grid = SampleGrid(prompts=["a photo of a lung xray"], n_per_prompt=2, steps=1, log_real_images=log_real)
    assert Path(grid.make_grid(trainer, module)).is_file()
    assert logger.keys == ([("samples", 1), ("real_images", 2)] if log_real else [("samples", 1)])
