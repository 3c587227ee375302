"""Training throughput: our training step against the per-step work of diffusers' example scripts.

    python benchmarks/train_throughput.py --size tiny            # CPU, the fixed benchmark model
    python benchmarks/train_throughput.py --size sd14 --device cuda   # SD v1.4 sizes, random weights, 512 px

For each strategy two loops train the same model on the same images with the same batch size, each
in its own subprocess (so peak memory is its own):

* **reference**: what diffusers' scripts do at every step. ``train_dreambooth.py`` (U-Net): open and
  decode the JPEG, Resize, CenterCrop, ToTensor, Normalize and tokenize in the dataset; encode the
  batch with the VAE and the text encoder; U-Net forward and backward; clip gradients; AdamW (fp32
  master weights, frozen parts in the run's dtype, autocast under mixed precision). U-Net + text
  encoder: the same with ``--train_text_encoder`` (CLIP forward with gradients, fp32, in AdamW too).
  LoRA: ``train_dreambooth_lora.py`` (rank-4 adapters on the attention projections, the U-Net's base
  weights in the run's dtype, the adapters fp32).
  ``textual_inversion.py``: the same image work, CLIP with gradients into its whole token-embedding
  matrix, AdamW over that matrix, then the original rows restored. Projection: both text encoders
  on the captions at every step, then the MLP.
* **ours**: ``Trainer.fit`` of our LightningModule and datamodule, as ``train.py`` runs them, with the
  VAE latents (and, for the U-Net, CLIP's outputs) cached, the cache built before timing starts.

Printed: samples/s over ``--steps`` steps after ``--warmup`` steps, peak memory (CUDA: the peak
allocated during the timed steps; CPU: the worker's maximum resident set size, whole process) and
the ratio ours/reference, all measured in this one run. The fixed CPU model is ``tiny-random``:
U-Net block_out_channels (32, 64), 2 layers per block, cross-attention 32; VAE (32, 64); 64 px;
batch 4. ``--size sd14`` uses SD v1.4's architecture (``sd14-random``) at 512 px, batch 8, bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


STRATEGIES = ("unet", "unet_text_encoder", "lora", "textual_inversion", "projection")
LORA_RANK = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SIZES = {
    "tiny": dict(pretrained="tiny-random", resolution=64, batch=4, domain="tiny-bert", caption_batch=64),
    "sd14": dict(pretrained="sd14-random", resolution=512, batch=8, domain="tiny-bert", caption_batch=64),
}
FINDINGS = ["No Finding", "Pleural Effusion"]
TI_TOKEN, TI_INIT = "<lung-xray>", "lung"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "32-true"


class Clock:
    """Wall time of steps [warmup, warmup + steps) and the CUDA peak memory during them."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = self.t1 = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tick(self, step: int) -> None:
        """Call before step ``step`` (0-based) and once more after the last step."""
        if step == self.warmup:
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.t0 = time.perf_counter()
        if step == self.warmup + self.steps:
            self.sync()
            self.t1 = time.perf_counter()

    def result(self, batch: int) -> dict:
        out = {"samples_per_s": batch * self.steps / (self.t1 - self.t0), "seconds": self.t1 - self.t0}
        if self.device.type == "cuda":
            out["peak_mem_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["memory_kind"] = "CUDA peak allocated"
        else:
            out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["memory_kind"] = "max RSS (process)"
        return out


# ============================================================================================ data
def write_images(root: Path, resolution: int) -> Path:
    from synthetic.phantoms import write_phantom_mimic

    return write_phantom_mimic(root / "phantoms", n_per_finding=12, size=max(resolution, 64), seed=0, findings=FINDINGS)


def datamodule(args, data_root: Path, workers: int):
    from datamodules.mimic_cxr import MIMICCXRDataModule

    return MIMICCXRDataModule(root=str(data_root), findings=FINDINGS, resolution=args.resolution, batch_size=args.batch,
                              num_workers=workers, max_val_images=0, cache_dir=str(Path(args.work) / "cache"), seed=0)


def image_records(args, data_root: Path):
    """Paths and prompts of the training images our datamodule selects (the reference reads the same JPEGs)."""
    from datamodules.mimic_cxr import image_path

    dm = datamodule(args, data_root, 0)
    train, _ = dm.build_records()
    paths = [str(image_path(data_root, r.subject_id, r.study_id, r.dicom_id)) for r in train.itertuples()]
    return paths, list(train["prompt"]), list(train["finding"])


class DreamBoothStyleDataset(torch.utils.data.Dataset):
    """As diffusers' ``DreamBoothDataset.__getitem__``: decode, Resize, CenterCrop, ToTensor, Normalize, tokenize."""

    def __init__(self, paths, prompts, tokenizer, size: int, prompt_fn=None):
        from torchvision import transforms

        self.paths, self.prompts, self.tokenizer = paths, prompts, tokenizer
        self.prompt_fn = prompt_fn
        self.transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                             transforms.Normalize([0.5], [0.5])])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            pixels = self.transform(img.convert("RGB"))
        prompt = self.prompt_fn(i) if self.prompt_fn else self.prompts[i]
        ids = self.tokenizer(prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def _cycle(loader):
    while True:
        yield from loader


# ============================================================================================ reference loops
def reference_unet(args, data_root: Path, device: torch.device, text_encoder: bool = False, lora: bool = False) -> dict:
    """``train_dreambooth.py`` (``text_encoder``: with ``--train_text_encoder``) or ``train_dreambooth_lora.py`` (``lora``)."""
    import torch.nn.functional as F

    from models.stable_diffusion import load_stable_diffusion

    sd = load_stable_diffusion(args.pretrained)
    mixed = device.type == "cuda"
    weight_dtype = torch.bfloat16 if mixed else torch.float32
    sd.vae.to(device, weight_dtype)
    sd.text_encoder.to(device, torch.float32 if text_encoder else weight_dtype).train().requires_grad_(text_encoder)
    unet = sd.unet.to(device).train().requires_grad_(not lora)
    if lora:
        from peft import LoraConfig

        unet.to(weight_dtype)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for p in unet.parameters():  # diffusers' cast_training_params: the adapters train in fp32
            if p.requires_grad:
                p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    paths, prompts, _ = image_records(args, data_root)
    loader = torch.utils.data.DataLoader(DreamBoothStyleDataset(paths, prompts, sd.tokenizer, args.resolution),
                                         batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True)
    params = [p for p in list(unet.parameters()) + list(sd.text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4 if lora else 5e-6)
    sched = sd.noise_scheduler
    clock = Clock(args.warmup, args.steps, device)
    data = _cycle(loader)
    for step in range(args.warmup + args.steps):
        clock.tick(step)
        batch = next(data)
        with torch.no_grad():
            latents = sd.vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.sample()
            latents = latents * sd.vae.config.scaling_factor
        with torch.set_grad_enabled(text_encoder):
            encoder_hidden_states = sd.text_encoder(batch["input_ids"].to(device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):
            pred = unet(noisy, t, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick(args.warmup + args.steps)
    return clock.result(args.batch)


def reference_textual_inversion(args, data_root: Path, device: torch.device) -> dict:
    import random

    import torch.nn.functional as F

    from models.stable_diffusion import load_stable_diffusion
    from lightning_modules.textual_inversion import TEMPLATES

    sd = load_stable_diffusion(args.pretrained)
    mixed = device.type == "cuda"
    weight_dtype = torch.bfloat16 if mixed else torch.float32
    tokenizer, text_encoder = sd.tokenizer, sd.text_encoder
    tokenizer.add_tokens([TI_TOKEN])
    token_id = tokenizer.convert_tokens_to_ids(TI_TOKEN)
    init_id = tokenizer.encode(TI_INIT, add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeds = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeds[token_id] = embeds[init_id].clone()
    text_encoder.to(device).train()
    text_encoder.requires_grad_(False)  # all but the token embeddings, as the script freezes encoder, final norm, positions
    text_encoder.get_input_embeddings().requires_grad_(True)
    sd.vae.to(device, weight_dtype)
    sd.unet.to(device, weight_dtype).train()
    if args.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
    orig = text_encoder.get_input_embeddings().weight.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[token_id] = False
    paths, _, findings = image_records(args, data_root)
    phrases = {"No Finding": "", "Pleural Effusion": " with a visible pleural effusion"}
    templates = TEMPLATES["object"]
    rng = random.Random(0)
    ds = DreamBoothStyleDataset(paths, None, tokenizer, args.resolution,
                                prompt_fn=lambda i: rng.choice(templates).format(TI_TOKEN) + phrases[findings[i]])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True)
    opt = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-4)
    sched = sd.noise_scheduler
    clock = Clock(args.warmup, args.steps, device)
    data = _cycle(loader)
    for step in range(args.warmup + args.steps):
        clock.tick(step)
        batch = next(data)
        with torch.no_grad():
            latents = sd.vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.sample().detach()
            latents = latents * sd.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = sched.add_noise(latents, noise, t)
        encoder_hidden_states = text_encoder(batch["input_ids"].to(device))[0].to(weight_dtype)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):
            pred = sd.unet(noisy, t, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = orig[keep]
    clock.tick(args.warmup + args.steps)
    return clock.result(args.batch)


def _captions(args) -> list[str]:
    from synthetic.laion import SyntheticLAIONDataModule

    dm = SyntheticLAIONDataModule(root=str(Path(args.work) / "laion"), n_captions=2048, cache_dir=str(Path(args.work) / "hf"))
    dm.setup()
    ds = dm.caption_dataset()
    return [ds[i]["caption"] for i in range(dm.num_captions)]


def reference_projection(args, device: torch.device) -> dict:
    """Both encoders on every step's captions, then the MLP (document level)."""
    from lightning_modules.projection import TextualProjection

    module = TextualProjection(model={"pretrained": args.pretrained}, domain_encoder={"pretrained": args.domain}, level="document",
                               cache_embeddings=False).to(device)
    opt = torch.optim.AdamW(module.projection.parameters(), lr=1e-4)
    captions = _captions(args)
    g = torch.Generator().manual_seed(0)
    clock = Clock(args.warmup, args.steps, device)
    for step in range(args.warmup + args.steps):
        clock.tick(step)
        index = torch.randperm(len(captions), generator=g)[: args.caption_batch]
        loss = module.projection_loss({"caption": [captions[i] for i in index.tolist()], "index": index})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick(args.warmup + args.steps)
    return clock.result(args.caption_batch)


# ============================================================================================ ours

def ours(args, strategy: str, data_root: Path, device: torch.device) -> dict:
    from lightning.pytorch import Callback, Trainer

    class Timing(Callback):
        def __init__(self, clock):
            self.clock = clock

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.clock.tick(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.clock.warmup + self.clock.steps:
                self.clock.tick(trainer.global_step)

    speed = dict(gradient_checkpointing=args.gradient_checkpointing, channels_last=args.channels_last,
                 compile_unet=args.compile_unet)
    if strategy in ("unet", "unet_text_encoder", "lora"):
        from lightning_modules.lora import LoRAFineTuning
        from lightning_modules.unet import UNetFineTuning
        from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning

        extra = {"lora": dict(rank=LORA_RANK, target_modules=LORA_TARGETS)}.get(strategy, {})
        cls = {"unet": UNetFineTuning, "unet_text_encoder": UNetTextEncoderFineTuning, "lora": LoRAFineTuning}[strategy]
        module = cls(model={"pretrained": args.pretrained}, **speed, **extra)
        dm = datamodule(args, data_root, args.workers)
        batch = args.batch
    elif strategy == "textual_inversion":
        from lightning_modules.textual_inversion import TextualInversion

        module = TextualInversion(model={"pretrained": args.pretrained}, placeholder_tokens=[{"token": TI_TOKEN, "initializer": TI_INIT}],
                                  finding_phrases={"No Finding": "", "Pleural Effusion": "with a visible pleural effusion"}, **speed)
        dm = datamodule(args, data_root, args.workers)
        batch = args.batch
    else:
        from synthetic.laion import SyntheticLAIONDataModule
        from lightning_modules.projection import TextualProjection

        module = TextualProjection(model={"pretrained": args.pretrained}, domain_encoder={"pretrained": args.domain}, level="document",
                                   cache_embeddings=True, cache_dir=str(Path(args.work) / "projection_cache"))
        dm = SyntheticLAIONDataModule(root=str(Path(args.work) / "laion"), n_captions=2048, cache_dir=str(Path(args.work) / "hf"),
                                      batch_size=args.caption_batch)
        batch = args.caption_batch
    clock = Clock(args.warmup, args.steps, device)
    trainer = Trainer(accelerator=device.type, devices=1, precision=_precision(device), max_steps=args.warmup + args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Timing(clock)],
                      gradient_clip_val=1.0 if strategy in ("unet", "unet_text_encoder", "lora") else None)
    trainer.fit(module, dm)
    return clock.result(batch)


# ============================================================================================ driver
def worker(args) -> dict:
    torch.manual_seed(0)
    device = _device(args.device)
    variant, strategy = args.worker.split(":")
    data_root = Path(args.work) / "phantoms"
    if variant == "reference":
        if strategy in ("unet", "unet_text_encoder", "lora"):
            return reference_unet(args, data_root, device, text_encoder=strategy == "unet_text_encoder", lora=strategy == "lora")
        if strategy == "textual_inversion":
            return reference_textual_inversion(args, data_root, device)
        return reference_projection(args, device)
    return ours(args, strategy, data_root, device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 40 tiny, 20 sd14)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers for both loops (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="both loops: recompute U-Net activations (memory for speed)")
    p.add_argument("--channels_last", action="store_true", help="ours: U-Net in channels-last memory format")
    p.add_argument("--compile_unet", action="store_true", help="ours: torch.compile the U-Net")
    p.add_argument("--work", default=None, help="folder for data and caches (default: a temporary folder)")
    p.add_argument("--in_process", action="store_true",
                   help="run every loop in this process (a quick smoke test: memory figures are then not per loop)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    args.pretrained, args.resolution, args.batch = size["pretrained"], size["resolution"], size["batch"]
    args.domain, args.caption_batch = size["domain"], size["caption_batch"]
    device = _device(args.device)
    args.steps = args.steps or (40 if args.size == "tiny" else 20)
    args.warmup = 5 if args.warmup is None else args.warmup
    args.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if args.worker:
        result = worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_images(work, args.resolution)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        print(f"{args.size}: {args.pretrained}, {args.resolution} px, batch {args.batch} (captions: {args.caption_batch}), "
              f"{_precision(device)}, {name}; {args.warmup} warm-up + {args.steps} timed steps"
              + ("; gradient checkpointing" if args.gradient_checkpointing else ""), flush=True)
        rows = []
        for strategy in args.strategies:
            results = {}
            for variant in ("reference", "ours"):
                cmd = [sys.executable, __file__, "--worker", f"{variant}:{strategy}", "--size", args.size, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--device", str(device), "--workers", str(args.workers), "--work", str(work)]
                cmd += [f"--{flag}" for flag in ("gradient_checkpointing", "channels_last", "compile_unet") if getattr(args, flag)]
                if args.in_process:
                    results[variant] = worker(argparse.Namespace(**{**vars(args), "worker": f"{variant}:{strategy}", "work": str(work)}))
                    continue
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
                line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{variant}:{strategy} failed (exit {proc.returncode})")
                results[variant] = json.loads(line[len("RESULT "):])
            ref, our = results["reference"], results["ours"]
            rows.append((strategy, ref, our))
            print(f"{strategy:<18} reference {ref['samples_per_s']:8.2f} samples/s {ref['peak_mem_mib']:9.0f} MiB | "
                  f"ours {our['samples_per_s']:8.2f} samples/s {our['peak_mem_mib']:9.0f} MiB | "
                  f"speed {our['samples_per_s'] / ref['samples_per_s']:5.2f}x, memory {our['peak_mem_mib'] / ref['peak_mem_mib']:5.2f}x"
                  f" ({our['memory_kind']})", flush=True)
            if strategy == "projection":
                print(f"{'':<18} 10k document-level steps at our rate: {10_000 * args.caption_batch / our['samples_per_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
