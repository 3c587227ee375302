"""The throughput benchmark's DiT family rows (benchmarks/train_throughput.py --size sana-tiny / sd3-tiny / sana-0.6b /
sd35-medium) and the size presets they measure (sana-0.6b-random, sd35-medium-random, synthetic/presets.py)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def size_presets():
    """Both size presets built on the meta device (accelerate's init_empty_weights): shapes only, no weight drawn."""
    from accelerate import init_empty_weights

    from models.stable_diffusion import load_stable_diffusion

    with init_empty_weights(include_buffers=True):
        return {name: load_stable_diffusion(name) for name in ("sana-0.6b-random", "sd35-medium-random")}


def billions(module: torch.nn.Module, buffers: bool = False) -> float:
    return (sum(p.numel() for p in module.parameters()) + (sum(b.numel() for b in module.buffers()) if buffers else 0)) / 1e9


# published sizes, in billions: Sana's paper and model card (Sana-0.6B: 590 M transformer), Google's Gemma 2 report (2B:
# 2.61 B), Stability's SD 3.5 medium card (2.5 B; it counts the 384 x 384 x 1536 position table, a buffer in diffusers),
# T5 v1.1 XXL's encoder (4.76 B), OpenCLIP ViT-bigG/14's text tower (0.69 B), CLIP ViT-L/14's (0.123 B)
PUBLISHED = [("sana-0.6b-random", "transformer", False, 0.59), ("sana-0.6b-random", "text_encoder", False, 2.61),
             ("sd35-medium-random", "transformer", True, 2.5), ("sd35-medium-random", "text_encoder_3", False, 4.76),
             ("sd35-medium-random", "text_encoder_2", False, 0.69), ("sd35-medium-random", "text_encoder", False, 0.123)]


@pytest.mark.parametrize("preset, part, with_buffers, published", PUBLISHED, ids=[f"{p}-{q}" for p, q, _, _ in PUBLISHED])
def test_size_presets_have_the_published_parameter_counts(size_presets, preset, part, with_buffers, published):
    module = getattr(size_presets[preset], part)
    assert next(module.parameters()).device.type == "meta"  # built where the caller builds (here: nowhere, shapes only)
    assert billions(module, with_buffers) == pytest.approx(published, rel=0.02)  # within 2% of the published size


def test_size_presets_have_the_families_latent_and_text_shapes(size_presets):
    sana, sd3 = size_presets["sana-0.6b-random"], size_presets["sd35-medium-random"]
    # Sana 0.6B at 512 px: 32x down-sampling to 16x16x32 latents, the 300-token Gemma-2 window, Gemma-2 2B's vocabulary
    assert (sana.family, sana.vae_scale_factor, sana.native_size, sana.text_window) == ("sana", 32, 512, 300)
    assert sana.transformer.config.in_channels == sana.vae.config.latent_channels == 32
    assert sana.text_encoder.config.vocab_size == 256000 and sana.default_sampler == "dpm"
    # SD 3.5 medium: 16 channels, 8x down-sampling, its scale and shift, shift-3 flow schedule, pooled CLIP-L + CLIP-G
    assert (sd3.family, sd3.vae_scale_factor, sd3.text_window) == ("sd3", 8, 256)
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor, sd3.noise_scheduler.config.shift) == (1.5305, 0.0609, 3.0)
    assert sd3.transformer.config.pooled_projection_dim == 768 + 1280 and sd3.text_encoder_3.config.vocab_size == 32128
    # the tiny tokenizers give ids inside the real vocabularies' tables
    ids_l, ids_g, ids_t5 = sd3.tokenize(["a chest x-ray with a pleural effusion"])
    assert int(ids_l.max()) < 49408 and int(ids_t5.max()) < 32128 and int(sana.tokenize(["a chest x-ray"])[0].max()) < 256000


@pytest.mark.parametrize("args, message", [
    (["--size", "sana-0.6b", "--device", "cpu"], "--size sana-0.6b trains Sana 0.6B"),
    (["--size", "sd35-medium", "--device", "cpu"], "--size sd35-medium trains SD 3.5 medium"),
    (["--size", "sana-tiny", "--strategies", "textual_inversion"], "--strategies textual_inversion: not run on sana bases"),
    (["--size", "sd3-tiny", "--ladder"], "--ladder: the U-Net settings ladder is Stable Diffusion's"),
])
def test_family_sizes_refuse_what_they_cannot_run_in_one_line(bench, args, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        bench.main(args)
    last = err.getvalue().strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"error: {message}" in last, last  # (argparse names the program as it was started)
    if "--device" in args:  # it says what to run instead
        assert "Run it on a GPU (--device cuda), use --size" in last and "-tiny here" in last


def test_grouped_convolution_weight_gradients_count_as_their_forward(bench):
    """torch's FlopCounterMode counts a grouped convolution's weight gradient ``groups`` times over; the benchmark's
    count does not (a depthwise 3x3 convolution's training step is its forward three times, as any layer's)."""
    from torch.utils.flop_counter import FlopCounterMode

    for groups in (1, 4, 80):
        conv = torch.nn.Conv2d(80, 80, 3, padding=1, groups=groups)
        x = torch.randn(2, 80, 8, 8, requires_grad=True)
        forward, step = FlopCounterMode(display=False), FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: bench.grouped_conv_backward_flop})
        with forward:
            conv(x)
        with step:
            conv(x).sum().backward()
        assert step.get_total_flops() == 3 * forward.get_total_flops()


def test_the_sana_step_count_is_three_forwards_full_and_two_under_lora(bench, phantom_root):
    """One training step of our Sana module counts the transformer's forward and its backward: 3x the forward when the
    transformer trains whole (input and weight gradients), about 2x under LoRA (input gradients only). torch's own
    count made the full step 14x (its depthwise convolutions' weight gradients counted 80 times over)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_modules.lora import LoRAFineTuning
    from lightning_modules.unet import UNetFineTuning

    batch = {"latent_dist": torch.randn(2, 16, 16, 16), "prompt": ["a chest x-ray", "a chest x-ray with a pleural effusion"]}
    full = UNetFineTuning(model={"pretrained": "tiny-random-sana"})
    lora = LoRAFineTuning(model={"pretrained": "tiny-random-sana"}, rank=4, target_modules=bench.FAMILY_LORA_TARGETS["sana"])
    for module in (full, lora):
        module.conditioning(batch["prompt"])  # the prompts' Gemma-2 outputs cached, as after the first training step
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        full.sd.transformer(hidden_states=torch.randn(2, 8, 16, 16), timestep=torch.tensor([10, 500]),
                            encoder_hidden_states=torch.randn(2, 300, 32), encoder_attention_mask=torch.ones(2, 300))
    forward = counter.get_total_flops() / 2
    # (a little under 3x: the first layer needs no input gradient)
    assert 2.95 * forward < bench.step_flops(full, "unet", batch, torch.device("cpu")) / 2 <= 3 * forward
    assert 1.9 * forward < bench.step_flops(lora, "lora", batch, torch.device("cpu")) / 2 < 2.2 * forward


@pytest.mark.slow
@pytest.mark.parametrize("size, in_process", [("sana-tiny", False), ("sd3-tiny", True)])
def test_tiny_family_rows_print_ours_against_the_reference_with_flops(tmp_path, size, in_process):
    """One step of each strategy the family runs (full transformer, LoRA), ours against the script's reference loop:
    printed, and written as JSON and a markdown table (the sana-tiny rows with each loop in its own process, as on a GPU)."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", size, "--steps", "1", "--warmup", "0", "--json",
                           str(out / "rows.json"), "--markdown", str(out / "rows.md")] + (["--in_process"] if in_process else []),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "rows.json").read_text())
    assert report["family"] == size.split("-")[0] and [r["strategy"] for r in report["rows"]] == ["unet", "lora"]
    for row in report["rows"]:
        assert row["reference"]["samples_per_s"] > 0 and row["ours"]["samples_per_s"] > 0 and row["speed_ratio"] > 0
        assert row["flops_per_sample"] > 0 and row["ours"]["tflops"] > 0 and row["ours"]["mfu"] is None  # CPU: no peak
    full, lora = report["rows"]
    assert 1.2 < full["flops_per_sample"] / lora["flops_per_sample"] < 1.8  # 3 forwards against about 2
    printed = [line for line in proc.stdout.splitlines() if line.startswith(("unet ", "lora "))]
    assert len(printed) == 2 and all("reference" in line and "ours" in line and "GFLOP/sample" in line for line in printed)
    table = (out / "rows.md").read_text()
    assert "| transformer (full) | fp32 | 4 |" in table and "| LoRA, rank 4 | fp32 | 4 |" in table
