"""Build the ``tiny-phantom-sana`` preset: a small Sana trained on chest X-ray phantoms.

``python -m synthetic.build_tiny_phantom_sana`` writes ``synthetic/assets/tiny_phantom_sana/``, a diffusers
``SanaPipeline`` folder, deterministically from the phantom generator (the pieces of
:mod:`synthetic.build_tiny_phantom`: the same phantoms, findings, prompt and resolution):

1. an ``AutoencoderDC`` of ``tiny-random-sana``'s architecture (16/32/32 channels, 8 latent channels, 4x down-sampling:
   64 px -> 8x16x16) trained to reconstruct phantoms (MSE; the DC autoencoder is deterministic, so there is no KL term);
   its ``scaling_factor`` is 1 / std of its latents;
2. the tiny Gemma-2 text encoder and tokenizer of ``tiny-random-sana`` (seed 0: the same seeded random weights), frozen
   everywhere, like tiny-phantom's CLIP;
3. a base ``SanaTransformer2DModel`` (8 layers, 96 wide, sin-cos position embeddings) trained by rectified-flow
   matching through the Sana base's own interface (``sana.objective.draw``, ``sana.denoise``: the suite's
   :class:`~models.families.FlowMatchingObjective`, diffusers' Sana script's maths) on phantoms of every finding with
   the generic prompt "a photo of a lung xray" only (10 % empty prompts, for classifier-free guidance): it draws chest
   X-rays but has never seen a finding named. The schedule is ``FlowMatchEulerDiscreteScheduler(shift=3.0)``: its
   first training sigma and the first sampling sigma are exactly 1 (pure noise), so the layout of a 64 px phantom
   cannot be read from the starting noise (the tiny-phantom lesson) and must come from the prompt.

The finding classifier is tiny-phantom's (``synthetic/assets/tiny_phantom/classifier.safetensors``), not rebuilt.
``--quick`` runs a few steps of each stage (for the reproducibility test). The full build runs on one thread: 5.5 to 13 minutes
measured on 2 CPU cores shared with other jobs (two builds, the same weights).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synthetic.build_tiny_phantom import BASE_PROMPT, FINDINGS, RESOLUTION, log, phantom_images
from synthetic.presets import TINY_PHANTOM_SANA_DIR, build_tiny_sana, tiny_phantom_sana_configs

OUT = TINY_PHANTOM_SANA_DIR
FULL = dict(n_per_finding=256, vae_steps=300, transformer_steps=1200, batch_size=16)
QUICK = dict(n_per_finding=1, vae_steps=2, transformer_steps=2, batch_size=2)
HELD_OUT_SEED = 1000  # phantoms the autoencoder never saw, for its reconstruction error
PROMPT_DROPOUT = 0.1


def train_vae(images: torch.Tensor, steps: int, seed: int, batch: int = 16):
    """An ``AutoencoderDC`` trained to reconstruct ``images`` (MSE, cosine learning rate), ``scaling_factor`` set to
    1 / std of its latents (as SD's 0.18215 and Sana's 0.41407 were chosen)."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    vae = AutoencoderDC(**tiny_phantom_sana_configs()["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=1e-4)
    g = torch.Generator().manual_seed(seed)
    x3 = images.expand(-1, 3, -1, -1)
    for step in range(steps):
        x = x3[torch.randint(0, len(images), (batch,), generator=g)]
        loss = F.mse_loss(vae.decode(vae.encode(x).latent).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step}: mse {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x3[i : i + 64]).latent for i in range(0, len(x3), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


@torch.no_grad()
def held_out_rmse(vae, n_per_finding: int = 16) -> float:
    """Reconstruction RMSE in gray levels (0-255) on phantoms the autoencoder never saw."""
    images, _ = phantom_images(n_per_finding, HELD_OUT_SEED)
    x3 = images.expand(-1, 3, -1, -1)
    rec = torch.cat([vae.decode(vae.encode(x3[i : i + 64]).latent).sample for i in range(0, len(x3), 64)])
    return float(((rec.clamp(-1, 1) - x3) * 127.5).pow(2).mean().sqrt())


def sana_base(vae, seed: int):
    """The Sana base of the build: the trained autoencoder, tiny-random-sana's Gemma-2 and tokenizer (seed 0), a new
    transformer drawn from ``seed`` and the training schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    from models.sana import Sana
    from models.stable_diffusion import StableDiffusionSpec

    cfg = tiny_phantom_sana_configs()
    spec = StableDiffusionSpec(pretrained=str(OUT), family="sana")
    with torch.random.fork_rng(devices=[]):
        random_sana = build_tiny_sana(0, spec)  # its text encoder: tiny-random-sana's, weight for weight
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**cfg["transformer"])
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    # the tiny-phantom lesson: the layout must not be readable from the starting noise; flow matching trains and samples
    # from sigma = 1 exactly (a shift maps 1 to 1), which this check keeps true for whatever schedule the config names
    if float(scheduler.sigmas[0]) != 1.0:
        raise ValueError(f"tiny_phantom_sana_configs()['scheduler'] = {cfg['scheduler']}: its first training sigma is "
                         f"{float(scheduler.sigmas[0])}; expected 1.0 (pure noise), so the prompt decides the layout")
    return Sana(vae, random_sana.text_encoder, random_sana.tokenizer, transformer, scheduler, spec)


def train_transformer(sana, images: torch.Tensor, steps: int, seed: int, batch: int = 16):
    """Flow matching through the base's interface (``sana.objective.draw``, ``sana.denoise``, per-sample weights), as
    :meth:`lightning_modules.base.DiffusionModule.diffusion_loss`, with the one prompt and 10 % empty prompts."""
    from models.families import TimestepSampling
    from models.sana import SanaCondition

    x3 = images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        latents = torch.cat([sana.encode_images(x3[i : i + 64]) for i in range(0, len(x3), 64)])
        both = sana.conditioning()([BASE_PROMPT, ""])
        # the 300-token window's padding is masked out of the cross-attention, so the embeddings are cut after the
        # longest prompt: the same attention, without computing it over 290 masked keys (a faster CPU build)
        n = int(both.mask.sum(dim=1).max())
        both = SanaCondition(both.embeds[:, :n], both.mask[:, :n])
    transformer = sana.transformer.requires_grad_(True).train()
    sampling = TimestepSampling()  # diffusers' Sana script's default: uniform timesteps, unweighted loss
    opt = torch.optim.AdamW(transformer.parameters(), lr=5e-4, weight_decay=1e-2)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1))))
    )
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        chosen = latents[torch.randint(0, len(latents), (batch,), generator=g)]
        drop = (torch.rand(batch, generator=g) < PROMPT_DROPOUT).long()
        condition = SanaCondition(both.embeds[drop], both.mask[drop])
        draw = sana.objective.draw(chosen, g, sampling)
        pred = sana.denoise(draw.noisy, draw.timesteps, condition)
        per_sample = F.mse_loss(pred, draw.target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * sana.objective.weights(draw, None, sampling)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}: loss {loss.item():.4f}")
    transformer.requires_grad_(False).eval()
    return sana


def weights_digest(folder: Path) -> str:
    """SHA-256 over every safetensors file of the folder (sorted by path)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build(out: Path = OUT, seed: int = 0, quick: bool = False) -> Path:
    """Build every part and write the preset folder; returns ``out``."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # weights that do not depend on the core count (and 1 thread is the faster on a busy machine)
    torch.set_flush_denormal(True)  # tiny optimizer moments otherwise go denormal and slow CPU training
    try:
        sizes = QUICK if quick else FULL
        log(f"rendering {sizes['n_per_finding']} phantoms per finding ({', '.join(FINDINGS)})")
        images, _ = phantom_images(sizes["n_per_finding"], seed, RESOLUTION)
        vae = train_vae(images, sizes["vae_steps"], seed + 1, sizes["batch_size"])
        rmse = held_out_rmse(vae, 1 if quick else 16)
        log(f"vae held-out RMSE {rmse:.2f} gray levels")
        sana = train_transformer(sana_base(vae, seed + 3), images, sizes["transformer_steps"], seed + 3, sizes["batch_size"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    sana.pipeline("euler").save_pretrained(out, safe_serialization=True)
    cfg = tiny_phantom_sana_configs()
    settings = {"seed": seed, "quick": quick, **sizes, "findings": FINDINGS, "base_prompt": BASE_PROMPT,
                "prompt_dropout": PROMPT_DROPOUT, "resolution": RESOLUTION, "objective": "rectified flow (target noise - latents)",
                "weighting_scheme": "none", "scheduler": cfg["scheduler"], "text_encoder": "tiny-random-sana's Gemma-2, seed 0",
                "vae_scaling_factor": round(float(sana.vae.config.scaling_factor), 5),
                "vae_held_out_rmse_gray_levels": round(rmse, 2),
                "transformer_parameters": sum(p.numel() for p in sana.transformer.parameters())}
    (out / "BUILD.json").write_text(json.dumps(settings, indent=1) + "\n")
    log(f"wrote {out} (weights sha256 {weights_digest(out)[:16]})")
    return out


def seed_value(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from 0 to {2**32 - 1}")
    return seed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synthetic.build_tiny_phantom_sana", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=seed_value, default=0, help="a non-negative integer (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (tests)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: a file; expected a folder to write the SanaPipeline into")
    build(args.out, args.seed, args.quick)


if __name__ == "__main__":
    main()
