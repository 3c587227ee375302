"""The one place that loads Stable Diffusion (plain PyTorch, no Lightning).

A :class:`StableDiffusionSpec` names what to load: a diffusers model id or local folder
(``CompVis/stable-diffusion-v1-4`` by default) or a preset: a named Stable Diffusion that needs no download,
registered by an installed package through the ``cxr_diffusion.stable_diffusion`` entry points
(:mod:`core.plugins`). The suite's own presets live in the ``synthetic`` package (``tiny-random``, ``tiny-phantom``,
``sd14-random``; see ``synthetic/presets.py``).

:func:`load_stable_diffusion` turns a spec into a :class:`StableDiffusion` module that holds
``vae, text_encoder, unet`` (frozen unless a strategy says otherwise) plus ``tokenizer`` and the
training ``noise_scheduler``, with the helpers every strategy and every study uses:
:meth:`~StableDiffusion.encode_images`, :meth:`~StableDiffusion.encode_prompts`,
:meth:`~StableDiffusion.sample`. SD v1.4's configs are in docs/formats.md §7.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from core import plugins
from core.errors import UserError
from models.families import BaseFamily, KLAutoencoder, cast_frozen, sample_with_pipeline

DEFAULT_PRETRAINED = "CompVis/stable-diffusion-v1-4"

# SD v1.4's scheduler/scheduler_config.json (docs/formats.md §7).
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
CHUNK_TOKENS = 75  # a chunked long prompt's window: CLIP's 77 less its start and end tokens
LONG_PROMPTS = ("truncate", "chunked")


def chunk_count(spec) -> int:
    """CLIP windows per prompt: 1 (``truncate``), or ``ceil(max_sequence_length / 75)`` for ``chunked`` (default 3)."""
    if spec.long_prompts not in LONG_PROMPTS:
        raise UserError(f"model.long_prompts: {spec.long_prompts!r}; expected one of {', '.join(LONG_PROMPTS)}")
    if spec.long_prompts == "truncate":
        return 1
    window = 3 * CHUNK_TOKENS if spec.max_sequence_length is None else int(spec.max_sequence_length)
    if window < 1:
        raise UserError(f"model.max_sequence_length: {window}; expected a positive number of tokens")
    return -(-window // CHUNK_TOKENS)


@dataclass(frozen=True)
class StableDiffusionPreset:
    """A Stable Diffusion that needs no download, registered under a name (``cxr_diffusion.stable_diffusion``).

    Either ``folder``, a diffusers pipeline folder shipped with the package that registers it, or ``build``,
    which makes the parts from constructor configs with a seed: ``build(seed) -> (vae, text_encoder, tokenizer,
    unet, noise_scheduler)`` (another family's ``build`` returns its base whole). ``key(seed)`` names the weights for
    cache keys and provenance; ``family`` is the base family (:mod:`models.families`).
    """

    name: str
    key: Callable[[int], str]
    folder: Optional[Path] = None
    build: Optional[Callable[[int], tuple]] = None
    family: str = "stable-diffusion"


def preset_names() -> tuple[str, ...]:
    return plugins.names(plugins.STABLE_DIFFUSION)


@functools.lru_cache(maxsize=None)
def get_preset(name: str) -> StableDiffusionPreset:
    return plugins.load(plugins.STABLE_DIFFUSION, name)


@dataclass
class StableDiffusionSpec:
    """What Stable Diffusion to load.

    Args:
        pretrained: a diffusers model id (``CompVis/stable-diffusion-v1-4``), a local folder holding a
            ``model_index.json`` pipeline, or a preset (``tiny-random``, ``tiny-phantom``, ``sd14-random``).
        revision: git revision of a hub id (branch, tag or commit).
        local_files_only: never touch the network; read the Hugging Face cache only.
        seed: seed of a preset built from constructor configs (``tiny-random``, ``sd14-random``; ignored otherwise).
        family: the base family (``stable-diffusion``, ``sana``; :mod:`models.families`); default: the preset's, or
            the one the folder's ``model_index.json`` shows.
        max_sequence_length: the text window in tokens; default: the family's (CLIP 77, Sana's Gemma-2 300). A window
            longer than the one the text encoder was trained with is refused (on Stable Diffusion, unless chunked).
        long_prompts: Stable Diffusion only: ``truncate`` (CLIP's 77 tokens, SD's own conditioning) or ``chunked``:
            the prompt's tokens in windows of 75, each encoded by CLIP as a prompt of its own (start and end tokens
            added) and the states concatenated, as common UIs condition on long prompts; ``max_sequence_length`` then
            counts the prompt's tokens (default 225: three windows, ``[B, 3 x 77, D]``; shorter prompts get empty
            windows, so a prompt's conditioning does not depend on its batch). Off by default: SD was trained on 77.
    """

    pretrained: str = DEFAULT_PRETRAINED
    revision: Optional[str] = None
    local_files_only: bool = False
    seed: int = 0
    family: Optional[str] = None
    max_sequence_length: Optional[int] = None
    long_prompts: str = "truncate"

    @property
    def is_preset(self) -> bool:
        return self.pretrained in preset_names()

    def family_name(self) -> str:
        """The base family: set, the preset's, the one ``model_index.json`` shows, or Stable Diffusion."""
        from models.families import STABLE_DIFFUSION, family_of_pipeline, get_family, model_index

        if self.family is not None:
            return get_family(self.family).name
        if self.is_preset:
            return get_preset(self.pretrained).family
        index = model_index(self.pretrained, self.revision, self.local_files_only) or {}
        return family_of_pipeline(str(index.get("_class_name", ""))) or STABLE_DIFFUSION

    def cache_key(self) -> str:
        """A short string identifying these weights (for cache keys and provenance)."""
        if self.is_preset:
            return get_preset(self.pretrained).key(self.seed)
        return f"{self.pretrained}@{self.revision or 'main'}"


class StableDiffusionLoadError(UserError, RuntimeError):
    """The weights named by a spec could not be found or read."""


class StableDiffusion(KLAutoencoder, nn.Module):
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
        from models.families import DDPMObjective, check_window, get_family

        self.clip_chunks = chunk_count(spec)
        if self.clip_chunks == 1:
            check_window(get_family(self.family), spec.max_sequence_length,
                         hint="; or set model.long_prompts: chunked to read longer prompts in CLIP windows of 75 tokens")
        self.objective = DDPMObjective(noise_scheduler)

    # ------------------------------------------------------------------ the base-family interface (models/families.py)
    family = "stable-diffusion"
    denoiser_name = "unet"
    default_sampler = "ddim"  # generate's default
    default_class_sampler = "pndm"  # prior preservation's class images (SD v1.4's own sampler)
    pipeline_class = "StableDiffusionPipeline"
    sampling_arguments: dict = {}  # pipeline arguments to sample as trained (none: the pipeline's defaults)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size * self.vae_scale_factor)

    @property
    def text_window(self) -> int:
        """Tokens of a prompt that condition the U-Net: CLIP's 77, or the chunked windows' ``chunks x 75``."""
        return self.max_token_length if self.clip_chunks == 1 else CHUNK_TOKENS * self.clip_chunks

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction for CLIP conditioning ``[B, 77, D]``."""
        return self.unet(noisy, timesteps, condition.to(noisy.dtype) if condition.dtype != noisy.dtype else condition).sample

    def conditioning(self, cache_size: int = 0, rewrite=None):
        """The family's own prompt conditioning (CLIP's ``last_hidden_state``), each prompt rewritten first by
        ``rewrite`` (textual inversion's multi-vector tokens); ``cache_size`` is for families that cache here (CLIP's
        cache is ``lightning_modules.unet.CachedClipConditioning``)."""
        from models.generator import ClipConditioning

        return ClipConditioning(self, rewrite)

    def export_pipeline(self):
        """The pipeline ``export.py`` saves (PNDM, as SD v1.4's folder)."""
        return self.pipeline(scheduler="pndm")

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
        """How many prompts are longer than the text window (they would be truncated)."""
        if self.clip_chunks > 1:
            lengths = self.tokenizer(list(prompts), add_special_tokens=False, truncation=False).input_ids
            return sum(len(ids) > self.text_window for ids in lengths)
        lengths = self.tokenizer(list(prompts), truncation=False).input_ids
        return sum(len(ids) > self.max_token_length for ids in lengths)

    def chunk_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B * chunks, 77]``: each prompt's tokens (at most ``chunks x 75``) in windows of 75, each written as CLIP
        tokenizes a prompt (start token, the window, end token, padding); windows past a prompt's end are empty ones."""
        tok = self.tokenizer
        rows = []
        for ids in tok(list(prompts), add_special_tokens=False, truncation=False).input_ids:
            ids = ids[: self.text_window]
            for c in range(self.clip_chunks):
                part = ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
                rows.append([tok.bos_token_id, *part, tok.eos_token_id] + [tok.pad_token_id] * (CHUNK_TOKENS - len(part)))
        return torch.tensor(rows)

    def clip_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's ``last_hidden_state`` of prompts (with gradients where CLIP trains): ``[B, 77, D]``, or with chunked
        long prompts the windows' states concatenated, ``[B, chunks x 77, D]``."""
        device = next(self.text_encoder.parameters()).device
        if self.clip_chunks == 1:
            return self.text_encoder(self.tokenize(prompts, device))[0]
        states = self.text_encoder(self.chunk_ids(prompts).to(device))[0]
        return states.reshape(len(prompts), -1, states.shape[-1])

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP conditioning ``[B, 77, D]`` (``last_hidden_state`` after the final layer norm); chunked: ``[B, k x 77, D]``."""
        return self.clip_states(prompts)

    # the autoencoder (encode_images, decode_latents, encode_posterior, latents_from_posterior): models.families.KLAutoencoder

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
        unet_dtype = next(self.unet.parameters()).dtype
        return sample_with_pipeline(self, self.pipeline(scheduler), seeds, prompt_embeds.device, height, width,
                                    prompt_embeds=prompt_embeds.to(unet_dtype),
                                    negative_prompt_embeds=negative_prompt_embeds.to(unet_dtype), num_inference_steps=steps,
                                    guidance_scale=guidance)

    def set_frozen_dtype(self, dtype: torch.dtype, keep_vae_fp32: bool = False) -> None:
        """Cast the frozen parts (every part without trainable parameters) to ``dtype``."""
        cast_frozen(self, ("vae", "text_encoder", "unet"), dtype, keep_vae_fp32)


# ---------------------------------------------------------------------- loading
def _how_to_get_weights(spec: StableDiffusionSpec) -> str:
    return (
        f"Stable Diffusion weights {spec.pretrained!r} could not be loaded. Either pass a local folder that holds "
        "a diffusers pipeline (model_index.json with vae/, text_encoder/, tokenizer/, unet/, scheduler/), e.g. one "
        "made with `huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir sd-v1-4` on a machine with "
        "internet access (accept the model licence on the Hub first), or make sure the hub id is in your Hugging Face "
        f"cache (HF_HOME). Presets that need no download: {', '.join(preset_names()) or 'none installed'}."
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


def _as_spec(spec: "StableDiffusionSpec | dict | str") -> StableDiffusionSpec:
    if isinstance(spec, str):
        return StableDiffusionSpec(pretrained=spec)
    if isinstance(spec, dict):
        return StableDiffusionSpec(**spec)
    return spec


def _folder_spec(spec: StableDiffusionSpec) -> StableDiffusionSpec:
    """The spec to read files from: a preset with shipped weights reads its folder, offline."""
    if spec.is_preset and get_preset(spec.pretrained).folder is not None:
        folder = Path(get_preset(spec.pretrained).folder)
        if not (folder / "model_index.json").is_file():
            raise StableDiffusionLoadError(f"{folder}: the weights of preset {spec.pretrained!r} are missing from this checkout")
        return StableDiffusionSpec(pretrained=str(folder), local_files_only=True)
    return spec


def _built(spec: StableDiffusionSpec) -> Optional[StableDiffusion]:
    """The preset built from constructor configs, or None when ``spec`` is not such a preset."""
    if not spec.is_preset or get_preset(spec.pretrained).build is None:
        return None
    # built under a private RNG so the global seed of the caller is untouched
    with torch.random.fork_rng(devices=[]):
        vae, text_encoder, tokenizer, unet, scheduler = get_preset(spec.pretrained).build(spec.seed)
    return StableDiffusion(vae, text_encoder, tokenizer, unet, scheduler, spec)


def _from_pretrained(cls, spec: StableDiffusionSpec, subfolder: str, parts: Sequence[str]):
    source_spec = _folder_spec(spec)
    try:
        return cls.from_pretrained(_source(source_spec, parts), subfolder=subfolder, revision=source_spec.revision,
                                   local_files_only=source_spec.local_files_only)
    except (OSError, ValueError, EnvironmentError) as err:
        raise StableDiffusionLoadError(_how_to_get_weights(spec) + f"\nUnderlying error: {err}") from None


def load_vae(spec: StableDiffusionSpec | dict | str):
    """Only the (frozen, eval-mode) ``AutoencoderKL`` of ``spec``: for studies that need no U-Net or text encoder."""
    from diffusers import AutoencoderKL

    spec = _as_spec(spec)
    if spec.family_name() != "stable-diffusion":  # another family's autoencoder (Sana's AutoencoderDC): its own loader
        return load_stable_diffusion(spec).vae.requires_grad_(False).eval()
    built = _built(spec)
    vae = built.vae if built is not None else _from_pretrained(AutoencoderKL, spec, "vae", ("vae",))
    return vae.requires_grad_(False).eval()


def load_text_encoder(spec: StableDiffusionSpec | dict | str):
    """``(tokenizer, text_encoder)`` of ``spec`` (frozen, eval mode): for studies that need only SD's CLIP text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = _as_spec(spec)
    if spec.family_name() != "stable-diffusion":  # another family's text encoder (Sana's Gemma-2): its own loader
        base = load_stable_diffusion(spec)
        return base.tokenizer, base.text_encoder.requires_grad_(False).eval()
    built = _built(spec)
    if built is not None:
        return built.tokenizer, built.text_encoder.requires_grad_(False).eval()
    parts = ("tokenizer", "text_encoder")
    tokenizer = _from_pretrained(CLIPTokenizer, spec, "tokenizer", parts)
    text_encoder = _from_pretrained(CLIPTextModel, spec, "text_encoder", parts)
    return tokenizer, text_encoder.requires_grad_(False).eval()


def load_stable_diffusion(spec: StableDiffusionSpec | dict | str):
    """Load the base named by ``spec`` (a spec, a dict of its fields, or a bare id/preset string): a
    :class:`StableDiffusion`, or the base of another family (:mod:`models.families`), which has the same interface."""
    spec = _as_spec(spec)
    family = spec.family_name()
    if spec.long_prompts != "truncate" and family != "stable-diffusion":
        raise UserError(f"model.long_prompts: {spec.long_prompts!r} chunks CLIP's 77-token window (Stable Diffusion); "
                        f"{family} bases read long prompts in their own window: remove long_prompts")
    if family != "stable-diffusion":
        from models.families import get_family

        if spec.is_preset and get_preset(spec.pretrained).build is not None:
            with torch.random.fork_rng(devices=[]):
                return get_preset(spec.pretrained).build(spec.seed, spec)
        return get_family(family).load(spec, _folder_spec(spec))
    built = _built(spec)
    if built is not None:
        return built
    sd = _load_pretrained(_folder_spec(spec))
    sd.spec = spec
    return sd


load_base = load_stable_diffusion


def _load_family(spec: StableDiffusionSpec, source_spec: StableDiffusionSpec) -> StableDiffusion:
    sd = _load_pretrained(source_spec)
    sd.spec = spec
    return sd


FAMILY = BaseFamily(name="stable-diffusion", pipelines=("StableDiffusionPipeline",), parts=PIPELINE_PARTS, load=_load_family,
                    text_window=77, objective="ddpm")


def precision_to_dtype(precision: str | int | None) -> torch.dtype:
    """The weight dtype of frozen parts for a Lightning precision string."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32


def weights_fingerprint(named_tensors: Sequence[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """A short hash identifying a set of weights: every tensor's name, shape and up to ``samples`` evenly spaced values
    (as float32). Cheap at any size (a few thousand values per tensor), and different for any two trained models in
    practice; checkpoints store it for the frozen parts so a resume on another base model is noticed."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples:
            flat = flat[torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()]
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
