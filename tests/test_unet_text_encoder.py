"""U-Net + text-encoder fine-tuning (RoentGen): what trains, its learning rates, exact resume, export to plain diffusers."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO, phantom_dm, quiet_trainer, straight_and_resumed, train_in_process
from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning

TINY = {"pretrained": "tiny-random"}



def test_unet_and_text_encoder_train_at_their_own_rates_and_the_vae_stays(phantom_root, tmp_path, caplog):
    with caplog.at_level("INFO"):
        module = UNetTextEncoderFineTuning(model=TINY, learning_rate=1e-3, text_encoder_learning_rate=1e-4)
    assert "cache_text is off: the text encoder trains" in caplog.text
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fitted = quiet_trainer(3)
    fitted.fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    changed = {k.split(".")[1] for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"unet", "text_encoder"}
    unet_group, text_group = fitted.optimizers[0].param_groups
    assert unet_group["lr"] == pytest.approx(1e-3) and text_group["lr"] == pytest.approx(1e-4)
    assert next(module.sd.text_encoder.parameters()).dtype == torch.float32
    keys = module.trained_state_keys()
    assert any(k.startswith("sd.text_encoder.") for k in keys) and any(k.startswith("sd.unet.") for k in keys)


def test_only_the_last_layers_of_the_text_encoder_can_train():
    module = UNetTextEncoderFineTuning(model=TINY, text_encoder_layers=2)
    trained = {n for n, p in module.sd.text_encoder.named_parameters() if p.requires_grad}
    assert trained and all(".layers.3." in n or ".layers.4." in n or "final_layer_norm" in n for n in trained)
    assert not any("embeddings" in n for n in trained)
    with pytest.raises(ValueError, match=r"text_encoder_layers: 9; the text encoder of 'tiny-random' has 5 layers"):
        UNetTextEncoderFineTuning(model=TINY, text_encoder_layers=9)


def test_resume_is_bit_identical(phantom_root, tmp_path):
    def fresh():
        torch.manual_seed(0)
        return UNetTextEncoderFineTuning(model=TINY, learning_rate=1e-3, text_encoder_learning_rate=1e-4)

    straight, resumed, _ = straight_and_resumed(fresh, phantom_root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_unet_only_checkpoint_is_refused(phantom_root, tmp_path):
    from lightning_modules.base import TrainedStateMismatch
    from lightning_modules.unet import UNetFineTuning

    unet_only = UNetFineTuning(model=TINY)
    first = quiet_trainer(1)
    first.fit(unet_only, datamodule=phantom_dm(phantom_root, tmp_path))
    first.save_checkpoint(tmp_path / "unet.ckpt")
    with pytest.raises(TrainedStateMismatch, match="does not match what this configuration trains"):
        quiet_trainer(2).fit(UNetTextEncoderFineTuning(model=TINY), datamodule=phantom_dm(phantom_root, tmp_path),
                       ckpt_path=str(tmp_path / "unet.ckpt"))


def test_export_loads_in_plain_diffusers_with_the_trained_text_encoder(phantom_root, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = UNetTextEncoderFineTuning(model={"pretrained": "tiny-phantom"}, learning_rate=1e-3, text_encoder_learning_rate=1e-3)
    quiet_trainer(3).fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    out = module.export(tmp_path / "export")
    assert json.loads((out / "export.json").read_text())["trained"] == ["unet", "text_encoder"]
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    trained = module.sd.text_encoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.text_encoder.state_dict().items())
    base = StableDiffusionPipeline.from_pretrained(REPO / "synthetic" / "assets" / "tiny_phantom", local_files_only=True)
    ids = pipe.tokenizer(["a photo of a lung xray"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(pipe.text_encoder(ids)[0], base.text_encoder(ids)[0])


@pytest.mark.parametrize("name", ["unet_text_encoder", "unet_text_encoder_demo", "roentgen", "roentgen_demo"])
def test_configs_validate(name):
    code, out, err = train_in_process("--config", name, "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lightning_modules.unet_text_encoder.UNetTextEncoderFineTuning"
    if name == "unet_text_encoder":
        assert config["trainer"]["max_steps"] == 400 and config["model"]["init_args"]["model"]["pretrained"] == "CompVis/stable-diffusion-v1-4"
    if name.startswith("roentgen"):  # RoentGen-v2's recipe: impression prompts, cosine schedule, an EMA
        init = config["model"]["init_args"]
        assert init["lr_scheduler"] == "cosine" and init["ema"]["use_for_sampling"] and config["data"]["init_args"]["prompt_source"] == "impression"
