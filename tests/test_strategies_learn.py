"""The U-Net strategies lower their loss on its training images, measured with the same noise and timesteps before and
after a few steps (the validation step's fixed generator), so the comparison is like with like."""
from __future__ import annotations

import importlib

import pytest

from conftest import quiet_trainer
from datamodules.mimic_cxr import MIMICCXRDataModule

pytestmark = pytest.mark.slow  # 30 training steps per strategy: the slow tier (docs/tests.md)


def fixed_noise_loss(module, datamodule) -> float:
    """The mean loss over the training images, each with the noise and timestep the validation step always draws."""
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]


@pytest.mark.parametrize("cls, kwargs", [
    ("lightning_modules.unet.UNetFineTuning", {"learning_rate": 1e-3}),
    ("lightning_modules.unet_text_encoder.UNetTextEncoderFineTuning", {"learning_rate": 1e-3}),
    # adapters on the attention projections alone move a random U-Net less: a higher rate (our choice, for the test)
    ("lightning_modules.lora.LoRAFineTuning", {"rank": 4, "learning_rate": 5e-2}),
])
def test_the_loss_goes_down(phantom_root, tmp_path, cls, kwargs):
    module_name, name = cls.rsplit(".", 1)
    module = getattr(importlib.import_module(module_name), name)(model={"pretrained": "tiny-random"}, **kwargs)
    data = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=64,
                              batch_size=4, val_split="train", cache_dir=str(tmp_path / "cache"))
    before = fixed_noise_loss(module, data)
    quiet_trainer(30).fit(module, datamodule=data)
    after = fixed_noise_loss(module, data)
    assert after < 0.95 * before, (before, after)
