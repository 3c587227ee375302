"""What the text-condition cache saves: a training step with the text encoder run every step, with the memory cache and
with the disk cache (``text_cache: disk``), the filling rate, and the GPU memory that moving the encoders off frees.

    python benchmarks/text_cache.py                                   # tiny-random-sana on the CPU
    python benchmarks/text_cache.py --preset tiny-random-sd3 --device cuda --steps 20

All rows are measured in this one run, on one base (``--preset``, any preset or folder of a DiT family), one batch size
and one set of prompts (``--prompts`` distinct ones, each batch drawn from them in a fixed order):

* **s/step**: the median of one training step of the whole transformer (the conditioning of the batch's prompts, the family's
  objective on random latents of the native size, forward, backward, AdamW), after ``--warmup`` steps, for three
  conditionings: ``encoder every step`` (no cache: what diffusers' scripts do without ``--cache_latents``-like text
  caching), ``memory cache`` (the default, warm) and ``disk cache, warm, no memory in front`` (``text_cache_size: 0``:
  every prompt read from its file at every step, the worst case of the disk cache; with the memory cache in front, as
  configured by default, a step that finds its prompts in memory costs what the memory row costs);
* **fill**: prompts/s while an empty disk entry is filled (each prompt encoded on its own and written);
* **GPU memory the offload frees**: the text encoders' parameter bytes of the real models in bf16, from Gemma-2 2B's
  and T5-XXL's (and SD 3.5's two CLIPs') configs built on the meta device (``accelerate.init_empty_weights``):
  estimated from parameter counts, nothing is loaded; and what one prompt's condition takes on disk (shape x dtype).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def real_encoder_bytes() -> list[tuple[str, int, int]]:
    """``(name, parameters, bf16 bytes)`` of the real text encoders, built on the meta device from their configs."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model, T5Config, T5EncoderModel

    configs = {
        # google/gemma-2-2b-it (Sana's text_encoder: Gemma2Model, no LM head)
        "Gemma-2 2B (Sana)": (Gemma2Model, Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                                        head_dim=256)),
        # google/t5-v1_1-xxl encoder (PixArt-Σ's text_encoder, SD 3.5's text_encoder_3)
        "T5-XXL encoder (PixArt-Σ, SD 3.5)": (T5EncoderModel, T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                                        num_layers=24, num_heads=64,
                                                                        feed_forward_proj="gated-gelu")),
        # SD 3.5's text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP bigG)
        "CLIP-L (SD 3.5)": (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                        num_hidden_layers=12, num_attention_heads=12,
                                                                        projection_dim=768)),
        "CLIP-G (SD 3.5)": (CLIPTextModelWithProjection, CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                                        num_hidden_layers=32, num_attention_heads=20,
                                                                        projection_dim=1280, hidden_act="gelu")),
    }
    rows = []
    for name, (cls, config) in configs.items():
        with init_empty_weights():
            model = cls(config)
        model.tie_weights()  # on the meta device transformers leaves T5's embed_tokens untied from `shared` (0.13 B twice)
        n = sum(p.numel() for p in model.parameters())
        rows.append((name, n, 2 * n))
    return rows


def step_seconds(sd, conditionings: dict, batches: list[list[str]], steps: int, warmup: int, device) -> dict:
    """Median seconds of a training step of the whole transformer (one AdamW) per conditioning, the conditionings taking
    turns step by step (so a machine shared with other work slows them alike)."""
    import statistics

    import torch.nn.functional as F

    sd.transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in sd.transformer.parameters() if p.requires_grad], lr=1e-5)
    size = sd.native_size // sd.vae_scale_factor
    channels = int(sd.transformer.config.in_channels)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(batches[0]), channels, size, size, generator=g).to(device)
    times = {name: [] for name in conditionings}
    for i in range(warmup + steps):
        for name, conditioning in conditionings.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            draw = sd.objective.draw(latents, g)
            pred = sd.denoise(draw.noisy, draw.timesteps, conditioning(batches[i % len(batches)]))
            F.mse_loss(pred.float(), draw.target.float()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    from models.stable_diffusion import load_stable_diffusion

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-random-sana", help="a DiT family's preset or pipeline folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="frozen parts' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    sd = load_stable_diffusion({"pretrained": args.preset})
    if sd.family == "stable-diffusion":
        raise SystemExit("text_cache: disk is for the DiT families (Sana, SD 3.5, PixArt-Σ); give one of their presets")
    sd.to(device)
    sd.set_frozen_dtype(dtype)
    prompts = [f"a photo of a lung xray number {i} with a visible pleural effusion" for i in range(args.prompts)]
    batches = [[prompts[(b * args.batch + j) % len(prompts)] for j in range(args.batch)]
               for b in range(max(1, len(prompts) // args.batch))]
    encoders = [getattr(sd, n) for n in sd.text_parts if not n.startswith("tokenizer")]
    print(f"{args.preset} ({sd.family}) on {device}, frozen parts {str(dtype).removeprefix('torch.')}, batch {args.batch}, "
          f"{args.prompts} distinct prompts, {args.steps} timed steps after {args.warmup}")
    with tempfile.TemporaryDirectory() as root:
        filling = sd.conditioning(0)
        filling.use_disk(root)
        start = time.perf_counter()
        for prompt in prompts:
            filling([prompt])
        fill = len(prompts) / (time.perf_counter() - start)
        memory = sd.conditioning(len(prompts))
        for prompt in prompts:
            memory([prompt])
        disk = sd.conditioning(0)
        disk.use_disk(root)
        rows = step_seconds(sd, {"encoder every step": sd.conditioning(0), "memory cache (warm)": memory,
                                 "disk cache (warm, no memory in front)": disk}, batches, args.steps, args.warmup, device)
    first = rows["encoder every step"]
    print("\n| conditioning | s/step (median) | encoder every step / this |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.4f} | {first / seconds:.2f} |")
    print(f"\nfilling the disk cache: {fill:.1f} prompts/s ({args.preset}'s encoders, one prompt at a time, written)")
    here = sum(p.numel() * p.element_size() for m in encoders for p in m.parameters())
    print(f"this base's text encoders: {here / 2**20:.2f} MiB of parameters moved off {device} by the offload")
    print("\n| real text encoder | parameters | bf16 bytes the offload frees (estimated from parameter counts) |\n|---|---|---|")
    for name, n, size in real_encoder_bytes():
        print(f"| {name} | {n / 1e9:.2f} B | {size / 2**30:.2f} GiB |")
    print("\n| real base | one prompt's condition on disk (bf16 embeds + mask / pooled) |\n|---|---|")
    for name, tokens, width, extra in (("Sana (Gemma-2, 300 x 2304)", 300, 2304, 300 * 8),
                                       ("PixArt-Σ (T5-XXL, 300 x 4096)", 300, 4096, 300 * 8),
                                       ("SD 3.5 (77 CLIP + 256 T5 tokens x 4096, pooled 2048)", 333, 4096, 2048 * 2)):
        print(f"| {name} | {(tokens * width * 2 + extra) / 2**20:.2f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
