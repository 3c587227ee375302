"""The SD 3.5 family on its tiny preset: the training step is diffusers' SD3 scripts' (flow matching, the logit-normal
density, output preconditioning, CLIP-L + CLIP-G + T5 conditioning with pooled projections), full fine-tuning (with EMA
and prior preservation) and LoRA resume bit-identically, exports load in plain diffusers' StableDiffusion3Pipeline and
sample what the suite samples, and what does not fit an SD 3.5 base is refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import export_samples_as_the_suite_does, straight_and_resumed, whole_denoiser_resumes_exactly
from models.families import BaseFamilyError
from models.stable_diffusion import load_stable_diffusion

SD3 = {"pretrained": "tiny-random-sd3"}
PROMPT = "a photo of a lung xray with a visible pleural effusion"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """tiny-random-sd3 written as a diffusers StableDiffusion3Pipeline folder (what a hub download gives)."""
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    load_stable_diffusion(SD3).pipeline().save_pretrained(folder)
    return folder


def _script_loss(sd, batch, g, scheme, prior_loss_weight=1.0):
    """train_dreambooth_lora_sd3.py's step, line by line, on one generator (its global-RNG draws take ``g`` in the same
    order: the posterior sample, the noise, the density)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    halves = [batch["instance"], batch["prior"]] if "prior" in batch else [batch]
    pixels, prompts = torch.cat([h["pixel_values"] for h in halves]), [p for h in halves for p in h["prompt"]]
    pipe = sd.pipeline()
    embeds, pooled = zip(*[pipe.encode_prompt(p, None, None, do_classifier_free_guidance=False)[::2] for p in prompts])
    prompt_embeds, pooled_prompt_embeds = torch.cat(embeds), torch.cat(pooled)
    vae, scheduler = sd.vae, sd.noise_scheduler
    model_input = vae.encode(pixels).latent_dist.sample(generator=g)
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(model_input.shape, generator=g)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=model_input.shape[0], logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29, generator=g)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].flatten().view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = sd.transformer(hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
    model_pred = model_pred * (-sigmas) + noisy_model_input  # --precondition_outputs 1 (the default)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = model_input
    if "prior" in batch:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean((weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
            target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    if "prior" in batch:
        loss = loss + prior_loss_weight * prior_loss
    return loss, (noise - model_input, sigmas)


@pytest.mark.parametrize("scheme, prior", [("logit_normal", False), ("cosmap", True)])
def test_the_training_step_is_the_one_of_diffusers_sd3_scripts(scheme, prior):
    """Latents with shift and scale, the three encoders' conditioning, the density, σ looked up by timestep, the
    preconditioned prediction against the latents, the SD3 weighting, the prior half: the scripts' loss."""
    from lightning_modules.unet import UNetFineTuning

    module = UNetFineTuning(model=SD3, timestep_sampling={"weighting_scheme": scheme})
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = [PROMPT, "a photo of a lung xray", "a photo of a chest xray", "a photo of a lung xray"]
    batch = ({"instance": {"pixel_values": x[:2], "prompt": prompts[:2]}, "prior": {"pixel_values": x[2:], "prompt": prompts[2:]}}
             if prior else {"pixel_values": x, "prompt": prompts})
    with torch.no_grad():
        ours = module.diffusion_loss(batch, torch.Generator().manual_seed(11))
        theirs, (flow_target, sigmas) = _script_loss(module.sd, batch, torch.Generator().manual_seed(11), scheme)
    torch.testing.assert_close(ours["loss"], theirs, rtol=1e-6, atol=0)
    if scheme == "cosmap":
        assert ours["weights"].std() > 0  # the weighting is not all ones
    # preconditioning is not the plain flow loss: ||σ (ε - x - v)||² differs from ||ε - x - v||² unless every σ is 1
    assert not torch.allclose(sigmas, torch.ones_like(sigmas))


def test_an_sd3_folder_is_told_by_its_model_index_and_one_without_t5_is_named(sd3_folder, tmp_path):
    from models.sd3 import SD3 as Base
    from models.sd3 import SD3LoadError
    from models.stable_diffusion import StableDiffusionSpec

    spec = {"pretrained": str(sd3_folder), "local_files_only": True}
    assert StableDiffusionSpec(**spec).family_name() == "sd3"
    loaded, built = load_stable_diffusion(spec), load_stable_diffusion(SD3)
    assert isinstance(loaded, Base) and torch.equal(loaded.transformer.proj_out.weight, built.transformer.proj_out.weight)
    assert loaded.tokenizer_3(PROMPT).input_ids == built.tokenizer_3(PROMPT).input_ids  # the T5 tokenizer round-trips
    broken = tmp_path / "broken"
    shutil.copytree(sd3_folder, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(SD3LoadError, match=r"broken: not an SD 3.5 pipeline folder: missing \['text_encoder_3'\]") as err:
        load_stable_diffusion({"pretrained": str(broken), "local_files_only": True})
    assert "\n" not in str(err.value)


def test_a_t5_window_longer_than_256_is_refused_and_a_shorter_one_is_named_for_sampling():
    with pytest.raises(BaseFamilyError, match=r"max_sequence_length: 300 tokens, but sd3's text encoder was trained with a "
                                              r"window of 256; use at most 256") as err:
        load_stable_diffusion({**SD3, "max_sequence_length": 300})
    assert "\n" not in str(err.value)
    full, short = load_stable_diffusion(SD3), load_stable_diffusion({**SD3, "max_sequence_length": 8})
    assert full.conditioning()([PROMPT]).embeds.shape[1] == 77 + 256 and full.sampling_arguments == {}
    condition = short.conditioning()([PROMPT])
    assert condition.embeds.shape[1] == 77 + 8 and condition.pooled.shape == (1, 40)
    assert short.sampling_arguments == {"max_sequence_length": 8}
    assert short.count_too_long([PROMPT]) == 1 and short.count_too_long(["a photo"]) == 0


def _plain_image(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.0, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs).images.float()


def test_full_fine_tuning_with_ema_and_prior_preservation_resumes_bit_identically_and_exports(phantom_root, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from models.model_card import model_card

    straight = whole_denoiser_resumes_exactly(SD3, phantom_root, tmp_path, timestep_sampling={"weighting_scheme": "logit_normal"})
    manifest = export_samples_as_the_suite_does(straight, tmp_path / "export", StableDiffusion3Pipeline, PROMPT, 7.0,
                                                height=64, width=64)
    assert manifest["pipeline_class"] == "StableDiffusion3Pipeline" and manifest["trained"] == ["transformer"]
    assert manifest["weights"] == "EMA" and manifest["base_family"] == "sd3"
    assert manifest["sampling"] == {}  # the T5 window is the pipeline's default: nothing to pass
    assert "from diffusers import StableDiffusion3Pipeline" in model_card(manifest)


def test_lora_resumes_bit_identically_and_its_export_loads_with_sd3s_lora_loader(phantom_root, sd3_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lightning_modules.lora import LoRAFineTuning
    from models.exports import load_export
    from models.model_card import model_card

    targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
               "attn.to_q", "attn.to_v"]  # the SD3 LoRA script's default
    spec = {**SD3, "max_sequence_length": 16}  # a shorter T5 window than the pipeline's: the export names it for sampling
    straight, resumed, _ = straight_and_resumed(
        lambda: LoRAFineTuning(model=spec, rank=4, learning_rate=1e-2, dropout=0.1, target_modules=targets), phantom_root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("lora_" in k and k.startswith("sd.transformer.") for k in straight.trained_state_keys())
    assert any(".attn.add_q_proj.lora_" in k for k in straight.trained_state_keys())
    out = straight.export(tmp_path / "lora")
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "lora" and manifest["sampling"] == {"max_sequence_length": 16}
    assert "max_sequence_length=16" in model_card(manifest)

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)  # the base, as plain diffusers has it
    before = _plain_image(pipe, **manifest["sampling"])
    pipe.load_lora_weights(str(out))
    with_lora = _plain_image(pipe, **manifest["sampling"])
    assert (before - with_lora).abs().max() > 1e-3  # the adapters changed what it draws
    ours = load_export(out).generate([PROMPT], seeds=[0], steps=3, guidance=7.0)  # on the base export.json names
    torch.testing.assert_close(ours, with_lora, rtol=0, atol=1e-5)


def test_what_does_not_fit_an_sd3_base_is_refused_in_one_line():
    from lightning_modules.base import ModuleConfigError
    from lightning_modules.lora import LoRAConfigError, LoRAFineTuning
    from lightning_modules.textual_inversion import TextualInversion
    from lightning_modules.unet import UNetFineTuning
    from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning

    refusals = [
        (lambda: TextualInversion(model=SD3), ModuleConfigError,
         r"TextualInversion is not implemented on sd3 bases \('tiny-random-sd3'\) yet: .* rows in T5's"),
        (lambda: UNetTextEncoderFineTuning(model=SD3), ModuleConfigError,
         r"UNetTextEncoderFineTuning is not implemented on sd3 bases .* on sd3, train the denoiser"),
        (lambda: LoRAFineTuning(model=SD3, text_encoder_lora=True), LoRAConfigError, r"text_encoder_lora: adapters on the text"),
        (lambda: UNetFineTuning(model=SD3, snr_gamma=5.0), ModuleConfigError, r"snr_gamma: Min-SNR weighting is for DDPM bases; sd3"),
        (lambda: load_stable_diffusion(SD3).inference_scheduler("ddim"), Exception, r"SD 3.5 base samples with .*: euler or dpm"),
    ]
    for make, error, message in refusals:
        with pytest.raises(error, match=message) as err:
            make()
        assert "\n" not in str(err.value)
