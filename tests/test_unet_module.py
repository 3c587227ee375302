"""The shared training step and the U-Net strategy, in process on the tiny model."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.mimic_cxr import MIMICCXRDataModule
from lightning_modules.base import TrainedStateMismatch, step_generator
from lightning_modules.preparation import PriorPreservation, class_image_entry, warn_long_prompts
from models.stable_diffusion import StableDiffusionSpec
from lightning_modules.unet import UNetFineTuning

TINY = StableDiffusionSpec(pretrained="tiny-random")


def batch(n: int, prompt: str = "a photo of a lung xray", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, "prompt": [prompt] * n}


def test_only_the_unet_trains():
    module = UNetFineTuning(model=TINY)
    keys = module.trained_state_keys()
    assert keys and all(k.startswith("sd.unet.") for k in keys)
    assert not any(p.requires_grad for p in module.sd.vae.parameters())
    assert not any(p.requires_grad for p in module.sd.text_encoder.parameters())


def test_prior_batches_carry_both_halves_and_the_prior_term_is_weighted():
    inst, prior = batch(2, seed=1), batch(2, "a photo of a chest xray", seed=2)
    losses = {}
    for w in (1.0, 3.0):
        module = UNetFineTuning(model=TINY, prior_preservation=PriorPreservation(loss_weight=w))
        losses[w] = module.diffusion_loss({"instance": inst, "prior": prior}, step_generator(0, 1))
    one, three = losses[1.0], losses[3.0]
    assert torch.allclose(one["instance"], three["instance"]) and torch.allclose(one["prior"], three["prior"])
    assert torch.allclose(one["loss"], one["instance"] + one["prior"])
    assert torch.allclose(three["loss"], three["instance"] + 3.0 * three["prior"])
    assert not torch.allclose(one["instance"], one["prior"])


def test_min_snr_weights_each_half_by_its_own_timesteps():
    """diffusers#5791: each sample is weighted by its own timestep's SNR, in both halves."""
    inst, prior = batch(2, seed=1), batch(2, seed=2)
    plain = UNetFineTuning(model=TINY)
    snr = UNetFineTuning(model=TINY, snr_gamma=0.5)
    snr.load_state_dict(plain.state_dict())
    a = plain.diffusion_loss({"instance": inst, "prior": prior}, step_generator(0, 2))
    b = snr.diffusion_loss({"instance": inst, "prior": prior}, step_generator(0, 2))
    assert torch.equal(a["timesteps"], b["timesteps"]) and torch.allclose(a["per_sample"], b["per_sample"])
    alphas = snr.sd.noise_scheduler.alphas_cumprod[b["timesteps"]]
    ratio = alphas / (1 - alphas)
    expected = torch.clamp(ratio, max=0.5) / ratio
    assert torch.allclose(b["weights"], expected)
    assert torch.allclose(b["instance"], (a["per_sample"][:2] * expected[:2]).mean())
    assert torch.allclose(b["prior"], (a["per_sample"][2:] * expected[2:]).mean())
    assert torch.allclose(a["weights"], torch.ones(4))


def test_v_prediction_target_is_used_when_the_scheduler_says_so():
    module = UNetFineTuning(model=TINY)
    eps = module.diffusion_loss(batch(2), step_generator(0, 3))["loss"]
    module.sd.noise_scheduler.register_to_config(prediction_type="v_prediction")
    v = module.diffusion_loss(batch(2), step_generator(0, 3))["loss"]
    assert not torch.allclose(eps, v)


def test_long_prompts_are_counted_and_warned_once():
    module = UNetFineTuning(model=TINY)
    long = " ".join(["pleural effusion"] * 60)
    with pytest.warns(UserWarning, match=r"3 of 5 training prompts \(1 distinct\) are longer than the text encoder's 77 tokens"):
        warn_long_prompts(module.sd, [long, long, "a photo of a lung xray", long, "a photo of a lung xray"])


def test_checkpoint_resume_with_a_different_trained_part_is_refused():
    module = UNetFineTuning(model=TINY)
    checkpoint = {"state_dict": {}, "trained_keys": ["sd.text_encoder.foo"]}
    with pytest.raises(TrainedStateMismatch, match="does not match what this configuration trains"):
        module.on_load_checkpoint(checkpoint)


def test_bf16_mixed_fit_keeps_trainable_fp32_and_frozen_bf16(phantom_root, tmp_path):
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=64,
                            batch_size=2, cache_dir=str(tmp_path / "cache"))
    module = UNetFineTuning(model=TINY)
    trainer = Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert next(module.sd.vae.parameters()).dtype == torch.bfloat16
    assert next(module.sd.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(module.sd.unet.parameters()).dtype == torch.float32
    images = module.generate(["a photo of a lung xray"], steps=2)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32


@pytest.mark.slow
def test_prior_preservation_generates_class_images_once(phantom_root, tmp_path):
    prior = PriorPreservation(class_prompt="a photo of a lung xray", num_class_images=3, steps=2,
                              class_images_dir=str(tmp_path / "class"))
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, batch_size=2,
                            cache_dir=str(tmp_path / "cache"))

    def fit():
        trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
        module = UNetFineTuning(model=TINY, prior_preservation=prior)
        seen = []
        module.on_train_batch_start = lambda b, i: seen.append(b)
        trainer.fit(module, datamodule=dm)
        return seen

    seen = fit()
    files = sorted((tmp_path / "class").glob("class_*.png"))
    assert len(files) == 3
    assert set(seen[0]) == {"instance", "prior"} and seen[0]["prior"]["prompt"] == ["a photo of a lung xray"] * 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    dm.train_records = None
    fit()
    assert [f.stat().st_mtime_ns for f in files] == mtimes, "class images must be reused, not regenerated"


def test_class_images_of_another_base_model_are_refused(phantom_root, tmp_path):
    prior = PriorPreservation(num_class_images=1, steps=1, class_images_dir=str(tmp_path / "class"))
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, batch_size=1,
                            cache_dir=str(tmp_path / "cache"))

    def fit(spec):
        trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(UNetFineTuning(model=spec, prior_preservation=prior), datamodule=dm)

    fit(TINY)
    with pytest.raises(ValueError, match=r"made with other settings \(model: 'tiny-random-seed0' there, 'tiny-random-seed1' now\)"):
        fit(StableDiffusionSpec(pretrained="tiny-random", seed=1))


def test_default_class_image_folder_depends_on_the_base_model(tmp_path):
    prior = PriorPreservation()
    assert class_image_entry(prior, "model-a", 64, tmp_path).path != class_image_entry(prior, "model-b", 64, tmp_path).path


@pytest.mark.slow
def test_loss_goes_down_on_phantoms(phantom_root, tmp_path):
    """A few dozen steps of the randomly initialised tiny U-Net on phantoms: the loss must fall."""
    from callbacks.loss_log import LossLog, read_loss_log

    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=64,
                            batch_size=4, cache_dir=str(tmp_path / "cache"))
    log = tmp_path / "losses.csv"
    trainer = Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[LossLog(log)])
    trainer.fit(UNetFineTuning(model=TINY, learning_rate=1e-4, lr_warmup_steps=5), datamodule=dm)
    losses = read_loss_log(log)
    first, last = [losses[i] for i in range(5)], [losses[i] for i in range(25, 30)]
    assert sum(last) < 0.8 * sum(first), (first, last)


def test_missing_class_images_on_resume_are_refused(phantom_root, tmp_path):
    """Class images must come from the base model; a resumed (trained) U-Net must not fill the gap."""
    prior = PriorPreservation(num_class_images=2, steps=1, class_images_dir=str(tmp_path / "class"))
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, batch_size=1,
                            cache_dir=str(tmp_path / "cache"))
    ckpt = tmp_path / "run.ckpt"

    def trainer(steps):
        return Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)

    first = trainer(1)
    first.fit(UNetFineTuning(model=TINY, prior_preservation=prior), datamodule=dm)
    first.save_checkpoint(ckpt)
    (tmp_path / "class" / "class_00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 class images are missing while resuming"):
        trainer(2).fit(UNetFineTuning(model=TINY, prior_preservation=prior), datamodule=dm, ckpt_path=str(ckpt))
