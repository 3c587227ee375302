"""Stable Diffusion 2.x bases: the tiny SD-2-shaped preset runs every strategy; an SD 2.x folder loads, and one without
its text encoder is named."""
from __future__ import annotations

import shutil

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.mimic_cxr import MIMICCXRDataModule
from models.stable_diffusion import StableDiffusionLoadError, load_stable_diffusion

SD2 = {"pretrained": "tiny-random-sd2"}


def trainer() -> Trainer:
    return Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)


def test_the_preset_is_shaped_like_sd2(tmp_path):
    sd = load_stable_diffusion(SD2)
    assert sd.unet.config.use_linear_projection and list(sd.unet.config.attention_head_dim) == [2, 4]
    assert sd.noise_scheduler.config.prediction_type == "v_prediction" and sd.text_encoder.config.hidden_act == "gelu"
    sd.pipeline().save_pretrained(tmp_path / "sd2")
    again = load_stable_diffusion({"pretrained": str(tmp_path / "sd2"), "local_files_only": True})
    assert torch.equal(again.unet.conv_in.weight, sd.unet.conv_in.weight)
    assert again.noise_scheduler.config.prediction_type == "v_prediction"
    shutil.rmtree(tmp_path / "sd2" / "text_encoder")
    with pytest.raises(StableDiffusionLoadError, match=r"sd2 is not a diffusers pipeline folder: missing \['text_encoder'\]"):
        load_stable_diffusion({"pretrained": str(tmp_path / "sd2"), "local_files_only": True})


@pytest.mark.parametrize("cls, kwargs", [
    ("lightning_modules.unet.UNetFineTuning", {}),
    ("lightning_modules.unet_text_encoder.UNetTextEncoderFineTuning", {}),
    ("lightning_modules.lora.LoRAFineTuning", {"rank": 2}),
    ("lightning_modules.textual_inversion.TextualInversion", {}),
])
def test_every_image_strategy_trains_and_samples_on_the_sd2_preset(phantom_root, tmp_path, cls, kwargs):
    import importlib

    module_name, name = cls.rsplit(".", 1)
    module = getattr(importlib.import_module(module_name), name)(model=SD2, ema={"decay": 0.9}, **kwargs)
    before = [p.detach().clone() for p in module.trainable_parameters()]
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=64, batch_size=2,
                            max_val_images=0, cache_dir=str(tmp_path / "cache"))
    trainer().fit(module, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))
    images = module.generate([module.generator().paper_prompt("a photo of a lung xray")], seeds=[0], steps=2)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_the_projection_trains_on_the_sd2_preset(tmp_path):
    from lightning_modules.projection import TextualProjection
    from synthetic.laion import SyntheticLAIONDataModule

    module = TextualProjection(model=SD2, domain_encoder={"pretrained": "tiny-bert"}, cache_embeddings=False)
    before = [p.detach().clone() for p in module.trainable_parameters()]
    dm = SyntheticLAIONDataModule(root=str(tmp_path / "laion"), n_captions=200, batch_size=16, cache_dir=str(tmp_path / "hf"))
    trainer().fit(module, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))
    assert module.generate(["a photo of a lung xray"], seeds=[0], steps=2).shape == (1, 3, 64, 64)
