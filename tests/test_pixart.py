"""The PixArt-Σ family on its tiny preset: the DDPM step (ε half of a learned-sigma transformer, T5 with its mask) is
diffusers' PixArt script's, full fine-tuning (with EMA and prior preservation) and LoRA resume bit-identically, exports
load in plain diffusers' PixArtSigmaPipeline (LoRA: with peft) and sample what the suite samples, and what does not fit
a PixArt-Σ base is refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import export_samples_as_the_suite_does, straight_and_resumed, whole_denoiser_resumes_exactly
from models.families import BaseFamilyError
from models.stable_diffusion import load_stable_diffusion

PIXART = {"pretrained": "tiny-random-pixart"}
PROMPT = "a photo of a lung xray with a visible pleural effusion"


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    """tiny-random-pixart written as a diffusers PixArtSigmaPipeline folder (what a hub download gives)."""
    folder = tmp_path_factory.mktemp("pixart") / "tiny-pixart"
    load_stable_diffusion(PIXART).pipeline().save_pretrained(folder)
    return folder


def plain_image(pipe, steps: int = 3):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0), output_type="pt").images.float()


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_ddpm_step_is_the_one_of_diffusers_pixart_script(pixart_folder, snr_gamma):
    """train_pixart_controlnet_hf.py's lines on one generator: posterior sample * scaling_factor, noise, uniform integer
    timesteps, add_noise, T5 with the mask encode_prompt computes, the transformer's ε half, MSE (Min-SNR weighted)."""
    from diffusers import DDPMScheduler, PixArtSigmaPipeline
    from diffusers.training_utils import compute_snr

    from lightning_modules.unet import UNetFineTuning

    module = UNetFineTuning(model=PIXART, snr_gamma=snr_gamma)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = [PROMPT, "A photo of a lung xray "]  # encode_prompt lower-cases and strips
    ours = module.diffusion_loss({"pixel_values": pixels, "prompt": prompts}, torch.Generator().manual_seed(7))

    pipe = PixArtSigmaPipeline.from_pretrained(pixart_folder, local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(pixart_folder, subfolder="scheduler")  # the script's
    vae, transformer = pipe.vae, pipe.transformer
    g = torch.Generator().manual_seed(7)
    latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=g).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=300)
    model_pred = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert transformer.config.out_channels // 2 == latents.shape[1]  # learned sigma: the script takes the ε half
    model_pred = model_pred.chunk(2, dim=1)[0]
    if snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    else:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = (F.mse_loss(model_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3]) * weights).mean()
    assert torch.equal(ours["timesteps"], timesteps)
    torch.testing.assert_close(ours["loss"], loss, rtol=1e-6, atol=0)
    ids, our_mask = module.sd.tokenize(prompts)
    assert torch.equal(our_mask, mask) and int(mask[0].sum()) == 12  # 11 words, one token each, and </s>


def test_a_pixart_folder_is_told_by_its_model_index_and_one_without_text_encoder_is_named(pixart_folder, tmp_path):
    from transformers import T5Tokenizer

    from models.pixart import PixArtLoadError, PixArtSigma
    from models.stable_diffusion import StableDiffusionSpec

    spec = {"pretrained": str(pixart_folder), "local_files_only": True}
    assert StableDiffusionSpec(**spec).family_name() == "pixart"
    loaded, built = load_stable_diffusion(spec), load_stable_diffusion(PIXART)
    assert isinstance(loaded, PixArtSigma) and torch.equal(loaded.transformer.proj_out.weight, built.transformer.proj_out.weight)
    assert loaded.default_sampler == "dpm" and type(loaded.inference_scheduler("dpm")).__name__ == "DPMSolverMultistepScheduler"
    tokenizer = T5Tokenizer.from_pretrained(pixart_folder, subfolder="tokenizer")  # the tokenizer round-trips
    assert tokenizer(PROMPT).input_ids == built.tokenizer(PROMPT).input_ids
    broken = tmp_path / "broken"
    shutil.copytree(pixart_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(PixArtLoadError, match=r"broken: not a PixArt-Σ pipeline folder: missing \['text_encoder'\]") as err:
        load_stable_diffusion({"pretrained": str(broken), "local_files_only": True})
    assert "\n" not in str(err.value)


def test_a_window_longer_than_the_one_t5_was_trained_with_is_refused():
    with pytest.raises(BaseFamilyError, match=r"max_sequence_length: 301 tokens, but pixart's text encoder was trained with a "
                                              r"window of 300; use at most 300"):
        load_stable_diffusion({**PIXART, "max_sequence_length": 301})
    short = load_stable_diffusion({**PIXART, "max_sequence_length": 8})
    assert short.conditioning()([PROMPT]).embeds.shape[1] == 8
    assert short.count_too_long([PROMPT]) == 1 and short.count_too_long(["a photo"]) == 0


def test_full_fine_tuning_with_ema_and_prior_preservation_resumes_bit_identically_and_exports(phantom_root, tmp_path):
    from diffusers import PixArtSigmaPipeline

    from models.model_card import model_card

    straight = whole_denoiser_resumes_exactly(PIXART, phantom_root, tmp_path, snr_gamma=5.0)
    manifest = export_samples_as_the_suite_does(straight, tmp_path / "export", PixArtSigmaPipeline, PROMPT, 4.5,
                                                height=64, width=64, use_resolution_binning=False)
    assert manifest["pipeline_class"] == "PixArtSigmaPipeline" and manifest["trained"] == ["transformer"]
    assert manifest["weights"] == "EMA" and manifest["sampling"] == {"use_resolution_binning": False}
    card = model_card(manifest)
    assert "from diffusers import PixArtSigmaPipeline" in card and "use_resolution_binning=False" in card


def test_lora_resumes_bit_identically_and_its_export_loads_with_peft_and_merges(phantom_root, pixart_folder, tmp_path):
    from diffusers import PixArtSigmaPipeline
    from peft import PeftModel

    from lightning_modules.lora import LoRAFineTuning
    from models.exports import load_export
    from models.model_card import model_card

    straight, resumed, _ = straight_and_resumed(lambda: LoRAFineTuning(model=PIXART, rank=4, learning_rate=1e-2, dropout=0.1),
                                                phantom_root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.trained_state_keys() and all("lora_" in k and k.startswith("sd.transformer.") for k in straight.trained_state_keys())
    out = straight.export(tmp_path / "lora")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "lora" and (out / "adapter_config.json").is_file()
    assert "PeftModel.from_pretrained(pipe.transformer" in model_card(manifest)

    pipe = PixArtSigmaPipeline.from_pretrained(pixart_folder, local_files_only=True)
    before = plain_image(pipe)
    PeftModel.from_pretrained(pipe.transformer, str(out))  # the export's loading_code
    with_lora = plain_image(pipe)
    assert (before - with_lora).abs().max() > 1e-3  # the adapters changed what it draws
    ours = load_export(out, base=str(pixart_folder)).generate([PROMPT], seeds=[0], steps=3, guidance=4.5)
    torch.testing.assert_close(ours, with_lora, rtol=0, atol=1e-5)

    merged = straight.export(tmp_path / "merged", merge=True)  # merges the module's adapters in place: last
    assert json.loads((merged / "export.json").read_text())["kind"] == "pipeline"
    torch.testing.assert_close(plain_image(PixArtSigmaPipeline.from_pretrained(merged, local_files_only=True)), with_lora,
                               rtol=0, atol=1e-4)


def test_what_does_not_fit_a_pixart_base_is_refused_in_one_line(tmp_path):
    from diffusers import PixArtTransformer2DModel

    from lightning_modules.base import ModuleConfigError
    from lightning_modules.lora import LoRAConfigError, LoRAFineTuning
    from lightning_modules.projection import TextualProjection
    from lightning_modules.textual_inversion import TextualInversion
    from lightning_modules.unet import UNetFineTuning
    from models.pixart import PixArtLoadError, PixArtSigma
    from synthetic.presets import tiny_pixart_configs

    base = load_stable_diffusion(PIXART)
    micro = PixArtTransformer2DModel(**{**tiny_pixart_configs()["transformer"], "use_additional_conditions": True})
    refusals = [
        (lambda: TextualInversion(model=PIXART), ModuleConfigError,
         r"TextualInversion is not implemented on pixart bases \('tiny-random-pixart'\) yet: .*T5's"),
        (lambda: TextualProjection(model=PIXART), ModuleConfigError, r"TextualProjection is not implemented on pixart bases"),
        (lambda: LoRAFineTuning(model=PIXART, text_encoder_lora=True), LoRAConfigError, r"text_encoder_lora: adapters on the text"),
        (lambda: UNetFineTuning(model=PIXART, timestep_sampling={"weighting_scheme": "mode"}), ModuleConfigError,
         r"timestep_sampling: applies to flow-matching bases; pixart is trained as DDPM"),
        (lambda: base.inference_scheduler("pndm"), Exception, r"scheduler 'pndm': a PixArt-Σ base samples with dpm, ddim, euler"),
        (lambda: base.load_lora_weights(tmp_path), PixArtLoadError, r"not a PixArt-Σ LoRA export: missing \['adapter_config.json'"),
        (lambda: PixArtSigma(base.vae, base.text_encoder, base.tokenizer, micro, base.noise_scheduler, base.spec), PixArtLoadError,
         r"micro-conditions \(use_additional_conditions"),
    ]
    for make, error, message in refusals:
        with pytest.raises(error, match=message) as err:
            make()
        assert "\n" not in str(err.value)
