"""The one Stable Diffusion loader: presets, real folders, clear errors, precision."""
from __future__ import annotations

import pytest
import torch

from models.stable_diffusion import (
    StableDiffusionLoadError,
    StableDiffusionSpec,
    load_stable_diffusion,
    precision_to_dtype,
)


def test_tiny_random_is_seeded_and_frozen(tiny_sd):
    again = load_stable_diffusion(StableDiffusionSpec(pretrained="tiny-random"))
    other = load_stable_diffusion(StableDiffusionSpec(pretrained="tiny-random", seed=1))
    w = tiny_sd.unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight)
    assert not torch.equal(w, other.unet.conv_in.weight)
    assert not any(p.requires_grad for p in tiny_sd.parameters())


def test_tiny_tokenizer_keeps_prompt_words_whole(tiny_sd):
    tokens = tiny_sd.tokenizer.tokenize("a photo of a lung xray with a visible pleural effusion")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "a</w>", "lung</w>", "xray</w>", "with</w>", "a</w>", "visible</w>", "pleural</w>", "effusion</w>"]
    assert tiny_sd.tokenizer.tokenize("zebra")  # any other text still tokenises


def test_encoders_and_sampler_shapes(tiny_sd):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = tiny_sd.encode_images(x, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 32, 32)
    cond = tiny_sd.encode_prompts(["a photo of a lung xray", ""])
    assert cond.shape == (2, 77, 32)
    images = tiny_sd.sample(cond[:1], cond[1:], seeds=[3], steps=2)
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    # an image depends on its own seed only, not on the batch it is generated in
    pair = tiny_sd.sample(cond[:1].repeat(2, 1, 1), cond[1:].repeat(2, 1, 1), seeds=[5, 3], steps=2)
    assert torch.allclose(pair[1], images[0], atol=1e-5)


def test_missing_folder_names_it_and_says_how_to_get_weights(tmp_path):
    with pytest.raises(StableDiffusionLoadError) as err:
        load_stable_diffusion(str(tmp_path / "no-such-sd"))
    assert str(tmp_path / "no-such-sd") in str(err.value)
    assert "model_index.json" in str(err.value) and "tiny-random" in str(err.value)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(StableDiffusionLoadError, match="missing"):
        load_stable_diffusion(str(tmp_path))


def test_uncached_hub_id_offline_is_a_clear_error():
    with pytest.raises(StableDiffusionLoadError, match="CompVis/stable-diffusion-v1-4"):
        load_stable_diffusion(StableDiffusionSpec(local_files_only=True))


def test_saved_pipeline_folder_loads_back(tiny_sd, tmp_path):
    tiny_sd.pipeline("pndm").save_pretrained(tmp_path / "sd", safe_serialization=True)
    loaded = load_stable_diffusion(StableDiffusionSpec(pretrained=str(tmp_path / "sd"), local_files_only=True))
    assert torch.equal(loaded.unet.conv_in.weight, tiny_sd.unet.conv_in.weight)
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000


def test_frozen_parts_take_the_run_dtype_trainable_stay_fp32():
    sd = load_stable_diffusion("tiny-random")
    sd.unet.requires_grad_(True)
    sd.set_frozen_dtype(precision_to_dtype("bf16-mixed"))
    assert next(sd.vae.parameters()).dtype == torch.bfloat16
    assert next(sd.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(sd.unet.parameters()).dtype == torch.float32
    assert precision_to_dtype("16-mixed") == torch.float16 and precision_to_dtype("32-true") == torch.float32


def test_chunked_long_prompts_read_every_window_and_train_and_sample(phantom_root, tmp_path):
    """long_prompts: chunked reads a long prompt in CLIP windows of 75 tokens (each written as CLIP tokenizes a prompt)
    and concatenates their states: a short prompt's first window is today's conditioning, the rest empty windows; the
    U-Net trains and samples on it; it is off by default, and refused in one line where it does not apply."""
    from conftest import phantom_dm, quiet_trainer
    from lightning_modules.unet import UNetFineTuning
    from models.families import BaseFamilyError

    plain = load_stable_diffusion({"pretrained": "tiny-random"})
    chunked = load_stable_diffusion({"pretrained": "tiny-random", "long_prompts": "chunked"})
    long = " ".join(["a small left pleural effusion"] * 25)  # ~125 tokens
    short = "a photo of a lung xray"
    states = chunked.encode_prompts([short, long])
    assert states.shape == (2, 3 * 77, 32) and chunked.text_window == 225
    assert torch.equal(chunked.chunk_ids([short])[0], plain.tokenize([short])[0])  # its first window is SD's own tokens
    torch.testing.assert_close(states[0, :77], plain.encode_prompts([short])[0], rtol=0, atol=1e-5)
    empty = plain.encode_prompts([""])[0]
    assert torch.allclose(states[0, 77:154], empty, atol=1e-5) and not torch.allclose(states[1, 77:154], empty, atol=1e-3)
    assert chunked.count_too_long([long]) == 0 and plain.count_too_long([long]) == 1
    assert torch.equal(chunked.chunk_ids([short, long])[:3], chunked.chunk_ids([short]))  # its windows do not depend on its batch

    module = UNetFineTuning(model={"pretrained": "tiny-random", "long_prompts": "chunked", "max_sequence_length": 150})
    quiet_trainer(2).fit(module, datamodule=phantom_dm(phantom_root, tmp_path))
    assert module.conditioning([long]).shape == (1, 2 * 77, 32)
    assert module.generate([long], seeds=[0], steps=2).shape == (1, 3, 64, 64)
    assert module.generator().prompt_window([long])["handling"].startswith("chunked: 2 CLIP windows of 75 tokens")
    from models.exports import load_export

    reloaded = load_export(module.export(tmp_path / "export"))  # export.json's base model carries the chunking back
    torch.testing.assert_close(reloaded.conditioning([long]), module.conditioning([long]), rtol=0, atol=1e-5)
    with pytest.raises(BaseFamilyError, match=r"max_sequence_length: 150 tokens, .* or set model.long_prompts: chunked"):
        load_stable_diffusion({"pretrained": "tiny-random", "max_sequence_length": 150})
    with pytest.raises(Exception, match=r"model.long_prompts: 'chunked' chunks CLIP's 77-token window \(Stable Diffusion\); "
                                         r"sana bases read long prompts in their own window"):
        load_stable_diffusion({"pretrained": "tiny-random-sana", "long_prompts": "chunked"})
    with pytest.raises(Exception, match=r"model.long_prompts: 'split'; expected one of truncate, chunked"):
        load_stable_diffusion({"pretrained": "tiny-random", "long_prompts": "split"})
