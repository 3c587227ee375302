"""The FID callback: logs FID per prompt at validation, never enters checkpoints, runs under 2-process DDP."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer

from callbacks.fid import FIDCallback
from conftest import demo_args, run_train
from datamodules.mimic_cxr import MIMICCXRDataModule
from lightning_modules.unet import UNetFineTuning

PROMPTS = ["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion"]


def test_fid_is_logged_per_prompt_and_the_checkpoint_holds_no_feature_network(phantom_root, tiny_dinov2, tmp_path):
    """On an image encoder's features (a tiny random DINOv2 folder standing in for microsoft/rad-dino); the DDP test
    below uses the classifier's."""
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=64, batch_size=2,
                            cache_dir=str(tmp_path / "cache"))
    fid = FIDCallback(prompts=PROMPTS, n_per_prompt=3, n_real=8, features="image_encoder", image_encoder=str(tiny_dinov2), steps=2)
    module = UNetFineTuning(model={"pretrained": "tiny-phantom"})
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[fid],
                      enable_checkpointing=False)
    trainer.fit(module, dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/fid/")}
    assert set(logged) == {"val/fid/a_photo_of_a_lung_xray", "val/fid/a_photo_of_a_lung_xray_with_a_visible_pleural_effusion"}
    assert all(v >= 0 for v in logged.values())
    table = pd.read_csv(tmp_path / "fid.csv")
    assert list(table["reference"]) == ["No Finding", "Pleural Effusion"] and set(table["n_generated"]) == {3}
    assert set(table["features"]) == {"image_encoder"}
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert not any("inception" in k or "classifier" in k or "cls_token" in k for k in ckpt["state_dict"])
    assert all(v == {} for k, v in ckpt.get("callbacks", {}).items() if "FIDCallback" in k)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        FIDCallback(prompts=[])
    with pytest.raises(ValueError, match="at least 2 images"):
        FIDCallback(n_per_prompt=1)
    with pytest.raises(ValueError, match="features image_encoder needs image_encoder: a Hugging Face id or folder"):
        FIDCallback(features="image_encoder")


@pytest.mark.slow
def test_ddp_two_processes_shard_generation_and_agree(tmp_path):
    """The U-Net demo under DDP with two CPU processes, keeping an EMA: FID and the memorization monitor sharded over the
    ranks, one checkpoint at the last step, every rank holding the same EMA, and each rank its own dropout draws."""
    callback = {"class_path": "callbacks.fid.FIDCallback",
                "init_args": {"prompts": PROMPTS, "n_per_prompt": 2, "n_real": 8, "features": "classifier",
                              "classifier": "tiny-phantom", "steps": 2}}
    monitor = {"class_path": "callbacks.memorization.MemorizationMonitor",
               "init_args": {"every_n_steps": 2, "n_per_prompt": 2, "threshold": 0.5, "steps": 2}}
    run_train(*demo_args(tmp_path, "--run_name", "ddp_fid", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                         "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.callbacks=[]",
                         "--data.init_args.n_per_finding", "12", "--model.init_args.ema", '{"decay": 0.9}',
                         f"--trainer.callbacks+={json.dumps(callback)}", f"--trainer.callbacks+={json.dumps(monitor)}",
                         "--trainer.callbacks+=synthetic.testing.EMAChecksum",
                         "--trainer.callbacks+=synthetic.testing.DropoutDraws",
                         "--wandb_mode", "disabled"))
    run = tmp_path / "runs" / "ddp_fid"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["ema"]["optimization_step"] == 4
    table = pd.read_csv(run / "fid.csv")
    assert len(table) == 2 and (table["fid"] >= 0).all() and set(table["n_generated"]) == {2}
    assert set(table["weights"]) == {"EMA"}
    copies = pd.read_csv(run / "memorization_monitor.csv")  # each rank generated 1 image per prompt; all 4 judged
    assert copies["step"].tolist() == [2, 4] and set(copies["n"]) == {4} and set(copies["weights"]) == {"EMA"}
    sums = [(run / f"ema_rank{r}.txt").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    # dropout (peft's lora_dropout, any nn.Dropout) draws from the global RNG: other draws on each rank and step
    draws = [json.loads((run / f"dropout_draws_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 4 and all(a != b for a, b in zip(*draws)) and len({str(d) for d in draws[0]}) == 4
