"""The shipped tiny-phantom-sana preset: it loads offline as a Sana base and draws images, its folder is a plain diffusers
SanaPipeline, its schedule starts from pure noise, and its build is reproducible."""
from __future__ import annotations

import json
import socket

import pytest
import torch

from conftest import REPO

FOLDER = REPO / "synthetic" / "assets" / "tiny_phantom_sana"
PROMPT = "a photo of a lung xray"


@pytest.fixture(scope="module")
def sana():
    from models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion("tiny-phantom-sana")


def test_the_preset_loads_offline_as_a_sana_base_and_draws_images_in_range(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from models.sana import Sana
    from models.stable_diffusion import StableDiffusionSpec, load_stable_diffusion

    base = load_stable_diffusion("tiny-phantom-sana")
    assert isinstance(base, Sana) and base.spec.pretrained == "tiny-phantom-sana" and base.native_size == 64
    key = StableDiffusionSpec(pretrained="tiny-phantom-sana").cache_key()
    assert key.startswith("tiny-phantom-sana-") and not key.endswith("missing")
    assert base.vae.config.scaling_factor != 0.41407  # its own 1/std, not tiny-random-sana's
    cond = base.encode_prompts([PROMPT] * 2)
    images = base.sample(cond, base.encode_prompts([""] * 2), seeds=[0, 1], steps=4, guidance=4.0)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05 and (images[0] - images[1]).abs().max() > 0.05  # a picture per seed, not a flat field


def test_training_and_sampling_start_from_pure_noise(sana):
    """The tiny-phantom lesson (its MODEL_CARD.md): the layout must not be readable from the starting noise."""
    assert float(sana.noise_scheduler.sigmas[0]) == 1.0 and sana.noise_scheduler.config.shift == 3.0
    sampler = sana.inference_scheduler(sana.default_sampler)
    sampler.set_timesteps(25)
    assert float(sampler.sigmas[0]) == 1.0


def test_the_folder_is_small_safetensors_with_its_card_and_build_settings():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert (FOLDER / "MODEL_CARD.md").is_file()
    build = json.loads((FOLDER / "BUILD.json").read_text())
    assert build["quick"] is False and build["base_prompt"] == PROMPT


def test_the_folder_loads_in_plain_diffusers_and_samples_what_the_suite_samples(sana):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, height=64, width=64, use_resolution_binning=False,
                 complex_human_instruction=None, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = sana.sample(sana.encode_prompts([PROMPT]), sana.encode_prompts([""]), seeds=[0], steps=3, guidance=4.0)
    torch.testing.assert_close(ours, plain.float().clamp(0, 1), rtol=0, atol=1e-5)


def test_quick_builds_are_deterministic_and_load_as_sana(tmp_path):
    from models.sana import Sana
    from models.stable_diffusion import load_stable_diffusion
    from synthetic.build_tiny_phantom_sana import build, weights_digest

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a, b = build(tmp_path / "a", quick=True), build(tmp_path / "b", quick=True)
    assert weights_digest(a) == weights_digest(b)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)  # restored
    assert isinstance(load_stable_diffusion({"pretrained": str(a), "local_files_only": True}), Sana)
    assert build(tmp_path / "c", seed=1, quick=True) and weights_digest(tmp_path / "c") != weights_digest(a)


@pytest.mark.slow
def test_the_sana_demo_config_trains_and_the_finding_correctness_demo_takes_its_run(tmp_path):
    from conftest import demo_args, run_train
    from synthetic import finding_correctness_demo as demo

    run_train(*demo_args(tmp_path, "--trainer.max_steps", "2", "--run_name", "sana", "--model.init_args.prior_preservation"
                         ".num_class_images", "2", "--model.init_args.prior_preservation.steps", "2", config="sana_phantom_demo"))
    run = tmp_path / "runs" / "sana"
    out = demo.main([str(run), "--n", "3", "--steps", "2", "--grid_columns", "2", "--intervals"])
    assert out["base_model"] == {"pretrained": "tiny-phantom-sana", "family": "sana"}
    assert set(out["results"]) == {"base", "fine-tuned"}
    for r in out["results"].values():
        assert 0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1 and r["n_per_prompt"] == 3
    assert json.loads((run / "finding_correctness.json").read_text())["base_model"]["family"] == "sana"
    assert (run / "finding_correctness.png").is_file()
