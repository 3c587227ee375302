"""The base-family layer: what a base model is, whatever its family (plain PyTorch, no Lightning).

A *base* is what a strategy adapts and a study samples from. Every family gives the same five parts and helpers, so
the strategies (``lightning_modules/``), the studies and ``generate.py`` never ask which family they hold:

* a **denoiser** (``base.denoiser``; the attribute the family's diffusers pipeline uses: ``unet`` for Stable Diffusion,
  ``transformer`` for the DiT families), called through ``base.denoise(noisy, timesteps, condition)``;
* an **autoencoder** with its own latent scaling and shift (``base.encode_images``, ``base.decode_latents``,
  ``base.encode_posterior`` / ``base.latents_from_posterior`` for the latent cache): a KL VAE samples its posterior, a
  deterministic one (Sana's ``AutoencoderDC``) returns its mean;
* one or more **text encoders** with their tokenizers and window (``base.conditioning()`` turns prompts into the
  denoiser's condition; ``base.text_window``, ``base.count_too_long``);
* a **training objective** (``base.objective``, :class:`DDPMObjective` or :class:`FlowMatchingObjective`): what noise is
  added at which timestep, what the denoiser must predict and how each sample's loss is weighted;
* its **sampler**: the family's diffusers pipeline (``base.pipeline()``, ``base.sample``), so exports load in plain
  diffusers.

A family is registered by name in the ``cxr_diffusion.base_families`` entry points (pyproject.toml; one line per
family) as a :class:`BaseFamily`: the pipeline classes that show it in a folder's ``model_index.json``, the parts such a
folder must hold, and its loader. :func:`family_of` tells a spec's family: the preset's, the folder's (or cached hub
id's) ``model_index.json``, or Stable Diffusion. Adding a family is one module in ``models/`` (its base class and
loader), one preset in ``synthetic/presets.py``, one test and the registry line.
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch

from core import plugins
from core.errors import UserError

BASE_FAMILIES = "cxr_diffusion.base_families"
STABLE_DIFFUSION = "stable-diffusion"


class BaseFamilyError(UserError, ValueError):
    """A base model's family cannot be told, or a setting does not fit it."""


@dataclass(frozen=True)
class BaseFamily:
    """One family of bases (registered in ``cxr_diffusion.base_families``).

    Args:
        name: the family's name (``stable-diffusion``, ``sana``).
        pipelines: diffusers pipeline class names whose ``model_index.json`` shows a folder of this family.
        parts: what such a folder must hold (checked before loading, so a missing part is named in one line).
        load: ``load(spec) -> base`` from a folder or hub id (presets are built by their own ``build``).
        text_window: the window, in tokens, the family's text encoder was trained with (longer windows are refused).
        objective: ``ddpm`` (ε or v prediction) or ``flow-matching`` (rectified flow).
    """

    name: str
    pipelines: tuple[str, ...]
    parts: tuple[str, ...]
    load: Callable
    text_window: int
    objective: Literal["ddpm", "flow-matching"]


def family_names() -> tuple[str, ...]:
    return plugins.names(BASE_FAMILIES)


@functools.lru_cache(maxsize=None)
def get_family(name: str) -> BaseFamily:
    if name not in family_names():
        raise BaseFamilyError(f"base family {name!r} is not installed (known: {', '.join(family_names())})")
    return plugins.load(BASE_FAMILIES, name)


def family_of_pipeline(class_name: str) -> Optional[str]:
    """The family whose pipelines include ``class_name`` (a ``model_index.json`` ``_class_name``), or None."""
    for name in family_names():
        if class_name in get_family(name).pipelines:
            return name
    return None


def model_index(source: str, revision: Optional[str], local_files_only: bool) -> Optional[dict]:
    """``model_index.json`` of a folder, or of a hub id found in the Hugging Face cache (or downloaded unless
    ``local_files_only``); None when there is none to read."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else None
    if source.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source, "model_index.json", revision=revision, local_files_only=local_files_only)
    except Exception:  # not cached, no network, not a repository: the family's loader says what is missing
        return None
    return json.loads(Path(path).read_text())


def check_window(family: BaseFamily, requested: Optional[int], where: str = "model.max_sequence_length", hint: str = "") -> int:
    """The text window to use: ``requested`` or the family's; a window longer than the one the text encoder was trained
    with is refused (positions it never saw would condition the denoiser)."""
    if requested is None:
        return family.text_window
    if int(requested) < 1:
        raise BaseFamilyError(f"{where}: {requested}; expected a positive number of tokens")
    if int(requested) > family.text_window:
        raise BaseFamilyError(
            f"{where}: {requested} tokens, but {family.name}'s text encoder was trained with a window of {family.text_window}; "
            f"use at most {family.text_window} (longer prompts are truncated, and training counts them){hint}")
    return int(requested)


# ---------------------------------------------------------------------- what the families share
class TextCondition:
    """A denoiser's text condition: ``embeds [B, T, D]`` plus, per family, a ``mask [B, T]`` (Sana, PixArt-Σ: 1 for
    prompt tokens, 0 for padding) or ``pooled [B, P]`` projections (SD 3.5)."""

    def __init__(self, embeds: torch.Tensor, mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None):
        self.embeds, self.mask, self.pooled = embeds, mask, pooled

    @property
    def shape(self):
        return self.embeds.shape

    @property
    def dtype(self):
        return self.embeds.dtype

    @property
    def device(self):
        return self.embeds.device

    def to(self, *args, **kwargs) -> "TextCondition":
        """Embeddings and pooled projections to a device and dtype; the mask follows the device only."""
        embeds = self.embeds.to(*args, **kwargs)
        return type(self)(embeds, None if self.mask is None else self.mask.to(embeds.device),
                          None if self.pooled is None else self.pooled.to(*args, **kwargs))

    @classmethod
    def stack(cls, rows: Sequence["TextCondition"]) -> "TextCondition":
        """One condition of a batch from one-prompt conditions (their first rows)."""
        def column(name):
            values = [getattr(r, name) for r in rows]
            return None if values[0] is None else torch.stack([v[0] for v in values])
        return cls(column("embeds"), column("mask"), column("pooled"))


TEXT_CONDITIONS = "text_conditions"  # the cache kind (core/cache.py): <root>/text_conditions/<key>/<sha1 of prompt>.safetensors
TEXT_CONDITION_FORMAT = "cxr-diffusion text condition 1"
CONDITION_FIELDS = ("embeds", "mask", "pooled")


def condition_bytes(prompt: str, condition: TextCondition) -> bytes:
    """One prompt's condition as safetensors bytes: its tensors as they are (dtype kept, so reading gives the same bits)
    and the prompt itself in the metadata (checked when read)."""
    from safetensors.torch import save

    tensors = {name: getattr(condition, name).detach().cpu().contiguous() for name in CONDITION_FIELDS
               if getattr(condition, name) is not None}
    return save(tensors, metadata={"format": TEXT_CONDITION_FORMAT, "prompt": prompt})


def read_condition(path: Path, prompt: str) -> TextCondition:
    """The condition in ``path`` (CPU), which must be ``prompt``'s; anything else, or a file that cannot be read, raises :class:`core.cache.CacheError` naming the file in one line."""
    from safetensors import safe_open

    from core.cache import CacheError

    def refuse(why: str):
        return CacheError(f"{path}: {why}; this text-condition cache file is damaged or foreign: delete it (the prompt is "
                          "encoded again)")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as err:  # safetensors raises its own error types (header, size) and OSError
        raise refuse(f"not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if meta.get("format") != TEXT_CONDITION_FORMAT:
        raise refuse(f"format {meta.get('format')!r}, expected {TEXT_CONDITION_FORMAT!r}")
    if meta.get("prompt") != prompt:
        raise refuse(f"holds the condition of another prompt ({str(meta.get('prompt'))[:60]!r}, not {prompt[:60]!r})")
    if "embeds" not in names or not names <= set(CONDITION_FIELDS):
        raise refuse(f"tensors {sorted(names)}, expected embeds and optionally mask, pooled")
    return TextCondition(tensors["embeds"], tensors.get("mask"), tensors.get("pooled"))


def text_cache_parts(base, encoders: Sequence[str], tokenizers: Sequence[str], **extra) -> dict:
    """What a family's text conditions depend on, besides the dtype and device type the cache adds: the base's weights
    (its spec's cache key, as the latent cache keys its entries), the family, each text encoder's class, config,
    dtype and a fingerprint of its weights, each tokenizer, the window and long-prompt handling, and ``extra`` (a
    family's prompt preprocessing or instruction prefix)."""
    from models.stable_diffusion import weights_fingerprint

    def encoder(name):
        module = getattr(base, name)
        config = {k: v for k, v in module.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        return {"class": type(module).__name__, "config": json.dumps(config, sort_keys=True, default=str),
                "dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
                "weights": weights_fingerprint(list(module.named_parameters()))}

    def tokenizer(name):
        tok = getattr(base, name)
        return {"class": type(tok).__name__, "vocabulary": len(tok), "model_max_length": int(tok.model_max_length)}

    return {"model": base.spec.cache_key(), "family": base.family, "window": int(base.text_window),
            "long_prompts": getattr(base.spec, "long_prompts", "truncate"), "encoders": {n: encoder(n) for n in encoders},
            "tokenizers": {n: tokenizer(n) for n in tokenizers}, "format": TEXT_CONDITION_FORMAT, **extra}


class TextConditionDisk:
    """The disk layer of a :class:`PromptCache`: one :class:`core.cache.GrowingEntry` ``text_conditions/<key>`` per
    encoding dtype and device type (a prompt encoded on a CPU rounds otherwise than on a GPU, and in bf16 otherwise than
    in fp32), the key of ``parts()`` (:func:`text_cache_parts`) plus those two; one safetensors file per prompt."""

    def __init__(self, root, parts: Callable[[], dict]):
        from core.cache import cache_root

        self.root = cache_root(root)
        self.parts = parts
        self.entries: dict = {}

    def entry(self, dtype: torch.dtype, device_type: str):
        from core.cache import GrowingEntry

        key = (str(dtype), device_type)
        if key not in self.entries:
            parts = {**self.parts(), "dtype": str(dtype).removeprefix("torch."), "device_type": device_type}
            self.entries[key] = GrowingEntry(TEXT_CONDITIONS, parts, self.root)
        return self.entries[key]

    def read(self, prompt: str, dtype: torch.dtype, device_type: str) -> Optional[TextCondition]:
        path = self.entry(dtype, device_type).read(prompt, ".safetensors")
        return None if path is None else read_condition(path, prompt)

    def write(self, prompt: str, condition: TextCondition, dtype: torch.dtype, device_type: str) -> Path:
        return self.entry(dtype, device_type).write(prompt, condition_bytes(prompt, condition), ".safetensors")


class PromptCache:
    """Each distinct prompt's condition while the text encoder is frozen (it never changes then): at most ``size``
    prompts in memory, least recently used dropped, and with a disk layer (:meth:`use_disk`) every prompt on disk too:
    memory, then disk, then the encoder (whose output is written to disk).

    Prompts are encoded one by one: a cached value must not depend on which other prompts were missing with it (batched
    matrix products round differently), or a resumed run, which meets its prompts in other batches (class images are
    sampled in the first run only), would not be bit-identical. Values are kept on ``device`` (where the denoiser reads
    them; by default the encoder's) in the encoder's dtype; when either changes, memory is emptied. When the encoder is
    elsewhere than ``device`` (moved off the GPU once the training prompts are on disk), disk is read for both device
    types (the GPU's values first) and a prompt still missing is encoded where the encoder is and written to that
    device type's entry. ``counts`` says how many prompts were encoded and how many read from disk."""

    def __init__(self, size: int, disk: Optional[TextConditionDisk] = None):
        self.size = max(int(size), 0)
        self.entries: "OrderedDict[str, TextCondition]" = OrderedDict()
        self.disk = disk
        self.state: Optional[tuple] = None
        self.counts = {"encoded": 0, "read": 0}

    @property
    def active(self) -> bool:
        """True when anything is cached (memory or disk); otherwise the conditioning encodes its batches whole."""
        return bool(self.size) or self.disk is not None

    def use_disk(self, root, parts: Callable[[], dict]) -> None:
        """Keep every prompt's condition on disk under ``root`` (``core.cache.cache_root`` rules) too."""
        self.disk = TextConditionDisk(root, parts)

    def fetch(self, prompt: str, encode: Callable[[list], TextCondition], like: torch.Tensor, device: torch.device) -> TextCondition:
        """One prompt's condition from disk, else encoded (and written to disk)."""
        if self.disk is not None:
            for where in dict.fromkeys((device.type, like.device.type)):
                found = self.disk.read(prompt, like.dtype, where)
                if found is not None:
                    self.counts["read"] += 1
                    return found
        value = encode([prompt])
        self.counts["encoded"] += 1
        if self.disk is not None:
            self.disk.write(prompt, value, like.dtype, like.device.type)
        return value

    def __call__(self, prompts: Sequence[str], encode: Callable[[list], TextCondition], like: torch.Tensor,
                 device=None) -> TextCondition:
        device = like.device if device is None else torch.device(device)
        with torch.no_grad():
            if self.state != (device, like.dtype):
                self.entries.clear()  # the model moved or changed precision
                self.state = (device, like.dtype)
            for p in dict.fromkeys(prompts):
                if p not in self.entries:
                    self.entries[p] = self.fetch(p, encode, like, device).to(device)
            for p in prompts:
                self.entries.move_to_end(p)
            out = type(self.entries[prompts[0]]).stack([self.entries[p] for p in prompts])
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return out


def sample_with_pipeline(base, pipe, seeds: Sequence[int], device, height: Optional[int], width: Optional[int], **call) -> torch.Tensor:
    """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU from ``pipe(**call)``, one seed per image: each image's starting
    latents come from its own seed (so an image does not change with its batch), at the base's native size by default;
    the denoiser in eval mode meanwhile."""
    denoiser = base.denoiser
    dtype = next(denoiser.parameters()).dtype
    height, width = height or base.native_size, width or base.native_size
    f, channels = base.vae_scale_factor, int(denoiser.config.in_channels)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = torch.stack([torch.randn((channels, height // f, width // f), generator=g) for g in generators])
    was_training = denoiser.training
    denoiser.eval()
    try:
        out = pipe(latents=latents.to(device=device, dtype=dtype), height=height, width=width, output_type="pt", **call).images
    finally:
        denoiser.train(was_training)
    return out.float().clamp(0, 1).cpu()


def cast_frozen(base, names: Sequence[str], dtype: torch.dtype, keep_vae_fp32: bool = False) -> None:
    """Cast each named part of ``base`` that trains nothing to ``dtype`` (the VAE kept in float32 if asked)."""
    for name in names:
        part = getattr(base, name)
        if any(p.requires_grad for p in part.parameters()) or (name == "vae" and keep_vae_fp32):
            continue
        if next(part.parameters()).dtype != dtype:
            part.to(dtype)


def parts_text(parts: Sequence[str]) -> str:
    """``model_index.json, vae/, ...``: a pipeline folder's parts as a user reads them."""
    return ", ".join(p + ("" if "." in p else "/") for p in parts)


def pipeline_source(source_spec, parts: Sequence[str], error: type, what: str, how: str) -> str:
    """The folder (checked to hold every part, else ``error`` naming the missing ones in one line) or hub id to read;
    ``what`` names the family with its article ("a Sana", "an SD 3.5")."""
    folder = Path(source_spec.pretrained).expanduser()
    if not folder.is_dir():
        return source_spec.pretrained
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise error(f"{folder}: not {what} pipeline folder: missing {missing} ({how})")
    return str(folder)


def load_failure(err: Exception) -> str:
    """The first line of a loading error (diffusers' and transformers' run over several)."""
    return str(err).splitlines()[0] if str(err) else repr(err)


def folder_sampler(source: str, scheduler_class, **kwargs):
    """The sampler a folder ships (its ``scheduler/`` config's own class), or None when diffusers has no such class."""
    import diffusers

    config = scheduler_class.load_config(source, subfolder="scheduler", **kwargs)
    sampler_class = getattr(diffusers, str(config.get("_class_name", "")), None)
    return sampler_class.from_config(config) if sampler_class is not None else None


class TransformerBase:
    """What the DiT families (Sana, SD 3.5, PixArt-Σ) share: the denoiser is ``transformer``, the pipeline is the class
    ``pipeline_class`` names over ``vae``, the ``text_parts`` and the transformer, and a masked family (``TextCondition``
    with a mask: Sana, PixArt-Σ) samples from its prompt embeddings and masks."""

    denoiser_name = "transformer"
    text_parts: tuple[str, ...] = ("tokenizer", "text_encoder")

    @property
    def denoiser(self):
        return self.transformer

    @property
    def native_size(self) -> int:
        return int(self.transformer.config.sample_size * self.vae_scale_factor)

    @property
    def max_token_length(self) -> int:
        return self.text_window

    def pipeline(self, scheduler: Optional[str] = None, transformer=None):
        """The family's diffusers pipeline over these parts (progress bar off)."""
        import diffusers

        parts = {name: getattr(self, name) for name in ("vae", *self.text_parts)}
        pipe = getattr(diffusers, self.pipeline_class)(
            **parts, transformer=transformer if transformer is not None else self.transformer,
            scheduler=self.inference_scheduler(scheduler or self.default_sampler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export_pipeline(self):
        return self.pipeline()

    def set_frozen_dtype(self, dtype: torch.dtype, keep_vae_fp32: bool = False) -> None:
        cast_frozen(self, ("vae", *[p for p in self.text_parts if not p.startswith("tokenizer")], "transformer"), dtype,
                    keep_vae_fp32)

    @torch.no_grad()
    def sample_masked(self, prompt_embeds: TextCondition, negative_prompt_embeds: TextCondition, seeds: Sequence[int],
                      steps: int, guidance: float, height: Optional[int], width: Optional[int],
                      scheduler: Optional[str]) -> torch.Tensor:
        """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU, one seed per image, from masked prompt embeddings (the
        pipeline's ``prompt_attention_mask``), with the family's ``sampling_arguments``."""
        if len(seeds) != prompt_embeds.shape[0]:
            raise ValueError(f"got {prompt_embeds.shape[0]} prompts but {len(seeds)} seeds")
        dtype = next(self.transformer.parameters()).dtype
        return sample_with_pipeline(
            self, self.pipeline(scheduler), seeds, prompt_embeds.device, height, width,
            prompt_embeds=prompt_embeds.embeds.to(dtype), prompt_attention_mask=prompt_embeds.mask, negative_prompt=None,
            negative_prompt_embeds=negative_prompt_embeds.embeds.to(dtype),
            negative_prompt_attention_mask=negative_prompt_embeds.mask, num_inference_steps=steps, guidance_scale=guidance,
            **self.sampling_arguments)


class KLAutoencoder:
    """The helpers of a base whose autoencoder is a KL ``AutoencoderKL`` (Stable Diffusion, SD 3.5, PixArt-Σ): latents
    ``(z - shift_factor) * scaling_factor`` with ``z`` drawn from the posterior (no shift unless the VAE's config has one,
    SD 3.5's)."""

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def encode_images(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1], sampled from the VAE posterior with ``generator``."""
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        if self.shift_factor:
            latents = latents - self.shift_factor
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        vae_param = next(self.vae.parameters())
        latents = latents.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents + self.shift_factor if self.shift_factor else latents).sample

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the VAE posterior of images in [-1, 1] (for the latent cache)."""
        vae_param = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        return dist.mean, dist.logvar

    def latents_from_posterior(self, dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents drawn from cached posteriors ``[B, 2C, h, w]`` with ``generator`` (float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        return sample_latents(dist, generator, self.vae.config.scaling_factor, vae_dtype, shift_factor=self.shift_factor).float()


# ---------------------------------------------------------------------- autoencoders
def sample_latents(dist: torch.Tensor, generator: torch.Generator, scaling_factor: float, dtype: torch.dtype,
                   shift_factor: float = 0.0) -> torch.Tensor:
    """Scaled latents ``(z - shift) * scale`` from cached ``[B, 2C, h, w]`` posteriors, drawing ε exactly as diffusers'
    ``DiagonalGaussianDistribution.sample(generator)`` does (shape ``[B, C, h, w]``, the VAE's dtype, CPU generator)."""
    mean, logvar = dist.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(mean.shape, generator=generator, dtype=dtype).to(mean.device)
    z = mean.to(dtype) + std.to(dtype) * eps
    return (z - shift_factor) * scaling_factor if shift_factor else z * scaling_factor


# ---------------------------------------------------------------------- training objectives
@dataclass
class Draw:
    """One step's draw: the noisy latents, their timesteps, the denoiser's target, and the flow sigmas (or None)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    sigmas: Optional[torch.Tensor] = None


@dataclass
class TimestepSampling:
    """How a flow-matching objective draws timesteps and weights the loss: diffusers' ``training_utils``
    (``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``) with the settings of its SD3 and
    Sana scripts (``--weighting_scheme``, ``--logit_mean``, ``--logit_std``, ``--mode_scale``; their defaults).

    Args:
        weighting_scheme: ``none`` (uniform timesteps, unweighted), ``logit_normal`` or ``mode`` (timesteps drawn from
            that density), ``sigma_sqrt`` or ``cosmap`` (uniform timesteps, weighted loss).
        logit_mean, logit_std: the logit-normal density's parameters.
        mode_scale: the mode density's scale.
    """

    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        schemes = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
        if self.weighting_scheme not in schemes:
            raise BaseFamilyError(f"timestep_sampling.weighting_scheme: {self.weighting_scheme!r}; expected one of {schemes}")
        if not float(self.logit_std) > 0:
            raise BaseFamilyError(f"timestep_sampling.logit_std: {self.logit_std}; expected a positive standard deviation")


class DDPMObjective:
    """ε or v prediction on a DDPM schedule, as diffusers' ``train_dreambooth.py``: noise ~ N(0, I), timesteps uniform on
    ``[0, num_train_timesteps)``, ``noisy = add_noise(latents, noise, t)``; Min-SNR-γ weights optional."""

    kind = "ddpm"

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def draw(self, latents: torch.Tensor, generator: torch.Generator, sampling: Optional[TimestepSampling] = None) -> Draw:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (expected epsilon or v_prediction)")
        return Draw(noisy, timesteps, target)

    def weights(self, draw: Draw, snr_gamma: Optional[float], sampling: Optional[TimestepSampling] = None) -> torch.Tensor:
        """Per-sample loss weights: ones, or Min-SNR-γ (Hang et al. 2023) as diffusers' ``compute_snr`` scripts."""
        if snr_gamma is None:
            return torch.ones(draw.timesteps.shape[0], device=draw.noisy.device)
        alphas = self.scheduler.alphas_cumprod.to(draw.timesteps.device)[draw.timesteps].float()
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=float(snr_gamma))
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


class FlowMatchingObjective:
    """Rectified-flow matching, as diffusers' ``train_dreambooth_lora_sana.py`` and ``train_dreambooth_sd3.py``:
    ``u`` from :class:`TimestepSampling`'s density, ``t = scheduler.timesteps[int(u * N)]`` and its sigma,
    ``noisy = (1 - σ) x + σ ε``, target ``ε - x``, the loss weighted by ``compute_loss_weighting_for_sd3``.

    The schedule is the training scheduler's (``FlowMatchEulerDiscreteScheduler`` with the base's shift), never the one a
    pipeline samples with (sampling resets its timesteps; the reference scripts keep a copy for the same reason).
    """

    kind = "flow-matching"
    prediction_type = "flow"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._timesteps = scheduler.timesteps.clone()
        self._sigmas = scheduler.sigmas.clone()

    def draw(self, latents: torch.Tensor, generator: torch.Generator, sampling: Optional[TimestepSampling] = None) -> Draw:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sampling = sampling or TimestepSampling()
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        u = compute_density_for_timestep_sampling(sampling.weighting_scheme, latents.shape[0], logit_mean=sampling.logit_mean,
                                                  logit_std=sampling.logit_std, mode_scale=sampling.mode_scale,
                                                  generator=generator)
        n = int(self.scheduler.config.num_train_timesteps)
        # (u * N).long() as the scripts; clamped because a float32 sigmoid can round to 1.0 (index N, out of range there)
        indices = (u * n).long().clamp(0, len(self._timesteps) - 1)
        timesteps = self._timesteps[indices].to(latents.device)
        sigmas = self._sigmas[indices].to(device=latents.device, dtype=latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return Draw(noisy, timesteps, noise - latents, sigmas)

    def weights(self, draw: Draw, snr_gamma: Optional[float], sampling: Optional[TimestepSampling] = None) -> torch.Tensor:
        """Per-sample weights from ``compute_loss_weighting_for_sd3`` (constant over a sample, so weighting the
        per-sample mean equals the scripts' weighting of every element)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sampling = sampling or TimestepSampling()
        return compute_loss_weighting_for_sd3(sampling.weighting_scheme, draw.sigmas).float().reshape(-1)
