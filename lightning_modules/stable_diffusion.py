"""The one place that loads Stable Diffusion.

A :class:`StableDiffusionSpec` names what to load: a diffusers model id or local folder
(``CompVis/stable-diffusion-v1-4`` by default) or a built-in preset:

* ``tiny-random`` — a seeded miniature built from constructor configs (U-Net ``(32, 64)``,
  VAE ``[32, 64]``, a 5-layer 32-wide CLIP text encoder) with the small CLIP tokenizer shipped in
  ``lightning_modules/assets``. It needs no download and draws noise: use it for plumbing and tests.
* ``tiny-phantom`` — the same architecture with weights trained on chest X-ray phantoms, shipped in
  ``lightning_modules/assets/tiny_phantom`` (built by ``tools/build_tiny_phantom.py``; see its
  MODEL_CARD.md). It draws phantom chest X-rays but has never seen a finding named. Unlike SD v1.4 it
  predicts v on a zero-terminal-SNR schedule (:func:`tiny_phantom_scheduler_config`), so that its
  prompt, not the starting noise, decides the layout of a 64 px image.
* ``sd14-random`` — SD v1.4's full-size architecture (../shared/REFERENCE.md §7: 860 M U-Net, 84 M VAE,
  123 M CLIP) with seeded random weights and the small tokenizer padded to CLIP's 49,408 ids: for speed
  and memory benchmarks on a GPU without downloading the weights. It draws noise.

:func:`load_stable_diffusion` turns a spec into a :class:`StableDiffusion` module that holds
``vae, text_encoder, unet`` (frozen unless a strategy says otherwise) plus ``tokenizer`` and the
training ``noise_scheduler``, with the helpers every strategy and every study uses:
:meth:`~StableDiffusion.encode_images`, :meth:`~StableDiffusion.encode_prompts`,
:meth:`~StableDiffusion.sample`.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_clip_tokenizer"
TINY_PHANTOM_DIR = ASSETS / "tiny_phantom"
PRESETS = ("tiny-random", "tiny-phantom", "sd14-random")
RANDOM_PRESETS = ("tiny-random", "sd14-random")
DEFAULT_PRETRAINED = "CompVis/stable-diffusion-v1-4"

# SD v1.4's scheduler/scheduler_config.json (REFERENCE §7); the presets use it too.
SD14_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

INFERENCE_SCHEDULERS = ("pndm", "ddim", "euler", "dpm")
# The terminal signal level of the tiny-phantom schedule: zero SNR lifted to 2**-24, as diffusers'
# EulerDiscreteScheduler does under rescale_betas_zero_snr, so every sampler (PNDM too) can divide by it.
TERMINAL_ALPHA_CUMPROD = 2.0**-24


def tiny_phantom_scheduler_config() -> dict:
    """SD v1.4's scheduler rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al. 2024).

    Why: under SD v1.4's schedule the last training step still keeps sqrt(0.0047) of the image. In a
    32x32x4 latent that is enough for a large structure such as a pleural effusion to be read from
    the starting noise, so a U-Net learns to take the layout from the noise and never from the
    prompt; ε-prediction also gives the prompt almost no gradient at the high noise levels where it
    would matter. Measured once (the tiny-phantom MODEL_CARD.md): a U-Net trained from scratch on two
    prompts, each with its own phantoms, drew images the phantom classifier could hardly tell apart
    by prompt on SD v1.4's schedule (AUROC 0.55), and could on this one (0.91). The betas are
    written out (``trained_betas``) so every diffusers sampler reads the same schedule; PNDM has no
    ``rescale_betas_zero_snr`` option.
    """
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    base = SD14_SCHEDULER_CONFIG
    steps = base["num_train_timesteps"]
    betas = torch.linspace(base["beta_start"] ** 0.5, base["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_cumprod[-1] = TERMINAL_ALPHA_CUMPROD
    betas = 1.0 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {**base, "trained_betas": [round(float(b), 10) for b in betas], "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}


@dataclass
class StableDiffusionSpec:
    """What Stable Diffusion to load.

    Args:
        pretrained: a diffusers model id (``CompVis/stable-diffusion-v1-4``), a local folder holding a
            ``model_index.json`` pipeline, or a built-in preset (``tiny-random``, ``tiny-phantom``, ``sd14-random``).
        revision: git revision of a hub id (branch, tag or commit).
        local_files_only: never touch the network; read the Hugging Face cache only.
        seed: seed of the ``tiny-random``/``sd14-random`` weights (ignored otherwise).
    """

    pretrained: str = DEFAULT_PRETRAINED
    revision: Optional[str] = None
    local_files_only: bool = False
    seed: int = 0

    @property
    def is_preset(self) -> bool:
        return self.pretrained in PRESETS

    def cache_key(self) -> str:
        """A short string identifying these weights (for cache keys and provenance)."""
        if self.pretrained in RANDOM_PRESETS:
            return f"{self.pretrained}-seed{self.seed}"
        if self.pretrained == "tiny-phantom":
            return f"tiny-phantom-{_tiny_phantom_digest()}"
        return f"{self.pretrained}@{self.revision or 'main'}"


@functools.lru_cache(maxsize=1)
def _tiny_phantom_digest() -> str:
    """First 10 hex digits of the SHA-256 of the shipped U-Net weights: a rebuild changes the key."""
    path = TINY_PHANTOM_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "missing"


class StableDiffusionLoadError(RuntimeError):
    """The weights named by a spec could not be found or read."""


class StableDiffusion(nn.Module):
    """Frozen Stable Diffusion parts plus the helpers that use them.

    ``vae``, ``text_encoder`` and ``unet`` are submodules; ``tokenizer`` and ``noise_scheduler``
    are plain attributes (they hold no tensors to train or save).
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, noise_scheduler, spec: StableDiffusionSpec):
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.unet = unet
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.spec = spec
        for part in (self.vae, self.text_encoder, self.unet):
            part.requires_grad_(False)
            part.eval()

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def max_token_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    # ------------------------------------------------------------------ encoders
    def tokenize(self, prompts: Sequence[str], device: Optional[torch.device] = None) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_token_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(device) if device is not None else ids

    def count_too_long(self, prompts: Sequence[str]) -> int:
        """How many prompts are longer than the text encoder's window (they would be truncated)."""
        lengths = self.tokenizer(list(prompts), truncation=False).input_ids
        return sum(len(ids) > self.max_token_length for ids in lengths)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP conditioning ``[B, 77, D]``: ``last_hidden_state`` after the final layer norm."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenize(prompts, device))[0]

    def encode_images(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1], sampled from the VAE posterior with ``generator``."""
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        vae_param = next(self.vae.parameters())
        latents = latents.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample

    # ------------------------------------------------------------------ sampling
    def inference_scheduler(self, name: str = "ddim"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

        classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
        if name not in classes:
            raise ValueError(f"unknown inference scheduler {name!r}; expected one of {sorted(classes)}")
        return classes[name].from_config(self.noise_scheduler.config)

    def pipeline(self, scheduler: str = "ddim", unet: Optional[nn.Module] = None, text_encoder: Optional[nn.Module] = None):
        """A diffusers ``StableDiffusionPipeline`` over these parts (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder if text_encoder is not None else self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet,
            scheduler=self.inference_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        seeds: Sequence[int],
        steps: int = 25,
        guidance: float = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        scheduler: str = "ddim",
    ) -> torch.Tensor:
        """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU, one seed per image.

        Each image's starting noise depends only on its own seed, so an image does not change
        with the batch it is generated in.
        """
        if len(seeds) != prompt_embeds.shape[0]:
            raise ValueError(f"got {prompt_embeds.shape[0]} prompts but {len(seeds)} seeds")
        pipe = self.pipeline(scheduler)
        unet_dtype = next(self.unet.parameters()).dtype
        size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or size, width or size
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = torch.stack(
            [
                torch.randn((self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor), generator=g)
                for g in generators
            ]
        ).to(device=prompt_embeds.device, dtype=unet_dtype)
        was_training = self.unet.training
        self.unet.eval()
        try:
            out = pipe(
                prompt_embeds=prompt_embeds.to(unet_dtype),
                negative_prompt_embeds=negative_prompt_embeds.to(unet_dtype),
                latents=latents,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                output_type="pt",
            ).images
        finally:
            self.unet.train(was_training)
        return out.float().clamp(0, 1).cpu()

    def set_frozen_dtype(self, dtype: torch.dtype, keep_vae_fp32: bool = False) -> None:
        """Cast the frozen parts (every part without trainable parameters) to ``dtype``."""
        for name in ("vae", "text_encoder", "unet"):
            part = getattr(self, name)
            if any(p.requires_grad for p in part.parameters()):
                continue
            if name == "vae" and keep_vae_fp32:
                continue
            if next(part.parameters()).dtype != dtype:
                part.to(dtype)


# ---------------------------------------------------------------------- builders
def tiny_configs() -> dict:
    """Constructor configs of the ``tiny-random`` miniature (also the CPU benchmark sizes)."""
    return {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            hidden_act="quick_gelu",
        ),
    }


def sd14_configs() -> dict:
    """Constructor configs of SD v1.4's U-Net, VAE and CLIP text encoder (../shared/REFERENCE.md §7), for the
    ``sd14-random`` preset: the full-size architecture with random weights, for speed and memory benchmarks."""
    return {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        ),
        "vae": dict(
            sample_size=512, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
        ),
        "vocab_size": 49408,
    }


def load_tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), model_max_length=77)


def _build_tiny_random(spec: StableDiffusionSpec) -> StableDiffusion:
    """``tiny-random`` (the miniature) or ``sd14-random`` (SD v1.4's sizes; the tiny tokenizer, whose ids fit its vocabulary)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd14_configs() if spec.pretrained == "sd14-random" else tiny_configs()
    tokenizer = load_tiny_tokenizer()
    if "vocab_size" in cfg:  # ids line up with the embedding table, as in SD's own tokenizer (new tokens go after it)
        tokenizer.add_tokens([f"<|unused-{i}|>" for i in range(cfg["vocab_size"] - len(tokenizer))])
    # Build under a private RNG so the global seed of the caller is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_config = CLIPTextConfig(
            **cfg["text_encoder"],
            vocab_size=cfg.get("vocab_size", len(tokenizer)),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    return StableDiffusion(vae, text_encoder, tokenizer, unet, scheduler, spec)


def _how_to_get_weights(spec: StableDiffusionSpec) -> str:
    return (
        f"Stable Diffusion weights {spec.pretrained!r} could not be loaded. Either pass a local folder that holds "
        "a diffusers pipeline (model_index.json with vae/, text_encoder/, tokenizer/, unet/, scheduler/), e.g. one "
        "made with `huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir sd-v1-4` on a machine with "
        "internet access (accept the model licence on the Hub first), or make sure the hub id is in your Hugging Face "
        f"cache (HF_HOME). Built-in presets that need no download: {', '.join(PRESETS)}."
    )


def is_local_path(source: str) -> bool:
    """A hub id is "owner/name"; anything else (absolute, relative with ./, deeper paths) is a folder."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


PIPELINE_PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler")


def _source(spec: StableDiffusionSpec, parts: Sequence[str] = PIPELINE_PARTS) -> str:
    """The hub id, or the checked local folder, that ``from_pretrained`` reads ``parts`` from."""
    if not is_local_path(spec.pretrained):
        return spec.pretrained
    folder = Path(spec.pretrained).expanduser()
    if not folder.is_dir():
        raise StableDiffusionLoadError(f"{folder}: no such folder. " + _how_to_get_weights(spec))
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise StableDiffusionLoadError(f"{folder} is not a diffusers pipeline folder: missing {missing}. " + _how_to_get_weights(spec))
    return str(folder)


def _load_pretrained(spec: StableDiffusionSpec) -> StableDiffusion:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = _source(spec)
    kwargs = dict(revision=spec.revision, local_files_only=spec.local_files_only)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise StableDiffusionLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None
    return StableDiffusion(vae, text_encoder, tokenizer, unet, scheduler, spec)


def _as_spec(spec: StableDiffusionSpec | dict | str) -> StableDiffusionSpec:
    if isinstance(spec, str):
        return StableDiffusionSpec(pretrained=spec)
    if isinstance(spec, dict):
        return StableDiffusionSpec(**spec)
    return spec


def _tiny_phantom_spec() -> StableDiffusionSpec:
    if not (TINY_PHANTOM_DIR / "model_index.json").is_file():
        raise StableDiffusionLoadError(
            f"{TINY_PHANTOM_DIR}: the tiny-phantom weights are missing from this checkout; rebuild them with "
            "`python tools/build_tiny_phantom.py`"
        )
    return StableDiffusionSpec(pretrained=str(TINY_PHANTOM_DIR), local_files_only=True)


def load_vae(spec: StableDiffusionSpec | dict | str):
    """Only the (frozen, eval-mode) ``AutoencoderKL`` of ``spec``: for studies that need no U-Net or text encoder."""
    from diffusers import AutoencoderKL

    spec = _as_spec(spec)
    if spec.pretrained in RANDOM_PRESETS:
        return load_stable_diffusion(spec).vae.eval()
    source_spec = _tiny_phantom_spec() if spec.pretrained == "tiny-phantom" else spec
    try:
        vae = AutoencoderKL.from_pretrained(_source(source_spec, ("vae",)), subfolder="vae", revision=source_spec.revision,
                                            local_files_only=source_spec.local_files_only)
    except (OSError, ValueError, EnvironmentError) as err:
        raise StableDiffusionLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None
    return vae.requires_grad_(False).eval()


def load_text_encoder(spec: StableDiffusionSpec | dict | str):
    """``(tokenizer, text_encoder)`` of ``spec`` (frozen, eval mode): for studies that need only SD's CLIP text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = _as_spec(spec)
    if spec.pretrained in RANDOM_PRESETS:
        sd = load_stable_diffusion(spec)
        return sd.tokenizer, sd.text_encoder.requires_grad_(False).eval()
    source_spec = _tiny_phantom_spec() if spec.pretrained == "tiny-phantom" else spec
    kwargs = dict(revision=source_spec.revision, local_files_only=source_spec.local_files_only)
    try:
        source = _source(source_spec, ("tokenizer", "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise StableDiffusionLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None
    return tokenizer, text_encoder.requires_grad_(False).eval()


def load_stable_diffusion(spec: StableDiffusionSpec | dict | str) -> StableDiffusion:
    """Load the parts named by ``spec`` (a spec, a dict of its fields, or a bare id/preset string)."""
    spec = _as_spec(spec)
    if spec.pretrained in RANDOM_PRESETS:
        return _build_tiny_random(spec)
    if spec.pretrained == "tiny-phantom":
        sd = _load_pretrained(_tiny_phantom_spec())
        sd.spec = spec
        return sd
    return _load_pretrained(spec)


def precision_to_dtype(precision: str | int | None) -> torch.dtype:
    """The weight dtype of frozen parts for a Lightning precision string."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32
