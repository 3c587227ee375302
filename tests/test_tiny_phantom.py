"""The shipped tiny-phantom preset: it loads offline, its VAE and classifier work, its build is reproducible."""
from __future__ import annotations

import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO
from metrics.classifiers import finding_probabilities, load_classifier

HELD_OUT_SEED = 12345  # the build renders with seed 0; these phantoms were never seen in training


@pytest.fixture(scope="module")
def tiny_phantom():
    from models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion("tiny-phantom")


def held_out(n_per_finding: int = 16):
    from synthetic.build_tiny_phantom import phantom_images

    return phantom_images(n_per_finding, HELD_OUT_SEED)


def test_loading_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from models.stable_diffusion import load_stable_diffusion

    sd = load_stable_diffusion("tiny-phantom")
    assert sd.spec.pretrained == "tiny-phantom" and sd.vae.config.scaling_factor != 0.18215
    load_classifier("tiny-phantom")


def test_shipped_weights_are_small_safetensors():
    folder = REPO / "synthetic" / "assets" / "tiny_phantom"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert (folder / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_vae_reconstructs_held_out_phantoms(tiny_phantom):
    images, _ = held_out()
    x = images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        rec = tiny_phantom.decode_latents(tiny_phantom.vae.encode(x).latent_dist.mean * tiny_phantom.vae.config.scaling_factor)
    rmse_8bit = ((rec.clamp(-1, 1) - x) * 127.5).pow(2).mean().sqrt().item()
    assert rmse_8bit < 13.0, f"RMSE {rmse_8bit:.1f} gray levels"  # the shipped build: 12.0 (MODEL_CARD.md)
    # the scaling factor makes the latent means roughly unit variance (SD chose 0.18215 the same way)
    with torch.no_grad():
        means = tiny_phantom.vae.encode(x).latent_dist.mean * tiny_phantom.vae.config.scaling_factor
    assert 0.8 < means.std().item() < 1.25


def test_classifier_is_accurate_on_held_out_phantoms():
    images, findings = held_out(32)
    classifier = load_classifier("tiny-phantom")
    images01 = (images + 1) / 2
    for finding in ("Pleural Effusion", "Cardiomegaly"):
        p = finding_probabilities(classifier, images01, finding)
        truth = torch.tensor([f == finding for f in findings])
        accuracy = ((p > 0.5) == truth).float().mean().item()
        assert accuracy >= 0.9, f"{finding}: accuracy {accuracy:.2f}"


def test_classifier_input_must_be_in_unit_range():
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\]"):
        finding_probabilities(load_classifier("tiny-phantom"), torch.full((2, 3, 64, 64), -1.0), "Pleural Effusion")


def test_missing_xrv_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"densenet121-res224-all.*not found at .*nih-pc-chex-mimic_ch"):
        load_classifier("densenet121-res224-all", cache_dir=str(tmp_path))


@pytest.mark.slow
def test_the_build_is_reproducible(tmp_path):
    """Two shortened builds with one seed, one after the other in this process (so RNG state left over by the
    first must not leak into the second), give identical weights."""
    from synthetic import build_tiny_phantom as builder

    for name in ("a", "b"):
        builder.main(["--quick", "--out", str(tmp_path / name)])
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "classifier.safetensors",
                 "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (tmp_path / "a" / "vae" / "config.json").read_text() == (tmp_path / "b" / "vae" / "config.json").read_text()


@pytest.mark.slow
def test_finding_correctness_demo_compares_base_and_fine_tuned(reference_run):
    import json

    proc = subprocess.run([PYTHON, "-m", "synthetic.finding_correctness_demo", str(reference_run), "--n", "4",
                           "--steps", "2", "--grid_columns", "2"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AUROC" in proc.stdout and "fine-tuned" in proc.stdout
    out = json.loads((reference_run / "finding_correctness.json").read_text())
    assert set(out["results"]) == {"base", "fine-tuned"}
    for r in out["results"].values():
        assert 0 <= r["auroc"] <= 1 and 0 <= r["accuracy"] <= 1 and r["n_per_prompt"] == 4
    assert (reference_run / "finding_correctness.png").is_file()


def test_finding_correctness_of_a_run_without_checkpoint_is_a_clear_error(tmp_path):
    from synthetic import finding_correctness_demo as demo

    with pytest.raises(SystemExit) as exit_:
        demo.main([str(tmp_path)])
    assert "finding_correctness_demo.py: error:" in str(exit_.value.code) and "no checkpoint" in str(exit_.value.code)


@pytest.mark.slow
def test_every_sampler_reads_the_zero_terminal_snr_v_prediction_schedule(tiny_phantom):
    """tiny-phantom predicts v on a zero-terminal-SNR schedule (MODEL_CARD.md); each sampler must read it, PNDM too."""
    from models.stable_diffusion import INFERENCE_SCHEDULERS

    assert tiny_phantom.noise_scheduler.config.prediction_type == "v_prediction"
    assert tiny_phantom.noise_scheduler.alphas_cumprod[-1] < 1e-7
    cond = tiny_phantom.encode_prompts(["a photo of a lung xray"] * 2)
    uncond = tiny_phantom.encode_prompts([""] * 2)
    means = {}
    for name in INFERENCE_SCHEDULERS:
        scheduler = tiny_phantom.inference_scheduler(name)
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "trailing", name
        assert torch.allclose(scheduler.alphas_cumprod, tiny_phantom.noise_scheduler.alphas_cumprod), name
        images = tiny_phantom.sample(cond, uncond, seeds=[0, 1], steps=8, guidance=4.0, scheduler=name)
        assert torch.isfinite(images).all() and images.std() > 0.1, name  # a drawing, not a blank or saturated frame
        means[name] = images.mean().item()
    assert max(means.values()) - min(means.values()) < 0.1, means  # the samplers agree on the picture's brightness
