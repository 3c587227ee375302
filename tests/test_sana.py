"""The Sana family on its tiny preset: the flow-matching step is diffusers' Sana script's, full fine-tuning (with EMA and
prior preservation) and LoRA resume bit-identically, exports load in plain diffusers' SanaPipeline and sample what the
suite samples, and what does not fit a Sana base is refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import export_samples_as_the_suite_does, straight_and_resumed, whole_denoiser_resumes_exactly
from models.families import BaseFamilyError, FlowMatchingObjective, TimestepSampling
from models.stable_diffusion import load_stable_diffusion

SANA = {"pretrained": "tiny-random-sana"}
PROMPT = "a photo of a lung xray with a visible pleural effusion"


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    """tiny-random-sana written as a diffusers SanaPipeline folder (what a hub download gives)."""
    folder = tmp_path_factory.mktemp("sana") / "tiny-sana"
    load_stable_diffusion(SANA).pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_the_flow_matching_step_is_the_one_of_diffusers_sana_script(scheme):
    """train_dreambooth_lora_sana.py's lines, with one generator: density, indices, sigmas looked up by timestep value,
    (1 - σ) x + σ ε, target ε - x, the SD3 weighting."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(5, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    sampling = TimestepSampling(weighting_scheme=scheme, logit_mean=0.2, logit_std=1.3)
    ours = FlowMatchingObjective(scheduler)
    draw = ours.draw(latents, torch.Generator().manual_seed(7), sampling)
    weights = ours.weights(draw, None, sampling)

    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, 5, logit_mean=0.2, logit_std=1.3, mode_scale=1.29, generator=g)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(-1, 1, 1, 1)
    assert torch.equal(draw.timesteps, timesteps)
    assert torch.equal(draw.noisy, (1.0 - sigmas) * latents + sigmas * noise)
    assert torch.equal(draw.target, noise - latents)
    assert torch.equal(weights, compute_loss_weighting_for_sd3(scheme, sigmas).float().reshape(-1))
    if scheme == "cosmap":
        assert weights.std() > 0  # the weighting is not all ones


def test_a_sana_folder_is_told_by_its_model_index_and_one_without_text_encoder_is_named(sana_folder, tmp_path):
    from models.sana import Sana, SanaLoadError
    from models.stable_diffusion import StableDiffusionSpec

    spec = {"pretrained": str(sana_folder), "local_files_only": True}
    assert StableDiffusionSpec(**spec).family_name() == "sana"
    loaded, built = load_stable_diffusion(spec), load_stable_diffusion(SANA)
    assert isinstance(loaded, Sana) and torch.equal(loaded.transformer.proj_out.weight, built.transformer.proj_out.weight)
    broken = tmp_path / "broken"
    shutil.copytree(sana_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(SanaLoadError, match=r"broken: not a Sana pipeline folder: missing \['text_encoder'\]") as err:
        load_stable_diffusion({"pretrained": str(broken), "local_files_only": True})
    assert "\n" not in str(err.value)


def test_a_window_longer_than_the_one_gemma_was_trained_with_is_refused():
    with pytest.raises(BaseFamilyError, match=r"max_sequence_length: 512 tokens, but sana's text encoder was trained with a "
                                              r"window of 300; use at most 300"):
        load_stable_diffusion({**SANA, "max_sequence_length": 512})
    short = load_stable_diffusion({**SANA, "max_sequence_length": 8})
    assert short.conditioning()(["a photo of a lung xray with a visible pleural effusion"]).embeds.shape[1] == 8
    assert short.count_too_long([PROMPT]) == 1 and short.count_too_long(["a photo"]) == 0


def test_full_fine_tuning_with_ema_and_prior_preservation_resumes_bit_identically_and_exports(phantom_root, tmp_path):
    from diffusers import SanaPipeline

    from models.model_card import model_card

    straight = whole_denoiser_resumes_exactly(SANA, phantom_root, tmp_path, timestep_sampling={"weighting_scheme": "logit_normal"})
    manifest = export_samples_as_the_suite_does(straight, tmp_path / "export", SanaPipeline, PROMPT, 4.5, height=64, width=64,
                                                use_resolution_binning=False, complex_human_instruction=None)
    assert manifest["pipeline_class"] == "SanaPipeline" and manifest["trained"] == ["transformer"]
    assert manifest["weights"] == "EMA" and manifest["sampling"] == {"complex_human_instruction": None, "use_resolution_binning": False}
    card = model_card(manifest)
    assert "from diffusers import SanaPipeline" in card and "complex_human_instruction=None" in card and "- sana" in card


def test_lora_resumes_bit_identically_and_its_export_loads_with_sanas_lora_loader(phantom_root, sana_folder, tmp_path):
    from diffusers import SanaPipeline

    from lightning_modules.lora import LoRAFineTuning
    from models.exports import load_export

    straight, resumed, _ = straight_and_resumed(lambda: LoRAFineTuning(model=SANA, rank=4, learning_rate=1e-2, dropout=0.1),
                                                phantom_root, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("lora_" in k and k.startswith("sd.transformer.") for k in straight.trained_state_keys())
    out = straight.export(tmp_path / "lora")
    assert json.loads((out / "export.json").read_text())["kind"] == "lora"

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
                    complex_human_instruction=None, generator=torch.Generator().manual_seed(0), output_type="pt").images

    pipe = SanaPipeline.from_pretrained(sana_folder, local_files_only=True)
    before = image(pipe)
    pipe.load_lora_weights(str(out))
    with_lora = image(pipe)
    assert (before - with_lora).abs().max() > 1e-3  # the adapters changed what it draws
    ours = load_export(out, base=str(sana_folder)).generate([PROMPT], seeds=[0], steps=3, guidance=4.5)
    torch.testing.assert_close(ours, with_lora.float(), rtol=0, atol=1e-5)


def test_what_does_not_fit_a_sana_base_is_refused_in_one_line():
    from lightning_modules.base import ModuleConfigError
    from lightning_modules.lora import LoRAConfigError, LoRAFineTuning
    from lightning_modules.unet import UNetFineTuning

    refusals = [
        (lambda: LoRAFineTuning(model=SANA, text_encoder_lora=True), LoRAConfigError, r"text_encoder_lora: adapters on the text"),
        (lambda: UNetFineTuning(model=SANA, snr_gamma=5.0), ModuleConfigError, r"snr_gamma: Min-SNR weighting is for DDPM bases"),
        (lambda: UNetFineTuning(model={"pretrained": "tiny-random"}, timestep_sampling={"weighting_scheme": "mode"}),
         ModuleConfigError, r"timestep_sampling: applies to flow-matching bases; stable-diffusion is trained as DDPM"),
        (lambda: UNetFineTuning(model=SANA, timestep_sampling={"weighting_scheme": "lognorm"}), BaseFamilyError,
         r"timestep_sampling.weighting_scheme: 'lognorm'; expected one of"),
        (lambda: load_stable_diffusion(SANA).inference_scheduler("ddim"), Exception, r"euler or dpm"),
    ]
    for make, error, message in refusals:
        with pytest.raises(error, match=message) as err:
            make()
        assert "\n" not in str(err.value)


def test_textual_inversion_trains_gemma_rows_resumes_bit_identically_and_its_export_loads_in_plain_diffusers(
        phantom_root, sana_folder, tmp_path):
    """New rows in Gemma-2's (scaled) embedding table: only they train; the export's loading code (SanaPipeline has no
    load_textual_inversion) run as written gives the image the suite draws."""
    from diffusers import SanaPipeline

    from lightning_modules.textual_inversion import TextualInversion
    from models.exports import load_export

    base = {"pretrained": str(sana_folder), "local_files_only": True}

    def fresh():
        return TextualInversion(model=base, learning_rate=5e-2,
                                placeholder_tokens=[{"token": "<lung-xray>", "initializer": "lung", "num_vectors": 2}])

    straight, resumed, _ = straight_and_resumed(fresh, phantom_root, tmp_path)
    assert straight.trained_state_keys() == ["sd.text_encoder.embed_tokens.new_rows"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = fresh().state_dict()["sd.text_encoder.embed_tokens.new_rows"]
    assert not torch.equal(a["sd.text_encoder.embed_tokens.new_rows"], start)
    out = straight.export(tmp_path / "ti")
    manifest = json.loads((out / "export.json").read_text())
    prompt = "a photo of a <lung-xray> with a visible pleural effusion"
    ours = load_export(out).generate([prompt], seeds=[0], steps=3, guidance=4.5)
    module = straight.generate([prompt], seeds=[0], steps=3, guidance=4.5)
    torch.testing.assert_close(ours, module, rtol=0, atol=1e-5)
    namespace = {"torch": torch, "SanaPipeline": SanaPipeline}
    exec(manifest["loading_code"].replace("THIS_FOLDER", str(out)), namespace)  # what the model card tells a user to run
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(prompt.replace("<lung-xray>", "<lung-xray> <lung-xray>_1"), num_inference_steps=3, guidance_scale=4.5,
                 height=64, width=64, use_resolution_binning=False, complex_human_instruction=None,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(plain.float(), ours, rtol=0, atol=1e-5)


def test_the_transformer_and_gemmas_last_layer_train_together(phantom_root, tmp_path):
    from conftest import phantom_dm, quiet_trainer
    from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning

    module = UNetTextEncoderFineTuning(model=SANA, learning_rate=1e-3, text_encoder_layers=1, text_encoder_learning_rate=1e-4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fitted = quiet_trainer(2)
    fitted.fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    trained = set(module.trained_state_keys())
    assert {k.split(".")[1] for k in trained} == {"transformer", "text_encoder"}
    assert all(k.startswith(("sd.transformer.", "sd.text_encoder.layers.1.", "sd.text_encoder.norm.")) for k in trained)
    after = module.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in trained if ".text_encoder." in k)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in trained)
    assert [g["lr"] for g in fitted.optimizers[0].param_groups] == [pytest.approx(1e-3), pytest.approx(1e-4)]
    with pytest.raises(Exception, match=r"text_encoder_layers: 3; the text encoder of 'tiny-random-sana' has 2 layers"):
        UNetTextEncoderFineTuning(model=SANA, text_encoder_layers=3)


def test_a_token_projection_into_gemmas_space_trains_resumes_bit_identically_and_reloads(tmp_path):
    """The domain token states onto Gemma-2's 300-token sequence, masked; the export reloads and draws what the module
    draws; a projection.json whose widths do not fit its domain encoder is refused in one line naming both."""
    from callbacks.checkpointing import RunCheckpoint
    from conftest import quiet_trainer
    from lightning_modules.projection import TextualProjection
    from models.exports import load_export
    from models.projection import ProjectionConfigError
    from synthetic.laion import SyntheticLAIONDataModule

    def fresh():  # the MLP starts from the global RNG, as train.py's seed_everything leaves it
        torch.manual_seed(0)
        return TextualProjection(model=SANA, domain_encoder={"pretrained": "tiny-bert"}, level="token", learning_rate=1e-3)

    def data():
        return SyntheticLAIONDataModule(root=str(tmp_path / "laion"), n_captions=64, batch_size=8, cache_dir=str(tmp_path / "hf"))

    straight = fresh()
    quiet_trainer(4).fit(straight, datamodule=data())
    quiet_trainer(2, callbacks=[RunCheckpoint(tmp_path / "half.ckpt", every_n_steps=0)]).fit(fresh(), datamodule=data())
    resumed = fresh()
    quiet_trainer(4).fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "half.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("projection.") for k in straight.trained_state_keys())
    condition = straight.conditioning(["a chest xray with a small left pleural effusion"])
    assert condition.embeds.shape == (1, 300, 32) and 0 < int(condition.mask.sum()) < 300
    out = straight.export(tmp_path / "projection")
    torch.testing.assert_close(load_export(out).generate([PROMPT], seeds=[0], steps=3, guidance=4.5),
                               straight.generate([PROMPT], seeds=[0], steps=3, guidance=4.5), rtol=0, atol=1e-5)
    config = json.loads((out / "projection.json").read_text())
    (out / "projection.json").write_text(json.dumps({**config, "in_features": 48}))
    with pytest.raises(ProjectionConfigError, match=r"projection.json: its projection maps 48 -> 32 wide vectors, but the "
                                                    r"domain encoder 'tiny-bert' \(token states\) gives 32") as err:
        load_export(out)
    assert "\n" not in str(err.value)
    with pytest.raises(ProjectionConfigError, match=r"level: document maps the domain vector onto CLIP's pooled vector, and "
                                                    r"sana's text encoder has no pooled vector; use level: token"):
        TextualProjection(model=SANA, domain_encoder={"pretrained": "tiny-bert"}, level="document")
