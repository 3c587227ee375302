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

Beside samples/s each row gives the FLOPs of one training step per sample (counted once per strategy with
``torch.utils.flop_counter.FlopCounterMode`` on our step: what the step must compute, without the recomputation of
gradient checkpointing), the achieved TFLOP/s and, on a GPU whose bf16 dense peak is known (or ``--peak_tflops``),
the model FLOP utilisation (MFU). The reference rows use the same FLOPs (the useful work), so its MFU is comparable.

* ``--ladder``: the U-Net settings ladder (ours; bf16 baseline with the reference, + channels_last, + torch.compile,
  batch 16 and 32, gradient checkpointing, adamw8bit), one row each.
* ``--suite``: what ``benchmarks/gpu_suite.sh`` runs, most important first: the U-Net against its reference, the
  memory profile (with ``--memory_profile``), the ladder (torch.compile last), the other strategies, DDP scaling
  when more than one GPU is visible. ``--json`` / ``--markdown`` write the rows with machine, versions and date,
  rewritten after every row.
* ``--memory_profile DIR``: one extra run of each loop (U-Net, two steps) under
  ``torch.distributed._tools.mem_tracker.MemTracker``: the peak split into parameters, gradients, optimizer
  state, activations and temporaries (any device), and on CUDA a ``torch.cuda.memory`` snapshot per loop
  (``DIR/<loop>-unet.pickle``, open at https://pytorch.org/memory_viz).
* ``--pretrained FOLDER``: load the model from a diffusers folder instead of the size's preset (the real loading
  path, and much faster than drawing SD-size random weights on a CPU in every worker); ``--save_model FOLDER`` writes the
  size's preset there first. A preset is built on the run's device (``with torch.device(...)``), so on a GPU the
  family sizes below draw their billions of random weights in seconds, in every worker, without a folder.

The DiT families (``models/families.py``) have sizes of their own, each with the two strategies they run, the
full denoiser (``unet``: ``UNetFineTuning`` trains the transformer) and LoRA:

* ``--size sana-tiny`` (``tiny-random-sana``, 64 px, batch 4, CPU) and ``--size sana-0.6b`` (``sana-0.6b-random``: Sana
  0.6B's transformer, DC-AE f32c32 and Gemma-2 2B with random weights, 512 px, batch 8, bf16; GPU only). The reference is
  ``train_dreambooth_lora_sana.py``'s step: its dataset transforms every image once when it is built (bilinear Resize,
  RandomCrop, ToTensor, Normalize), then per step ``SanaPipeline.encode_prompt`` of the batch's captions (Gemma-2 in
  bf16, as the script casts it; the negative prompt too, as the script calls it), the DC-AE encode in fp32 times its
  scaling factor, noise and timesteps from ``training_utils.compute_density_for_timestep_sampling`` (the script's
  default ``--weighting_scheme none``), ``noisy = (1 - σ) x + σ ε``, the transformer (bf16 autocast on a GPU, as
  accelerate wraps the forward), target ``ε - x`` weighted by ``compute_loss_weighting_for_sd3``, clipping at 1.0 and
  AdamW (lr 1e-4, weight decay 1e-4). LoRA: the script's ``to_k, to_q, to_v`` at rank 4, alpha 4, the transformer's
  base weights in the run's dtype. Full: diffusers has no full fine-tuning script for Sana, so that reference is the
  same step with the whole transformer training in fp32 under autocast, as ``train_dreambooth_sd3.py`` trains its own.
* ``--size sd3-tiny`` (``tiny-random-sd3``) and ``--size sd35-medium`` (``sd35-medium-random``: SD 3.5 medium's
  transformer, 16-channel VAE, CLIP-L, CLIP-G and T5-XXL, 512 px, batch 8, bf16; GPU only). The reference is
  ``train_dreambooth_sd3.py`` (full) / ``train_dreambooth_lora_sd3.py`` (LoRA): the same dataset, per step the scripts'
  ``encode_prompt`` (both CLIPs' penultimate states and pooled outputs at 77 tokens, T5's last state, padded and
  concatenated), ``vae.encode(x).latent_dist.sample()`` in fp32, ``(z - shift) * scale``, ``--weighting_scheme
  logit_normal`` (their default; ours is given the same), ``--precondition_outputs 1`` (``pred * (-σ) + noisy`` against
  the latents), clipping and AdamW as above. LoRA: the script's targets (``attn.to_q/k/v``, ``attn.to_out.0`` and the
  context stream's ``attn.add_q/k/v_proj``, ``attn.to_add_out``) at rank 4. Where we differ on purpose: both loops use
  the base's T5 window (256 tokens, ``models/sd3.py``), not the scripts' ``--max_sequence_length 77``, so the two
  loops do the same work.

The family sizes refuse the SD-only strategies and the U-Net ladder in one line; the large sizes refuse a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


STRATEGIES = ("unet", "unet_text_encoder", "lora", "textual_inversion", "projection", "projection_token")
UNET_LIKE = ("unet", "unet_text_encoder", "lora")
STRATEGY_NAMES = {"unet": "U-Net", "unet_text_encoder": "U-Net + text encoder", "lora": "LoRA, rank 4",
                  "textual_inversion": "textual inversion", "projection": "projection (document)",
                  "projection_token": "projection (token)"}
# bf16 dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s; matched in this order against
# torch.cuda.get_device_name. Anything else: pass --peak_tflops.
BF16_PEAK_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0))
LORA_RANK = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# the LoRA targets of each family's diffusers script (train_dreambooth_lora.py, _sana.py, _sd3.py defaults)
FAMILY_LORA_TARGETS = {"stable-diffusion": LORA_TARGETS, "sana": ["to_k", "to_q", "to_v"],
                       "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                               "attn.to_out.0", "attn.to_q", "attn.to_v"]}
# the scripts' default --weighting_scheme: none in the Sana script, logit_normal in the SD3 ones (ours is given the same)
FAMILY_WEIGHTING = {"sana": "none", "sd3": "logit_normal"}
FAMILY_STRATEGIES = ("unet", "lora")  # what the DiT families run: the full denoiser and LoRA
_COMMON = dict(domain="tiny-bert", caption_batch=64)
# gpu: what the size trains, for the one-line refusal on a CPU; tiny: the CPU size of its family
SIZES = {
    "tiny": dict(pretrained="tiny-random", resolution=64, batch=4, steps=40, **_COMMON),
    "sd14": dict(pretrained="sd14-random", resolution=512, batch=8, steps=20, gpu="SD v1.4's full U-Net at 512 px", tiny="tiny",
                 **_COMMON),
    "sana-tiny": dict(pretrained="tiny-random-sana", resolution=64, batch=4, steps=40, family="sana", **_COMMON),
    "sd3-tiny": dict(pretrained="tiny-random-sd3", resolution=64, batch=4, steps=40, family="sd3", **_COMMON),
    "sana-0.6b": dict(pretrained="sana-0.6b-random", resolution=512, batch=8, steps=20, family="sana", tiny="sana-tiny",
                      gpu="Sana 0.6B (a 0.59 B transformer, Gemma-2 2B, DC-AE) at 512 px", **_COMMON),
    "sd35-medium": dict(pretrained="sd35-medium-random", resolution=512, batch=8, steps=20, family="sd3", tiny="sd3-tiny",
                        gpu="SD 3.5 medium (a 2.5 B transformer, T5-XXL, CLIP-L, CLIP-G) at 512 px", **_COMMON),
}
FINDINGS = ["No Finding", "Pleural Effusion"]
TI_TOKEN, TI_INIT = "<lung-xray>", "lung"


def _device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the studies' resolver: a bad name or a missing GPU is one error)."""
    from evaluation.sources import study_device

    return study_device(name)


def _precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "32-true"


class Clock:
    """Wall time of steps [warmup, warmup + steps) and the peak memory during them.

    With ``profile_dir`` the same steps also run under ``MemTracker`` (peak by category, any device) and, on CUDA,
    ``torch.cuda.memory``'s allocation history, dumped to ``profile_dir/<name>.pickle``; the times are then not
    meaningful (the tracker intercepts every operation)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profile_dir: str | None = None, name: str = "run"):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.profile_dir, self.name = profile_dir, name
        self.t0 = self.t1 = None
        self.peak_mib = None
        self.tracker = None
        self.breakdown = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tick(self, step: int, tracked=lambda: ()) -> None:
        """Call before step ``step`` (0-based) and once more after the last step. ``tracked``: a function giving the
        modules and optimizers that exist before the profiled steps (the memory tracker must know them)."""
        if step == self.warmup:
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.profile_dir:
                self._start_profile(tracked())
            self.t0 = time.perf_counter()
        if step == self.warmup + self.steps:
            self.sync()
            self.t1 = time.perf_counter()
            if self.device.type == "cuda":
                self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if self.profile_dir:
                self._stop_profile()

    def _start_profile(self, objects) -> None:
        from torch.distributed._tools.mem_tracker import MemTracker

        class CategoryTracker(MemTracker):
            """MemTracker's categories without its per-module statistics, which refuse a module called twice in one
            step (the reference's image transforms run once per image), and without its optimizer-step hook: Lightning
            runs forward and backward *inside* ``optimizer.step(closure)``, which would file every activation as optimizer
            state. The optimizer states exist after the warm-up and are registered by ``track_external``; what the step
            itself allocates then counts as activation/temporary memory."""

            def _register_global_optimizer_hook(self):
                pass

            def _pre_fw_hook(self, module, inputs):
                pass

            def _post_fw_hook(self, module, inputs, outputs):
                pass

            def _pre_bw_hook(self, module, args):
                pass

            def _post_bw_hook(self, module, args):
                pass

        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.tracker = CategoryTracker()
        self.tracker.track_external(*objects)
        # the gradient hooks MemTracker installs in the forward hooks switched off above: a gradient counts as one
        from torch.distributed._tools.mem_tracker import _MemRefType

        def as_gradient(param) -> None:
            self.tracker._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)

        self.hooks = [param.register_post_accumulate_grad_hook(as_gradient)
                      for module in objects if isinstance(module, torch.nn.Module)
                      for param in module.parameters() if param.requires_grad]
        self.tracker.__enter__()

    def _stop_profile(self) -> None:
        self.tracker.__exit__(None, None, None)
        for hook in self.hooks:
            hook.remove()
        peak = self.tracker.get_tracker_snapshot("peak")
        snap = peak.get(self.device) or next(iter(peak.values()), {})
        parts = {getattr(k, "value", str(k)): v / 2**20 for k, v in snap.items()}
        self.breakdown = {"parameters": parts.get("Parameter", 0) + parts.get("Buffer", 0), "gradients": parts.get("Gradient", 0),
                          "optimizer state": parts.get("Optstate", 0),
                          "activations and temporaries": sum(parts.get(k, 0) for k in ("Activation", "Temp", "Other")),
                          "total": parts.get("Total", sum(parts.values()))}
        self.tracker = None
        if self.device.type == "cuda":
            Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(Path(self.profile_dir) / f"{self.name}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)

    def result(self, batch: int, world_size: int = 1) -> dict:
        if self.t1 is None:
            raise RuntimeError(f"{self.name}: the timed steps did not all run (warm-up {self.warmup} + {self.steps} steps)")
        out = {"samples_per_s": world_size * batch * self.steps / (self.t1 - self.t0), "seconds": self.t1 - self.t0,
               "batch": batch, "world_size": world_size, "peak_mem_mib": self.peak_mib,
               "memory_kind": "CUDA peak allocated" if self.device.type == "cuda" else "max RSS (process)"}
        if self.breakdown is not None:
            out["memory_breakdown_mib"] = self.breakdown
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
    clock = Clock(args.warmup, args.steps, device, args.memory_profile, "reference-" + args.worker.split(":")[1])
    data = _cycle(loader)
    for step in range(args.warmup + args.steps):
        clock.tick(step, lambda: (unet, sd.text_encoder, sd.vae, opt))
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


def building(args, device: torch.device):
    """Where a preset's weights are drawn: on the run's device (a GPU draws billions in seconds; a folder loads as it is)."""
    from contextlib import nullcontext

    from models.stable_diffusion import preset_names

    return torch.device(device) if args.pretrained in preset_names() else nullcontext()


class PreprocessedDataset(torch.utils.data.Dataset):
    """As the ``DreamBoothDataset`` of diffusers' Sana and SD3 scripts: every image decoded, exif-transposed, resized
    (bilinear), cropped at random (their default without ``--center_crop``), ToTensor and Normalize once, when the dataset
    is built; an item is its tensor and its own caption (the scripts' ``custom_instance_prompts``)."""

    def __init__(self, paths, prompts, size: int):
        from PIL import Image, ImageOps
        from torchvision import transforms

        resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR)
        crop, tensor = transforms.RandomCrop(size), transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.pixels, self.prompts = [], list(prompts)
        for path in paths:
            with Image.open(path) as img:
                self.pixels.append(tensor(crop(resize(ImageOps.exif_transpose(img).convert("RGB")))))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "prompts": self.prompts[i]}


def dit_text_encoder(sd, device: torch.device):
    """The scripts' per-step text encoding of a batch's captions (frozen encoders, no gradients): the Sana script's
    ``compute_text_embeddings`` (``SanaPipeline.encode_prompt`` with its defaults, the negative prompt included, no
    complex-human-instruction prefix), or the SD3 scripts' ``encode_prompt`` (T5 at the base's window: see the docstring)."""
    import torch.nn.functional as F

    if sd.family == "sana":
        from diffusers import SanaPipeline

        pipe = SanaPipeline(tokenizer=sd.tokenizer, text_encoder=sd.text_encoder, vae=None, transformer=None,
                            scheduler=sd.noise_scheduler)

        @torch.no_grad()
        def encode(prompts):
            embeds, mask, _, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=sd.text_window,
                                                    complex_human_instruction=None)
            return {"encoder_hidden_states": embeds.to(sd.transformer.dtype), "encoder_attention_mask": mask}
        return encode

    @torch.no_grad()
    def encode(prompts):
        embeds, pooled = [], []
        for tokenizer, encoder in ((sd.tokenizer, sd.text_encoder), (sd.tokenizer_2, sd.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            embeds.append(out.hidden_states[-2].to(dtype=encoder.dtype))
        ids = sd.tokenizer_3(prompts, padding="max_length", max_length=sd.text_window, truncation=True, add_special_tokens=True,
                             return_tensors="pt").input_ids
        t5 = sd.text_encoder_3(ids.to(device))[0].to(dtype=sd.text_encoder_3.dtype)
        clip = torch.cat(embeds, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}
    return encode


def dit_parts(args, device: torch.device, lora: bool):
    """The base with the scripts' dtypes and devices: VAE fp32; Sana's Gemma-2 bf16 (the script casts it so always), the
    SD3 encoders in the run's dtype; the transformer fp32 when it trains whole, in the run's dtype under LoRA adapters."""
    from models.stable_diffusion import load_stable_diffusion

    with building(args, device):
        sd = load_stable_diffusion(args.pretrained)
    weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd.vae.to(device, torch.float32)
    for name in sd.text_parts:
        if not name.startswith("tokenizer"):
            getattr(sd, name).to(device, torch.bfloat16 if sd.family == "sana" else weight_dtype)
    transformer = sd.transformer.to(device).train().requires_grad_(not lora)
    if lora:
        from peft import LoraConfig

        transformer.to(weight_dtype)
        # (the scripts upcast the adapters with cast_training_params under fp16 only; bf16 runs leave them as peft makes them)
        transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                           target_modules=FAMILY_LORA_TARGETS[sd.family]))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return sd, transformer, weight_dtype


def script_sigmas(scheduler, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The scripts' ``get_sigmas``: σ of each timestep, looked up one by one in the training schedule."""
    sigmas = scheduler.sigmas.to(device=timesteps.device, dtype=dtype)
    schedule = scheduler.timesteps.to(timesteps.device)
    sigma = sigmas[[(schedule == t).nonzero().item() for t in timesteps]].flatten()
    return sigma.view(-1, *([1] * (n_dim - 1)))


def reference_dit(args, data_root: Path, device: torch.device, lora: bool) -> dict:
    """``train_dreambooth_lora_sana.py`` (Sana) or ``train_dreambooth_sd3.py`` / ``train_dreambooth_lora_sd3.py`` (SD 3.5),
    one step as the script takes it (the module docstring says what each does)."""
    import copy

    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    sd, transformer, weight_dtype = dit_parts(args, device, lora)
    sana, mixed = sd.family == "sana", device.type == "cuda"
    paths, prompts, _ = image_records(args, data_root)
    loader = torch.utils.data.DataLoader(PreprocessedDataset(paths, prompts, args.resolution), batch_size=args.batch, shuffle=True,
                                         num_workers=args.workers, drop_last=True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    sched, scheme, encode = copy.deepcopy(sd.noise_scheduler), FAMILY_WEIGHTING[sd.family], dit_text_encoder(sd, device)
    vae, scale, shift = sd.vae, sd.vae.config.scaling_factor, getattr(sd.vae.config, "shift_factor", None) or 0.0
    clock = Clock(args.warmup, args.steps, device, args.memory_profile, "reference-" + args.worker.split(":")[1])
    data = _cycle(loader)
    for step in range(args.warmup + args.steps):
        clock.tick(step, lambda: (transformer, sd, opt))
        batch = next(data)
        condition = encode(batch["prompts"])
        pixel_values = batch["pixel_values"].to(device, dtype=vae.dtype)
        if sana:
            model_input = vae.encode(pixel_values).latent * scale
        else:
            model_input = (vae.encode(pixel_values).latent_dist.sample() - shift) * scale
        model_input = model_input.to(dtype=weight_dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=model_input.shape[0], logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()].to(device=device)
        sigmas = script_sigmas(sched, timesteps, model_input.ndim, model_input.dtype)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        with torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):  # accelerate's autocast of the forward
            pred = transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **condition)[0]
        if sana:
            target = noise - model_input
        else:  # --precondition_outputs 1
            pred, target = pred * (-sigmas) + noisy, model_input
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
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
    clock = Clock(args.warmup, args.steps, device, args.memory_profile, "reference-textual_inversion")
    data = _cycle(loader)
    for step in range(args.warmup + args.steps):
        clock.tick(step, lambda: (text_encoder, sd.unet, sd.vae, opt))
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


def reference_projection(args, device: torch.device, level: str) -> dict:
    """Both encoders on every step's captions, then the MLP (document or token level)."""
    from lightning_modules.projection import TextualProjection

    module = TextualProjection(model={"pretrained": args.pretrained}, domain_encoder={"pretrained": args.domain}, level=level,
                               cache_embeddings=False).to(device)
    opt = torch.optim.AdamW(module.projection.parameters(), lr=1e-4)
    captions = _captions(args)
    g = torch.Generator().manual_seed(0)
    clock = Clock(args.warmup, args.steps, device, args.memory_profile, "reference-projection")
    for step in range(args.warmup + args.steps):
        clock.tick(step, lambda: (module, opt))
        index = torch.randperm(len(captions), generator=g)[: args.caption_batch]
        loss = module.projection_loss({"caption": [captions[i] for i in index.tolist()], "index": index})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick(args.warmup + args.steps)
    return clock.result(args.caption_batch)


# ============================================================================================ ours

def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count of ``aten.convolution_backward``, with the weight gradient of a grouped convolution
    counted right. torch's formula counts that gradient as if the convolution were ungrouped: ``groups`` times too many
    (5,760x for the depthwise 3x3 convolutions of Sana 0.6B's blocks, which made a full step of it count ~6x its
    FLOPs). The weight gradient does the forward's multiply-adds, so a grouped one counts as the forward; the input
    gradient and ungrouped convolutions count as torch counts them."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flops = conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed) if output_mask[0] else 0
    if output_mask[1]:
        if groups > 1:
            flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
        elif transposed:
            flops += conv_flop_count(t(grad_out_shape), t(x_shape), t(w_shape), transposed=False)
        else:
            flops += conv_flop_count(t(x_shape), t(grad_out_shape), t(w_shape), transposed=False)
    return flops


def step_flops(module, strategy: str, batch, device: torch.device) -> float:
    """FLOPs of one training step (forward and backward) of ``module`` on ``batch``: matrix products, convolutions and
    attention as ``torch.utils.flop_counter`` counts them (2 per multiply-add). Gradient checkpointing is switched off
    for the count (its recomputation is not useful work); the gradients are dropped afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_modules.base import step_generator

    unet = module.sd.denoiser
    recompute = getattr(unet, "is_gradient_checkpointing", False)
    if recompute:
        unet.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: grouped_conv_backward_flop})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with autocast, counter:
            if strategy.startswith("projection"):
                loss = module.projection_loss(batch)
            else:
                loss = module.diffusion_loss(batch, step_generator(0, 0, 0))["loss"]
            loss.backward()
    finally:
        module.zero_grad(set_to_none=True)
        if recompute:
            unet.enable_gradient_checkpointing()
    return float(counter.get_total_flops())


def ours(args, strategy: str, data_root: Path, device: torch.device) -> dict:
    from lightning.pytorch import Callback, Trainer

    class Timing(Callback):
        def __init__(self, clock):
            self.clock = clock
            self.flops = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.clock.tick(trainer.global_step, lambda: (pl_module, *trainer.optimizers))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.clock.warmup + self.clock.steps:
                self.clock.tick(trainer.global_step)
                # still on the device (fit's teardown moves the model to the CPU): count one step's FLOPs here, after
                # the timed steps and their peak memory were read
                if args.count_flops and not args.compile_unet and not args.memory_profile:
                    n = len(batch["caption"] if strategy.startswith("projection") else batch["prompt"])
                    self.flops = step_flops(pl_module, strategy, batch, device) / n

    speed = dict(gradient_checkpointing=args.gradient_checkpointing, channels_last=args.channels_last,
                 compile_unet=args.compile_unet, optimizer=args.optimizer)
    if strategy in UNET_LIKE:
        from lightning_modules.lora import LoRAFineTuning
        from lightning_modules.unet import UNetFineTuning
        from lightning_modules.unet_text_encoder import UNetTextEncoderFineTuning

        family = SIZES[args.size].get("family", "stable-diffusion")
        extra = {"lora": dict(rank=LORA_RANK, target_modules=FAMILY_LORA_TARGETS[family])}.get(strategy, {})
        if family in FAMILY_WEIGHTING:  # the family script's default timestep density and weighting
            extra["timestep_sampling"] = {"weighting_scheme": FAMILY_WEIGHTING[family]}
        cls = {"unet": UNetFineTuning, "unet_text_encoder": UNetTextEncoderFineTuning, "lora": LoRAFineTuning}[strategy]
        with building(args, device):
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

        level = "token" if strategy == "projection_token" else "document"
        module = TextualProjection(model={"pretrained": args.pretrained}, domain_encoder={"pretrained": args.domain}, level=level,
                                   cache_embeddings=True, cache_dir=str(Path(args.work) / "projection_cache"),
                                   optimizer=args.optimizer)
        dm = SyntheticLAIONDataModule(root=str(Path(args.work) / "laion"), n_captions=2048, cache_dir=str(Path(args.work) / "hf"),
                                      batch_size=args.caption_batch)
        batch = args.caption_batch
    clock = Clock(args.warmup, args.steps, device, args.memory_profile, "ours-" + strategy)
    timing = Timing(clock)
    trainer = Trainer(accelerator=device.type, devices=args.devices, precision=_precision(device), max_steps=args.warmup + args.steps,
                      strategy="ddp" if args.devices > 1 else "auto",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timing],
                      gradient_clip_val=1.0 if strategy in UNET_LIKE else None)
    trainer.fit(module, dm)
    if trainer.global_rank != 0:
        return {}
    out = clock.result(batch, world_size=trainer.world_size)
    if timing.flops is not None:
        out["flops_per_sample"] = timing.flops
    return out


# ============================================================================================ driver
def worker(args) -> dict:
    torch.manual_seed(0)
    device = _device(args.device)
    variant, strategy = args.worker.split(":")
    data_root = Path(args.work) / "phantoms"
    if variant == "reference":
        if "family" in SIZES[args.size]:
            return reference_dit(args, data_root, device, lora=strategy == "lora")
        if strategy in UNET_LIKE:
            return reference_unet(args, data_root, device, text_encoder=strategy == "unet_text_encoder", lora=strategy == "lora")
        if strategy == "textual_inversion":
            return reference_textual_inversion(args, data_root, device)
        return reference_projection(args, device, "token" if strategy == "projection_token" else "document")
    return ours(args, strategy, data_root, device)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The device's bf16 dense peak in TFLOP/s: ``given``, else looked up by the CUDA device name (None on CPU)."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def ladder_rows() -> list[dict]:
    """The U-Net settings ladder. Each row adds one thing to channels_last (the second row); torch.compile comes last,
    as it costs a compilation."""
    return [
        dict(label="bf16 baseline", reference=True),
        dict(label="+ channels_last", channels_last=True),
        dict(label="+ channels_last, batch 16", channels_last=True, batch=16),
        dict(label="+ channels_last, batch 32", channels_last=True, batch=32),
        dict(label="+ channels_last, gradient checkpointing", channels_last=True, gradient_checkpointing=True),
        dict(label="+ channels_last, adamw8bit", channels_last=True, optimizer="adamw8bit", needs="bitsandbytes"),
        dict(label="+ channels_last + torch.compile", channels_last=True, compile_unet=True),
    ]


def run_worker(args, variant: str, strategy: str, row: dict, work: Path) -> dict:
    """One loop in its own process (its peak memory is its own); with ``--in_process`` in this one."""
    settings = {**dict(batch=args.batch, channels_last=args.channels_last, compile_unet=args.compile_unet,
                       gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, devices=1,
                       memory_profile=None), **{k: v for k, v in row.items() if k not in ("label", "reference", "needs")}}
    if args.in_process:
        ns = argparse.Namespace(**{**vars(args), **settings, "worker": f"{variant}:{strategy}", "work": str(work)})
        return worker(ns)
    cmd = [sys.executable, __file__, "--worker", f"{variant}:{strategy}", "--size", args.size, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", str(args.device_obj), "--workers", str(args.workers), "--work", str(work),
           "--batch", str(settings["batch"]), "--optimizer", settings["optimizer"], "--devices", str(settings["devices"]),
           "--pretrained", args.pretrained]
    cmd += [f"--{flag}" for flag in ("gradient_checkpointing", "channels_last", "compile_unet") if settings[flag]]
    if settings["memory_profile"]:
        cmd += ["--memory_profile", str(settings["memory_profile"])]
    if not args.count_flops:
        cmd += ["--no_flops"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        from core.errors import UserError

        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("train_throughput.py: error:") or "Error: " in ln]
        why = errors[-1].replace("train_throughput.py: error: ", "").replace("  (--debug shows the traceback)", "") if errors else ""
        raise UserError(f"{variant}:{strategy} ({row.get('label', 'default')}) failed (exit {proc.returncode})"
                        + (f": {why}" if why else "; its output is above"))
    return json.loads(line[len("RESULT "):])


def summarise(strategy: str, label: str, ref: dict | None, our: dict, peak: float | None, flops: float | None) -> dict:
    row = {"strategy": strategy, "label": label, "batch": our["batch"], "world_size": our.get("world_size", 1), "ours": our,
           "reference": ref, "flops_per_sample": flops, "memory_kind": our["memory_kind"]}
    if ref:
        row["speed_ratio"] = our["samples_per_s"] / ref["samples_per_s"]
        row["memory_ratio"] = our["peak_mem_mib"] / ref["peak_mem_mib"]
    if flops:
        for res in (our, ref):
            if res:
                res["tflops"] = flops * res["samples_per_s"] / 1e12
                res["mfu"] = res["tflops"] / peak if peak else None
    return row


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else format(x, spec) + suffix


def _size(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def print_row(row: dict) -> None:
    our, ref = row["ours"], row["reference"]
    text = f"{row['strategy']:<18} {row['label']:<42}"
    if ref:
        text += f" reference {ref['samples_per_s']:8.2f} samples/s {ref['peak_mem_mib']:9.0f} MiB |"
    text += f" ours {our['samples_per_s']:8.2f} samples/s {our['peak_mem_mib']:9.0f} MiB"
    if ref:
        text += f" | speed {row['speed_ratio']:5.2f}x, memory {row['memory_ratio']:5.2f}x"
    if row["flops_per_sample"]:
        text += f" | {row['flops_per_sample'] / 1e9:.3g} GFLOP/sample, {our['tflops']:.3g} TFLOP/s"
        if our.get("mfu") is not None:
            text += f", MFU {100 * our['mfu']:.1f}%"
    print(text + f" ({row['memory_kind']})", flush=True)


def strategy_name(strategy: str, family: str) -> str:
    """The table's name of a strategy: the full denoiser is the U-Net of Stable Diffusion, the transformer elsewhere."""
    if strategy == "unet" and family != "stable-diffusion":
        return "transformer (full)"
    return STRATEGY_NAMES.get(strategy, strategy)


def markdown(report: dict) -> str:
    """The rows as the benchmark table of docs/speed.md, headed by machine, versions and date."""
    m = report["machine"]
    head = (f"**{m['device']}**, {report['date']}: {report['size']} ({report['model']}, {report['resolution']} px, "
            f"{report['precision']}); torch {m['torch']}, diffusers {m['diffusers']}; {report['warmup']} warm-up + "
            f"{report['steps']} timed steps per row" + (f"; bf16 dense peak {m['peak_tflops']} TFLOP/s" if m["peak_tflops"] else ""))
    lines = [head, "", "| strategy | setting | batch | reference samples/s | reference memory | ours samples/s | ours memory "
             "| speed | memory | GFLOP/sample | ours TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        our, ref = row["ours"], row["reference"]
        name = strategy_name(row["strategy"], report.get("family", "stable-diffusion"))
        lines.append("| " + " | ".join([
            name + (f", {row['world_size']} GPUs" if row["world_size"] > 1 else ""), row["label"], str(row["batch"]),
            _fmt(ref["samples_per_s"] if ref else None, ".1f"), _size(ref["peak_mem_mib"]) if ref else "—",
            f"{our['samples_per_s']:.1f}", _size(our["peak_mem_mib"]),
            _fmt(row.get("speed_ratio"), ".2f", "×"), _fmt(row.get("memory_ratio"), ".2f", "×"),
            _fmt(row["flops_per_sample"] / 1e9 if row["flops_per_sample"] else None, ".3g"),
            _fmt(our.get("tflops"), ".3g"), _fmt(100 * our["mfu"] if our.get("mfu") is not None else None, ".1f", "%"),
        ]) + " |")
    lines.append("")
    kinds = sorted({row["memory_kind"] for row in report["rows"]})
    if kinds:
        lines.append(f"* memory: {', '.join(kinds)}" + (" (the whole process, models and libraries included)" if "max RSS (process)" in kinds else ""))
    if not m["peak_tflops"]:
        lines.append("* MFU: — where the device's bf16 dense peak is unknown (a CPU, or a GPU not in the table: --peak_tflops)")
    lines += [f"* {note}" for note in report["notes"]]
    for name, parts in report.get("memory_breakdown", {}).items():
        lines.append(f"* {name}, peak by category (MemTracker): " + ", ".join(f"{k} {_size(v)}" for k, v in parts.items()))
    return "\n".join(lines) + "\n"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=None,
                   help="default: all six (Stable Diffusion sizes), unet and lora (the DiT family sizes)")
    p.add_argument("--steps", type=_count(1), default=None, help="timed steps (default: 40 on the CPU sizes, 20 on the GPU ones)")
    p.add_argument("--warmup", type=_count(0), default=None, help="untimed steps first (default: 5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=_count(0), default=None, help="dataloader workers for both loops (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--batch", type=_count(1), default=None, help="images per step (default: 4 on the CPU sizes, 8 on the GPU ones)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="both loops: recompute U-Net activations (memory for speed)")
    p.add_argument("--channels_last", action="store_true", help="ours: U-Net in channels-last memory format")
    p.add_argument("--compile_unet", action="store_true", help="ours: torch.compile the U-Net")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw", help="ours: optimizer (adamw8bit: bitsandbytes)")
    p.add_argument("--ladder", action="store_true", help="the U-Net settings ladder instead of one row per strategy")
    p.add_argument("--suite", action="store_true",
                   help="every strategy, the ladder (so --ladder is implied) and DDP scaling (benchmarks/gpu_suite.sh)")
    p.add_argument("--no_compile", action="store_true", help="leave the ladder's torch.compile row out (it compiles for minutes)")
    p.add_argument("--no_baseline", action="store_true",
                   help="--suite without unet in --strategies: leave the ladder's baseline row out (an earlier run measured it)")
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--memory_profile", default=None, metavar="DIR",
                   help="also profile the U-Net loops' memory (MemTracker categories; CUDA snapshots into DIR)")
    p.add_argument("--peak_tflops", type=_positive, default=None, help="the device's bf16 dense peak, TFLOP/s (default: looked up)")
    p.add_argument("--no_flops", dest="count_flops", action="store_false", help="skip the FLOP count")
    p.add_argument("--pretrained", default=None, help="a diffusers folder to load instead of the size's preset")
    p.add_argument("--save_model", default=None, metavar="FOLDER", help="write the size's preset there (diffusers folder) and load it")
    p.add_argument("--json", default=None, help="write the rows, machine and date as JSON here")
    p.add_argument("--markdown", default=None, help="write the rows as a markdown table here")
    p.add_argument("--work", default=None, help="folder for data and caches (default: a temporary folder)")
    p.add_argument("--in_process", action="store_true",
                   help="run every loop in this process (a quick smoke test: memory figures are then not per loop)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def machine(device: torch.device, peak: float | None) -> dict:
    import diffusers

    if device.type == "cuda":
        name = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(device)}"
    else:
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.machine()})"
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "peak_tflops": peak}


def save_model(size: str, folder: Path, device: torch.device) -> str:
    """The size's preset written as a diffusers folder (fp32), which every worker then loads with ``from_pretrained``;
    its weights are drawn on ``device``."""
    from models.stable_diffusion import load_stable_diffusion

    if not (folder / "model_index.json").is_file():
        with torch.device(device):
            base = load_stable_diffusion(SIZES[size]["pretrained"])
        base.pipeline().save_pretrained(folder, safe_serialization=True)
        del base
    return str(folder)


class Run:
    """The rows measured so far, written to ``--json`` / ``--markdown`` after every one (a run cut short by a time limit
    still leaves what it measured)."""

    def __init__(self, args, work: Path, device: torch.device):
        self.args, self.work, self.device = args, work, device
        self.peak = peak_tflops(device, args.peak_tflops)
        self.flops: dict[str, float] = {}
        self.report = {"size": args.size, "family": SIZES[args.size].get("family", "stable-diffusion"), "model": args.pretrained, "resolution": args.resolution,
                       "precision": _precision(device), "warmup": args.warmup, "steps": args.steps,
                       "date": datetime.date.today().isoformat(), "machine": machine(device, self.peak), "rows": [], "notes": []}
        if self.peak is None and device.type == "cuda":
            self.note("MFU: this GPU's bf16 peak is not in the table; pass --peak_tflops")

    def note(self, text: str) -> None:
        self.report["notes"].append(text)
        self.write()

    def write(self) -> None:
        for path, text in ((self.args.json, lambda: json.dumps(self.report, indent=1)), (self.args.markdown, lambda: markdown(self.report))):
            if path:  # whole or not at all: a time limit may kill the run at any moment
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                partial = Path(path).with_name(Path(path).name + ".partial")
                partial.write_text(text())
                os.replace(partial, path)

    def add(self, strategy: str, row: dict, with_reference: bool) -> dict:
        ref = run_worker(self.args, "reference", strategy, row, self.work) if with_reference else None
        our = run_worker(self.args, "ours", strategy, row, self.work)
        if our.get("flops_per_sample"):
            self.flops.setdefault(strategy, our["flops_per_sample"])  # the same model and step: counted once
        out = summarise(strategy, row["label"], ref, our, self.peak, self.flops.get(strategy))
        self.report["rows"].append(out)
        print_row(out)
        if strategy == "projection":
            print(f"{'':<18} 10k document-level steps at our rate: {10_000 * our['batch'] / our['samples_per_s']:.0f} s", flush=True)
        self.write()
        return out

    def strategies(self, names) -> None:
        for strategy in names:
            self.add(strategy, {"label": "bf16" if self.device.type == "cuda" else "fp32"}, True)

    def ladder(self, with_baseline: bool) -> None:
        import importlib.util

        for row in ladder_rows():
            why = None
            if row.get("needs") and importlib.util.find_spec(row["needs"]) is None:
                why = f"{row['needs']} is not installed"
            elif row.get("optimizer") == "adamw8bit" and self.device.type != "cuda":
                why = "bitsandbytes' 8-bit AdamW needs CUDA"
            elif row.get("compile_unet") and self.args.no_compile:
                why = "--no_compile"
            if why:
                self.note(f"U-Net {row['label']}: not measured ({why})")
                print(f"{'unet':<18} {row['label']:<42} not measured: {why}", flush=True)
            elif with_baseline or not row.get("reference"):
                self.add("unet", row, bool(row.get("reference")))

    def memory_profile(self) -> None:
        self.report["memory_breakdown"] = {}
        for variant in ("reference", "ours"):
            res = run_worker(self.args, variant, "unet", {"label": "memory profile", "memory_profile": self.args.memory_profile},
                             self.work)
            parts = res.get("memory_breakdown_mib", {})
            self.report["memory_breakdown"][f"{variant} U-Net"] = parts
            print(f"memory profile, {variant} U-Net peak: " + ", ".join(f"{k} {_size(v)}" for k, v in parts.items()), flush=True)
            self.write()

    def scaling(self) -> None:
        n = torch.cuda.device_count() if self.device.type == "cuda" else 1
        if n < 2:
            self.note("multi-GPU scaling: not measured (" + ("one GPU visible)" if self.device.type == "cuda" else "a CPU run)"))
            return
        one = next(r for r in self.report["rows"] if r["strategy"] == "unet")
        many = self.add("unet", {"label": f"DDP, {n} GPUs, batch {self.args.batch} each", "devices": n}, False)
        many["scaling_efficiency"] = many["ours"]["samples_per_s"] / (n * one["ours"]["samples_per_s"])
        self.note(f"DDP scaling: {n} GPUs give {many['ours']['samples_per_s']:.1f} samples/s, "
                  f"{many['scaling_efficiency']:.0%} of {n} × one GPU's {one['ours']['samples_per_s']:.1f}")


def measure(args, work: Path, device: torch.device) -> dict:
    """The rows the options ask for. The suite runs what matters most first (U-Net against its reference, the memory
    profile, the ladder with torch.compile last), then the other strategies and the scaling."""
    run = Run(args, work, device)
    print(f"{args.size}: {args.pretrained}, {args.resolution} px, batch {args.batch} (captions: {args.caption_batch}), "
          f"{_precision(device)}, {run.report['machine']['device']}; {args.warmup} warm-up + {args.steps} timed steps"
          + ("; gradient checkpointing" if args.gradient_checkpointing else ""), flush=True)
    if args.suite:
        run.strategies([s for s in args.strategies if s == "unet"])
        if args.memory_profile:
            run.memory_profile()
        if "family" in SIZES[args.size]:
            run.note(f"U-Net ladder: not measured ({args.size} is a {SIZES[args.size]['family']} size; the ladder is Stable Diffusion's)")
        else:
            run.ladder(with_baseline="unet" not in args.strategies and not args.no_baseline)
        run.strategies([s for s in args.strategies if s != "unet"])
        run.scaling()
        return run.report
    if args.ladder:
        run.ladder(with_baseline=True)
    else:
        run.strategies(args.strategies)
    if args.memory_profile:
        run.memory_profile()
    return run.report


def check_paths(args) -> None:
    """Every path the run will write or read, checked before any model is built (a late failure would lose the rows)."""
    from core.errors import UserError, writable_folder

    for flag in ("json", "markdown"):
        path = getattr(args, flag)
        if path:
            if Path(path).is_dir():
                raise UserError(f"--{flag} {path} is a folder; expected a file name (e.g. {Path(path) / ('suite.' + ('md' if flag == 'markdown' else 'json'))})")
            writable_folder(Path(path).parent, f"--{flag}: the folder")
    if args.memory_profile:
        writable_folder(args.memory_profile, "--memory_profile")
    if args.save_model:
        if Path(args.save_model).exists() and not Path(args.save_model).is_dir():
            raise UserError(f"--save_model {args.save_model} is a file; expected a folder to write the model into")
        writable_folder(args.save_model, "--save_model")
    if args.pretrained and not args.save_model and not (Path(args.pretrained) / "model_index.json").is_file():
        raise UserError(f"--pretrained {args.pretrained}: not a diffusers pipeline folder (no model_index.json in it); "
                        "write one with --save_model FOLDER, or leave --pretrained out to use the size's preset")


def check_size(parser, args, device: torch.device) -> None:
    """What the size can run, refused in one line: a GPU size on a CPU, a strategy or the ladder its family does not run."""
    size = SIZES[args.size]
    if "gpu" in size and device.type != "cuda" and not args.worker:
        parser.error(f"--size {args.size} trains {size['gpu']}: on {device.type} one step takes minutes. Run it on a GPU "
                     f"(--device cuda), use --size {size['tiny']} here"
                     + (", or estimate its memory without a GPU with python benchmarks/memory_estimate.py" if args.size == "sd14" else ""))
    family = size.get("family")
    allowed = FAMILY_STRATEGIES if family else STRATEGIES
    args.strategies = args.strategies or list(allowed)
    refused = [s for s in args.strategies if s not in allowed]
    if refused:
        parser.error(f"--strategies {' '.join(refused)}: not run on {family} bases (--size {args.size}); its strategies are "
                     f"{', '.join(allowed)} (the full transformer and LoRA)")
    if family and args.ladder:
        parser.error(f"--ladder: the U-Net settings ladder is Stable Diffusion's (--size tiny or sd14); --size {args.size} is "
                     f"a {family} size: leave --ladder out")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.resolution, args.domain, args.caption_batch = size["resolution"], size["domain"], size["caption_batch"]
    args.batch = args.batch or size["batch"]
    device = args.device_obj = _device(args.device)
    args.steps = args.steps or size["steps"]
    args.warmup = 5 if args.warmup is None else args.warmup
    args.workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    check_size(parser, args, device)
    if args.worker:
        args.pretrained = args.pretrained or size["pretrained"]
        result = worker(args)
        if result:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    check_paths(args)
    if args.steps < 10:
        print(f"note: {args.steps} timed step(s): the rates are noisy (a smoke test); the defaults are 40 on the CPU sizes, "
              "20 on the GPU ones", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.save_model:
            args.pretrained = save_model(args.size, Path(args.save_model), device)
        args.pretrained = args.pretrained or size["pretrained"]
        write_images(work, args.resolution)
        measure(args, work, device)
    return 0


if __name__ == "__main__":
    from core.errors import run_main

    raise SystemExit(run_main("train_throughput.py", main))
