"""Build the ``tiny-phantom`` preset: a small Stable Diffusion trained on chest X-ray phantoms.

``python -m synthetic.build_tiny_phantom`` writes ``synthetic/assets/tiny_phantom/``, a diffusers
pipeline folder plus a phantom finding classifier, deterministically from the phantom generator:

1. a tiny ``AutoencoderKL`` (32/64 channels, 64 px -> 4x32x32) trained to reconstruct phantoms; its
   ``scaling_factor`` is 1 / std of the latents, as SD's 0.18215 was chosen;
2. the tiny CLIP text encoder of ``tiny-random`` (seeded random weights; its tokenizer covers the
   suite's prompts). It is frozen everywhere, like SD's CLIP;
3. a base U-Net trained on phantoms of every finding with the generic prompt
   "a photo of a lung xray" only (10 % empty prompts, for classifier-free guidance): it draws chest
   X-rays but has never seen a finding named — the analogue of SD v1.4 never having seen radiology.
   It predicts v on SD v1.4's schedule rescaled to zero terminal SNR
   (``synthetic.presets.tiny_phantom_scheduler_config``): under SD v1.4's own schedule a 64 px
   phantom's layout can be read from the starting noise, and the U-Net never learns to take it from
   the prompt, even when fine-tuned with one;
4. a small CNN classifier for the phantom findings (Effusion, Cardiomegaly) behind the
   torchxrayvision interface (``synthetic/phantom_classifier.py``).

``--quick`` runs a few steps of each stage (for the reproducibility test). The full build takes
about 20 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synthetic.phantom_classifier import PhantomClassifier
from synthetic.phantoms import render_phantom
from synthetic.presets import TINY_PHANTOM_DIR, load_tiny_tokenizer, tiny_configs, tiny_phantom_scheduler_config

OUT = TINY_PHANTOM_DIR
FINDINGS = ("No Finding", "Pleural Effusion", "Cardiomegaly")
BASE_PROMPT = "a photo of a lung xray"
RESOLUTION = 64
FULL = dict(n_per_finding=256, vae_steps=350, unet_steps=1000, classifier_steps=300)
QUICK = dict(n_per_finding=8, vae_steps=3, unet_steps=3, classifier_steps=3)


def phantom_images(n_per_finding: int, seed: int, size: int = RESOLUTION) -> tuple[torch.Tensor, list[str]]:
    """``[N, 1, size, size]`` in [-1, 1] and the finding of each image (rendered at 2x, downsampled)."""
    from PIL import Image

    images, findings = [], []
    for f_index, finding in enumerate(FINDINGS):
        for i in range(n_per_finding):
            rng = np.random.default_rng([seed, f_index, i])
            arr = render_phantom(finding, 2 * size, rng)
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
            images.append(arr / 127.5 - 1.0)
            findings.append(finding)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), findings


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_vae(images: torch.Tensor, steps: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_configs()["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=1e-4)
    g = torch.Generator().manual_seed(seed)
    x3 = images.expand(-1, 3, -1, -1)
    for step in range(steps):
        idx = torch.randint(0, len(images), (16,), generator=g)
        x = x3[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step}: mse {F.mse_loss(rec, x).item():.5f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x3[i : i + 64]).latent_dist.mean for i in range(0, len(x3), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


def build_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        **tiny_configs()["text_encoder"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


def train_unet(images: torch.Tensor, vae, text_encoder, tokenizer, steps: int, seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_configs()["unet"])
    scheduler = DDPMScheduler.from_config(tiny_phantom_scheduler_config())
    with torch.no_grad():
        x3 = images.expand(-1, 3, -1, -1)
        dists = [vae.encode(x3[i : i + 64]).latent_dist for i in range(0, len(x3), 64)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        ids = tokenizer([BASE_PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond, uncond = text_encoder(ids)[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=1e-2)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1))))
    )
    g = torch.Generator().manual_seed(seed)
    sf = vae.config.scaling_factor
    batch = 16
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < 0.1
        c = torch.where(drop[:, None, None], uncond, cond)
        pred = unet(scheduler.add_noise(latents, noise, t), t, c).sample
        loss = F.mse_loss(pred, scheduler.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    return unet.eval()


def train_classifier(images: torch.Tensor, findings: list[str], steps: int, seed: int) -> PhantomClassifier:
    torch.manual_seed(seed)
    model = PhantomClassifier()
    labels = torch.tensor([[f == "Pleural Effusion", f == "Cardiomegaly"] for f in findings], dtype=torch.float32)
    x = images * 1024.0  # [-1, 1] -> xrv range
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        xb = x[idx]
        # light intensity jitter so generated images (slightly off in contrast) are scored fairly
        xb = xb * (1 + 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)) + 60 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)
        loss = F.binary_cross_entropy_with_logits(model.logits(xb.clamp(-1024, 1024)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}: bce {loss.item():.4f}")
    return model.eval()


def build(out: Path = OUT, seed: int = 0, quick: bool = False) -> Path:
    """Build every part and write the preset folder; returns ``out``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # tiny optimizer moments otherwise go denormal and slow CPU training 5x
    sizes = QUICK if quick else FULL
    log(f"rendering {sizes['n_per_finding']} phantoms per finding ({', '.join(FINDINGS)})")
    train_images, train_findings = phantom_images(sizes["n_per_finding"], seed)
    vae = train_vae(train_images, sizes["vae_steps"], seed + 1)
    text_encoder, tokenizer = build_text_encoder(seed + 2)
    unet = train_unet(train_images, vae, text_encoder, tokenizer, sizes["unet_steps"], seed + 3)
    classifier = train_classifier(train_images, train_findings, sizes["classifier_steps"], seed + 4)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(tiny_phantom_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    classifier.save(out)
    settings = {"seed": seed, "quick": quick, **sizes, "findings": FINDINGS, "base_prompt": BASE_PROMPT, "resolution": RESOLUTION,
                "prediction_type": "v_prediction", "schedule": "SD v1.4 rescaled to zero terminal SNR"}
    (out / "BUILD.json").write_text(json.dumps(settings, indent=1) + "\n")
    log(f"wrote {out}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (tests)")
    args = parser.parse_args(argv)
    build(args.out, args.seed, args.quick)


if __name__ == "__main__":
    main()
