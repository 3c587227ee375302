"""Caches and speed settings: cached training follows the uncached trajectory; keys invalidate; the benchmark runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from datamodules.latent_cache import LatentCache, LatentCachePlan, build_latent_cache, sample_latents
from datamodules.mimic_cxr import MIMICCXRDataModule
from lightning_modules.preparation import latent_cache_plan
from lightning_modules.unet import UNetFineTuning

REPO = Path(__file__).resolve().parents[1]


class LossLog(Callback):
    def __init__(self):
        self.losses, self.kinds = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.kinds.add("latent_dist" if "latent_dist" in batch else "pixel_values")


def fit(phantom_root, cache_root, steps=6, resolution=64, **module_kwargs):
    torch.manual_seed(0)
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding", "Pleural Effusion"], resolution=resolution,
                            batch_size=2, max_val_images=0, cache_dir=str(cache_root), seed=0)
    module = UNetFineTuning(model={"pretrained": "tiny-random"}, learning_rate=1e-3, **module_kwargs)
    log = LossLog()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[log])
    trainer.fit(module, dm)
    return log, module, dm


@pytest.mark.slow
def test_cached_run_follows_the_uncached_trajectory(phantom_root, tmp_path):
    plain, plain_module, _ = fit(phantom_root, tmp_path, cache_latents=False, cache_text=False)
    cached, cached_module, dm = fit(phantom_root, tmp_path, cache_latents=True, cache_text=True)
    assert plain.kinds == {"pixel_values"} and cached.kinds == {"latent_dist"}
    assert len(plain.losses) == len(cached.losses) == 6
    # the same noise, timesteps and posterior draws: equal up to float rounding of batched VAE/CLIP calls
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)
    # weights: Adam's normalised steps amplify rounding where a gradient is ~0, so compare the whole update
    start = UNetFineTuning(model={"pretrained": "tiny-random"})
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.sd.unet.parameters()])
    update = (flat(plain_module) - flat(start)).norm()
    assert update > 0.1 and (flat(cached_module) - flat(plain_module)).norm() < 0.01 * update
    assert dm.latent_cache is not None and len(dm.latent_cache) == len(dm.train_records)


def test_cache_is_built_once_and_keys_cover_model_and_resolution(phantom_root, tmp_path):
    _, _, dm = fit(phantom_root, tmp_path, steps=1)
    folder = dm.latent_cache.directory
    block = next(folder.glob("mean.*.npy"))  # one row block: one process encoded it
    stamp = block.stat().st_mtime_ns
    _, _, dm2 = fit(phantom_root, tmp_path, steps=1)
    assert dm2.latent_cache.directory == folder and block.stat().st_mtime_ns == stamp  # reused
    assert dm2.latent_cache.info["resolution"] == 64
    _, _, dm32 = fit(phantom_root, tmp_path, steps=1, resolution=32)
    assert dm32.latent_cache.directory != folder  # a new resolution builds a new cache
    assert dm32.latent_cache.mean.shape[-1] == 16 and dm.latent_cache.mean.shape[-1] == 32
    other = latent_cache_plan(dm.training_images(), "another-model@main", dm.cache_root)
    assert other.directory != folder


def test_interrupted_build_leaves_nothing_readable(tmp_path):
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return pixels[:, :1], pixels[:, 1:2]

    plan = LatentCachePlan(tmp_path, [f"img{i}" for i in range(5)], lambda i: torch.zeros(3, 4, 4), {"model": "m"})
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(plan, encode, batch_size=2, progress=False)
    assert not LatentCache.is_complete(plan.directory) and not any((tmp_path / "latents").iterdir())
    cache = build_latent_cache(plan, lambda p: (p[:, :1], p[:, 1:2]), batch_size=2, progress=False)
    assert len(cache) == 5 and cache.get("img4").shape == (2, 4, 4)
    with pytest.raises(KeyError, match="'nope' is not in the latent cache"):
        cache.get("nope")


def test_sampling_from_a_cached_posterior_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(3, 8, 5, 5)
    want = DiagonalGaussianDistribution(params).sample(generator=torch.Generator().manual_seed(7)) * 0.5
    got = sample_latents(params, torch.Generator().manual_seed(7), 0.5, torch.float32)
    torch.testing.assert_close(got, want)


def test_random_flips_turn_latent_caching_off(phantom_root, tmp_path):
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, cache_dir=str(tmp_path),
                            hflip_probability=0.5, max_val_images=0)
    with pytest.warns(UserWarning, match="cache_latents is off: hflip_probability=0.5"):
        assert dm.training_images() is None


def test_text_cache_returns_clip_outputs_and_stays_bounded():
    module = UNetFineTuning(model={"pretrained": "tiny-random"}, text_cache_size=2)
    prompts = ["a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion", "a photo of a lung xray"]
    torch.testing.assert_close(module.conditioning(prompts), module.sd.encode_prompts(prompts), rtol=1e-5, atol=1e-6)
    module.conditioning(["a photo in the style of a lung xray"])
    cache = module.conditioning.cache
    assert len(cache) == 2 and "a photo in the style of a lung xray" in cache


@pytest.mark.slow
def test_benchmark_rows_flops_ladder_and_memory_profile(tmp_path):
    """The benchmark on the tiny model: a row per strategy with its FLOP count, the U-Net ladder, the memory profile,
    JSON and markdown (what benchmarks/gpu_suite.sh runs at SD size on a GPU)."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from models.stable_diffusion import load_stable_diffusion

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--size", "tiny", "--steps", "1",
                           "--warmup", "1", "--in_process", "--suite", "--no_compile", "--memory_profile", str(out / "memory"),
                           "--json", str(out / "suite.json"), "--markdown", str(out / "suite.md")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    rows = {(r["strategy"], r["label"]): r for r in report["rows"]}
    strategies = ("unet", "unet_text_encoder", "lora", "textual_inversion", "projection", "projection_token")
    for strategy in strategies:
        row = rows[(strategy, "fp32")]
        assert row["reference"]["samples_per_s"] > 0 and row["ours"]["samples_per_s"] > 0 and row["speed_ratio"] > 0
        assert row["flops_per_sample"] > 0 and row["ours"]["tflops"] > 0 and row["ours"]["mfu"] is None  # CPU: no peak
    # the count is one training step: the U-Net's forward and its backward (2x: input and weight gradients) per image
    unet = load_stable_diffusion("tiny-random").unet
    counter = FlopCounterMode(display=False)
    with counter:
        unet(torch.randn(4, 4, 32, 32), torch.tensor([1, 2, 3, 4]), torch.randn(4, 77, 32))  # 64 px -> 32 x 32 latents
    forward = counter.get_total_flops() / 4
    assert rows[("unet", "fp32")]["flops_per_sample"] == pytest.approx(3 * forward, rel=0.01)
    # textual inversion and LoRA train no U-Net base weight, so their backward skips those weight gradients
    for strategy in ("textual_inversion", "lora"):
        assert 1.5 * forward < rows[(strategy, "fp32")]["flops_per_sample"] < 2.5 * forward
    # the ladder: one row each, the batch rows at their batch, rows that cannot run here named as not measured
    ladder = [r for r in report["rows"] if r["label"].startswith("+")]
    assert [r["label"] for r in ladder] == ["+ channels_last", "+ channels_last, batch 16", "+ channels_last, batch 32",
                                            "+ channels_last, gradient checkpointing"]
    assert [r["batch"] for r in ladder] == [4, 16, 32, 4] and all(r["reference"] is None for r in ladder)
    # what matters most runs first (a GPU run cut short by its time limit keeps it): U-Net and its reference, the ladder
    assert [r["label"] for r in report["rows"][:2]] == ["fp32", "+ channels_last"] and report["rows"][0]["strategy"] == "unet"
    # gradient checkpointing recomputes, but the count is of the useful work: the same FLOPs per sample
    assert ladder[-1]["flops_per_sample"] == rows[("unet", "fp32")]["flops_per_sample"]
    notes = " ".join(report["notes"])
    assert "adamw8bit: not measured" in notes and "torch.compile: not measured (--no_compile)" in notes
    assert "multi-GPU scaling: not measured" in notes
    # memory: ours holds no gradients at its peak (they are freed right after each optimizer step, so the next
    # forward does not sit on them) and peaks no higher than the reference
    memory = report["memory_breakdown"]
    assert memory["ours U-Net"]["gradients"] == 0 and memory["ours U-Net"]["total"] <= memory["reference U-Net"]["total"]
    assert memory["ours U-Net"]["optimizer state"] > 0 and memory["ours U-Net"]["activations and temporaries"] > 0
    table = (out / "suite.md").read_text()
    assert report["machine"]["device"] in table and report["date"] in table
    assert table.count("\n| ") == 1 + len(report["rows"]) and "| U-Net | + channels_last, batch 16 | 16 |" in table


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradient_clipping_works_with_the_fused_optimizer(phantom_root, tmp_path, precision):
    dm = MIMICCXRDataModule(root=str(phantom_root), findings=["No Finding"], resolution=64, batch_size=2, max_val_images=0,
                            cache_dir=str(tmp_path))
    module = UNetFineTuning(model={"pretrained": "tiny-random"}, learning_rate=1e-3)
    norms, freed = [], []

    class Watch(Callback):
        def on_train_start(self, trainer, pl_module):
            # after the step (the closure ran forward, backward and the clipping inside it): the norm the update used
            trainer.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: norms.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])))))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            freed.append(all(p.grad is None for p in pl_module.sd.unet.parameters()))

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, precision=precision, gradient_clip_val=1e-6, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[Watch()])
    before = [p.detach().clone() for p in module.sd.unet.parameters()]
    trainer.fit(module, dm)
    assert trainer.optimizers[0].defaults["fused"] is True
    # with the gradients clipped to norm 1e-6 Adam still moves (its step is scale-free), so check the clip ran
    # through the hook: the total gradient norm each step used is at most the clip value
    assert len(norms) == 2 and max(norms) <= 1e-6 * 1.01
    assert any(not torch.equal(a, b) for a, b in zip(before, module.sd.unet.parameters()))
    # the gradients are freed right after each optimizer step, not kept through the next forward (peak memory)
    assert freed == [True, True]


@pytest.mark.slow
def test_memory_estimate_counts_the_gradients_lightning_kept_through_the_forward(tmp_path):
    """benchmarks/memory_estimate.py (fake tensors: SD-size peaks on any machine) on the tiny U-Net: freeing gradients
    only before the next backward costs exactly one set of fp32 gradients at the peak."""
    import json

    from models.stable_diffusion import load_stable_diffusion

    out = tmp_path / "estimate.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_estimate.py"), "--size", "tiny", "--batch", "4",
                           "--variants", "after_step", "before_backward", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    grads = 4 * sum(p.numel() for p in load_stable_diffusion("tiny-random").unet.parameters())
    after, before = rows["after_step"], rows["before_backward"]
    assert after["gradients"] == 0 and before["gradients"] == grads
    assert before["total"] - after["total"] == grads
    assert after["optimizer state"] == pytest.approx(2 * grads, rel=1e-3)  # AdamW's two moments (+ a step count per tensor)
    assert after["activations"] > 0 and after["with frozen parts"] > after["total"]


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    ("train_throughput.py", ["--json", "{tmp}"], "--json {tmp} is a folder; expected a file name"),
    ("train_throughput.py", ["--markdown", "{tmp}/a_file/table.md"], "--markdown: the folder {tmp}/a_file is a file, not a folder"),
    ("train_throughput.py", ["--device", "nonsense"], "--device 'nonsense': expected auto, cpu, cuda or cuda:N"),
    ("train_throughput.py", ["--pretrained", "{tmp}/missing"], "--pretrained {tmp}/missing: not a diffusers pipeline folder"),
    ("train_throughput.py", ["--peak_tflops", "0"], "argument --peak_tflops: 0.0 is not above 0"),
    ("train_throughput.py", ["--size", "sd14", "--device", "cpu"], "--size sd14 trains SD v1.4's full U-Net at 512 px"),
    ("memory_estimate.py", ["--resolution", "0"], "--resolution 0: expected a multiple of 64"),
    ("memory_estimate.py", ["--json", "{tmp}"], "--json {tmp} is a folder; expected a file name"),
])
def test_benchmarks_refuse_bad_input_before_measuring(tmp_path, script, args, message):
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--size", "tiny",
                           *[a.format(tmp=tmp_path) for a in args]], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # (argparse adds its usage above)
    assert lines[-1].startswith(f"{script}: error: ") and message.format(tmp=tmp_path) in lines[-1], lines[-1]
