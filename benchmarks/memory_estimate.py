"""Peak memory of a U-Net training step at SD v1.4's size, by category, on any machine (no GPU, no memory needed).

    python benchmarks/memory_estimate.py                        # SD 1.4's U-Net, 512 px (64 x 64 latents), batch 8
    python benchmarks/memory_estimate.py --size tiny --batch 4  # the tiny test model

PyTorch's ``FakeTensorMode`` runs two training steps with shapes only, and ``MemTracker`` adds up what is alive at
the peak: parameters, gradients, optimizer state, activations (with autocast's bf16 weight copies) and temporaries.
As on a GPU run of ours: fp32 weights, fused AdamW, bf16 autocast, flash attention (forced: CPU fake tensors, since
fake CUDA tensors cannot run a backward without a GPU). One row per way of running the step:

* gradients freed right after the optimizer step (what our modules do);
* gradients freed only just before the next backward (Lightning's default, and ours before): the next forward's
  activations sit on a full set of gradients;
* the first, with gradient checkpointing.

The frozen VAE and text encoder (bf16, resident on the GPU in ours and in diffusers' loop) are added from their
parameter counts. Not modelled: the CUDA caching allocator's rounding and fragmentation, cuDNN workspaces, the
reference loop's VAE/CLIP activations, and 8-bit AdamW (bitsandbytes has no fake kernels); so this is an estimate of
the allocated peak, to read beside the GPU figures of ``benchmarks/gpu_suite.sh``, not instead of them.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

GIB = 2**30


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
VARIANTS = {
    "after_step": "gradients freed after the optimizer step (ours)",
    "before_backward": "gradients freed before the next backward (Lightning's default; ours before)",
    "checkpointing": "after the step, with gradient checkpointing",
}


def configs(size: str) -> dict:
    from synthetic.presets import sd14_configs, tiny_configs

    return sd14_configs() if size == "sd14" else tiny_configs()


def frozen_bytes(cfg: dict) -> int:
    """Bytes of the VAE and CLIP text encoder in bf16 (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], vocab_size=cfg.get("vocab_size", 1000), bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1))
    return 2 * sum(p.numel() for m in (vae, text) for p in m.parameters())


def step_peak(cfg: dict, batch: int, latent_size: int, variant: str) -> dict:
    """The peak of two training steps of the U-Net under ``variant``, in bytes by category."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FakeTensorMode():
        unet = UNet2DConditionModel(**cfg["unet"]).train()
        if variant == "checkpointing":
            unet.enable_gradient_checkpointing()
        width = cfg["unet"]["cross_attention_dim"]
        latents = torch.randn(batch, 4, latent_size, latent_size)
        cond = torch.randn(batch, 77, width)
        timesteps = torch.randint(0, 1000, (batch,))
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
        tracker = MemTracker()
        tracker.track_external(unet, opt)
        with tracker:
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    pred = unet(latents, timesteps, cond).sample
                loss = torch.nn.functional.mse_loss(pred.float(), latents)
                if variant == "before_backward":
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if variant != "before_backward":
                    opt.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()  # its per-module records hold one call per module
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    parts = {getattr(k, "value", str(k)): v for k, v in snap.items()}
    return {"parameters": parts.get("Parameter", 0) + parts.get("Buffer", 0), "gradients": parts.get("Gradient", 0),
            "optimizer state": parts.get("Optstate", 0), "activations": parts.get("Activation", 0),
            "temporaries": parts.get("Temp", 0) + parts.get("Other", 0), "total": parts.get("Total", 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("sd14", "tiny"), default="sd14")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 8 sd14, 4 tiny)")
    p.add_argument("--resolution", type=int, default=None, help="pixels, a multiple of 64 (default: 512 sd14, 64 tiny)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    cfg = configs(args.size)
    resolution = args.resolution if args.resolution is not None else (512 if args.size == "sd14" else 64)
    args.batch = args.batch if args.batch is not None else (8 if args.size == "sd14" else 4)
    if args.json:
        from pathlib import Path

        from core.errors import UserError, writable_folder

        if Path(args.json).is_dir():
            raise UserError(f"--json {args.json} is a folder; expected a file name")
        writable_folder(Path(args.json).parent, "--json: the folder")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: expected 1 or more images per step")
    if resolution < 64 or resolution % 64:
        p.error(f"--resolution {resolution}: expected a multiple of 64 (the VAE and U-Net halve it several times)")
    down = 8 if args.size == "sd14" else 2  # the VAE's downsampling: 2 ** (len(block_out_channels) - 1)
    frozen = frozen_bytes(cfg)
    print(f"{args.size} U-Net, {resolution} px ({resolution // down}² latents), batch {args.batch}, fp32 weights, fused AdamW, "
          f"bf16 autocast, flash attention; frozen VAE + text encoder in bf16: {size(frozen)}", flush=True)
    rows = {}
    for variant in args.variants:
        start = time.perf_counter()
        peak = step_peak(cfg, args.batch, resolution // down, variant)
        peak["with frozen parts"] = peak["total"] + frozen
        rows[variant] = peak
        print(f"{VARIANTS[variant]}: " + ", ".join(f"{k} {size(v)}" for k, v in peak.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch": args.batch, "resolution": resolution, "frozen_bytes": frozen, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    from core.errors import run_main

    raise SystemExit(run_main("memory_estimate.py", main))
