"""LoRA through peft: only the adapters train, the base stays bit-identical, small checkpoints, exact resume, exports
that plain diffusers loads (adapters, and merged), clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from callbacks.checkpointing import RunCheckpoint
from conftest import REPO, phantom_dm, quiet_trainer, straight_and_resumed, train_in_process
from lightning_modules.base import TrainedStateMismatch
from lightning_modules.lora import LoRAConfigError, LoRAFineTuning

PHANTOM = {"pretrained": "tiny-phantom"}



@pytest.fixture(scope="module")
def trained(phantom_root, tmp_path_factory):
    """A rank-4 LoRA on the U-Net of tiny-phantom after 4 steps, its checkpoint at step 4 and the base weights."""
    tmp = tmp_path_factory.mktemp("lora")
    module = LoRAFineTuning(model=PHANTOM, rank=4, learning_rate=1e-2)
    base = {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}
    fitted = quiet_trainer(4, callbacks=[RunCheckpoint(tmp / "last.ckpt", every_n_steps=0)])
    fitted.fit(module, datamodule=phantom_dm(phantom_root, tmp))
    return module, tmp / "last.ckpt", base, fitted


def test_only_the_adapters_train_and_the_base_is_bit_identical(trained):
    module, ckpt, base, fitted = trained
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    trained_keys = module.trained_state_keys()
    assert trained_keys and all("lora_" in k and k.startswith("sd.unet.") for k in trained_keys)
    assert [g["lr"] for g in fitted.optimizers[0].param_groups] == [pytest.approx(1e-2)]
    assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in trained_keys if "lora_B" in k)  # it moved


def test_the_checkpoint_holds_only_the_adapters(trained):
    module, ckpt, _, _ = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(module.trained_state_keys())
    n_adapter = sum(v.numel() for v in checkpoint["state_dict"].values())
    n_unet = sum(p.numel() for p in module.sd.unet.parameters() if not p.requires_grad)
    assert n_adapter < 0.2 * n_unet


def test_resume_is_bit_identical(phantom_root, tmp_path):
    """With adapter dropout: its masks are seeded per step, so the resumed steps draw the straight run's masks."""
    straight, resumed, _ = straight_and_resumed(lambda: LoRAFineTuning(model=PHANTOM, rank=4, learning_rate=1e-2, dropout=0.1),
                                                phantom_root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_in_plain_diffusers_and_merged(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from models.exports import load_export

    module, _, _, _ = trained
    out = module.export(tmp_path / "lora")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["lora"]["rank"] == 4 and manifest["trained"] == ["unet"]
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size < 2**20

    def image(pipe, prompt="a photo of a lung xray with a visible pleural effusion"):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "synthetic" / "assets" / "tiny_phantom", local_files_only=True)
    before = image(pipe)
    pipe.load_lora_weights(str(out))
    with_lora = image(pipe)
    assert not torch.allclose(before, with_lora, atol=1e-3)
    ours = load_export(out).generate(["a photo of a lung xray with a visible pleural effusion"], seeds=[0], steps=3, scheduler="pndm")
    assert torch.allclose(ours, with_lora.float(), atol=1e-4)

    merged = module.export(tmp_path / "merged", merge=True)
    assert json.loads((merged / "export.json").read_text())["kind"] == "pipeline"
    plain = StableDiffusionPipeline.from_pretrained(merged, local_files_only=True)
    assert torch.allclose(image(plain), with_lora, atol=1e-4)
    assert not any("lora" in k for k in plain.unet.state_dict())


def test_an_export_with_alpha_unlike_rank_reloads_with_the_trained_scale(tmp_path):
    """Rank 4, alpha 16: the update is 4 × B A. diffusers' save_lora_weights writes no alpha and load_lora_weights
    then takes alpha = rank, so the export folds the scale into the up matrices: reloaded in diffusers, the U-Net gives
    the module's output (before: the adapters' effect was a fraction of it)."""
    from models.exports import load_export
    from models.stable_diffusion import load_stable_diffusion

    module = LoRAFineTuning(model={"pretrained": "tiny-random"}, rank=4, alpha=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect
        for name, p in module.sd.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    module.eval()
    out = module.export(tmp_path / "lora")
    assert json.loads((out / "export.json").read_text())["lora"]["scale_folded_into_lora_up"] == 4.0
    config = module.sd.unet.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    context = torch.randn(1, 8, config.cross_attention_dim, generator=gen)

    def unet_output(unet):
        with torch.no_grad():
            return unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample

    base, trained, reloaded = (unet_output(u) for u in (load_stable_diffusion({"pretrained": "tiny-random"}).unet,
                                                         module.sd.unet, load_export(out).sd.unet))
    assert (trained - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(reloaded - base, trained - base, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_named():
    with pytest.raises(LoRAConfigError, match=r"target_modules: \['to_qkv'\] match no Linear or Conv2d module; the names there"):
        LoRAFineTuning(model={"pretrained": "tiny-random"}, target_modules=["to_qkv"])
    with pytest.raises(LoRAConfigError, match="text_encoder_learning_rate is set but the text encoder is frozen"):
        LoRAFineTuning(model={"pretrained": "tiny-random"}, text_encoder_learning_rate=1e-4)
    with pytest.raises(LoRAConfigError, match="rank: 0; expected 1 or more"):
        LoRAFineTuning(model={"pretrained": "tiny-random"}, rank=0)


def test_text_encoder_adapters_train_where_the_installed_peft_allows_and_are_refused_by_name_where_not(phantom_root, tmp_path):
    from lightning_modules.lora import text_encoder_lora_unavailable

    why = text_encoder_lora_unavailable()
    if why:  # transformers 5 adds adapters to CLIP only with peft >= 0.22
        with pytest.raises(LoRAConfigError, match=r"text_encoder_lora needs peft >= \S+ with transformers"):
            LoRAFineTuning(model=PHANTOM, text_encoder_lora=True)
        return
    module = LoRAFineTuning(model=PHANTOM, rank=2, text_encoder_lora=True, text_encoder_learning_rate=1e-3)
    fitted = quiet_trainer(2)
    fitted.fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    assert any(k.startswith("sd.text_encoder.") and "lora_" in k for k in module.trained_state_keys())
    assert [g["lr"] for g in fitted.optimizers[0].param_groups][1] == pytest.approx(1e-3)


def test_a_lora_checkpoint_does_not_resume_a_full_fine_tuning_run(trained, phantom_root, tmp_path):
    from lightning_modules.unet import UNetFineTuning

    _, ckpt, _, _ = trained
    with pytest.raises(TrainedStateMismatch, match="does not match what this configuration trains"):
        quiet_trainer(6).fit(UNetFineTuning(model=PHANTOM), datamodule=phantom_dm(phantom_root, tmp_path), ckpt_path=str(ckpt))


@pytest.mark.parametrize("name", ["lora_unet", "lora_unet_demo"])
def test_configs_validate(name):
    code, out, err = train_in_process("--config", name, "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lightning_modules.lora.LoRAFineTuning"


def test_under_bf16_the_base_takes_16_bits_and_the_adapters_stay_fp32(phantom_root, tmp_path):
    module = LoRAFineTuning(model={"pretrained": "tiny-random"}, rank=2)
    quiet_trainer(2, precision="bf16-mixed").fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    dtypes = {p.requires_grad: p.dtype for p in module.sd.unet.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    assert module.generate(["a photo of a lung xray"], seeds=[0], steps=2).dtype == torch.float32
