"""The Sana family (NVIDIA's Sana; CheXGenBench's best base, FID 54 on RAD-DINO features): a linear-attention DiT
(``SanaTransformer2DModel``) trained by rectified-flow matching on the 32x down-sampling ``AutoencoderDC``, conditioned by
Gemma-2 (``Gemma2Model``'s last hidden state with its attention mask; a 300-token window).

The training maths follow diffusers' ``examples/dreambooth/train_dreambooth_lora_sana.py``:

* latents ``vae.encode(x).latent * scaling_factor`` (the DC autoencoder is deterministic: no posterior to sample, no
  shift);
* the training schedule is ``FlowMatchEulerDiscreteScheduler.from_pretrained(<folder>, subfolder="scheduler")``, as the
  script (on the hub's Sana folders, whose scheduler is a DPM-Solver config, that reads no ``shift``: 1.0);
* the objective is :class:`~models.families.FlowMatchingObjective` (target ``noise - latents``);
* prompts are encoded without the "complex human instruction" prefix, as the script's default
  (``--complex_human_instruction`` unset); ``SanaPipeline``'s own default at inference adds one, so an export names
  ``complex_human_instruction: null`` in ``export.json`` and its model card: pass ``complex_human_instruction=None``
  when sampling it in plain diffusers.

Sampling and exports use ``SanaPipeline`` (its LoRA loader for adapters), so every export loads in plain diffusers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from core.errors import UserError
from models.families import (BaseFamily, FlowMatchingObjective, PromptCache, TextCondition, TransformerBase, check_window,
                             folder_sampler, get_family, load_failure, parts_text, pipeline_source, text_cache_parts)

PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "transformer", "scheduler")
TEXT_WINDOW = 300  # SanaPipeline's max_sequence_length, the window Sana's Gemma-2 conditioning was trained with


class SanaLoadError(UserError, RuntimeError):
    """A Sana folder or hub id could not be read."""


# Gemma-2 conditioning: ``embeds [B, T, D]`` and its ``mask [B, T]`` (1 for prompt tokens, 0 for padding)
SanaCondition = TextCondition


class GemmaConditioning:
    """Sana's conditioning: Gemma-2's last hidden state of each prompt, right-padded to the window, with its mask.

    ``cache_size`` > 0 keeps each distinct prompt's output (only when Gemma-2 is frozen: it never changes then), least
    recently used dropped; :meth:`use_disk` keeps every prompt's on disk too (``text_cache: disk``). ``rewrite`` rewrites
    each prompt first (textual inversion's multi-vector tokens: their rows train, so nothing of theirs is cached)."""

    def __init__(self, base: "Sana", cache_size: int = 0, rewrite=None):
        self.base = base
        self.rewrite = rewrite
        self.cache = PromptCache(cache_size)

    def _encode(self, prompts: Sequence[str]) -> SanaCondition:
        base = self.base
        device = next(base.text_encoder.parameters()).device
        ids, mask = base.tokenize(prompts, device)
        embeds = base.text_encoder(ids, attention_mask=mask)[0]
        return SanaCondition(embeds, mask)

    def __call__(self, prompts: Sequence[str]) -> SanaCondition:
        prompts = [self.rewrite(p) for p in prompts] if self.rewrite else list(prompts)
        if not self.cache.active:
            return self._encode(prompts)
        return self.cache(prompts, self._encode, like=next(self.base.text_encoder.parameters()),
                          device=next(self.base.transformer.parameters()).device)

    def cache_parts(self) -> dict:
        """What a cached condition depends on (:func:`~models.families.text_cache_parts`): Gemma-2, its tokenizer, the
        window, right padding, no complex-human-instruction prefix (as diffusers' Sana script encodes)."""
        return text_cache_parts(self.base, ("text_encoder",), ("tokenizer",), padding="right, to the window",
                                complex_human_instruction=None)

    def use_disk(self, root) -> None:
        """Keep every prompt's condition on disk under ``root`` (``text_cache: disk``); refused with a rewrite, whose
        token rows train."""
        if self.rewrite is not None:
            raise UserError("text_cache: disk caches a frozen text encoder's outputs, but this conditioning rewrites prompts "
                            "into trained token rows (textual inversion); use the memory cache or none")
        self.cache.use_disk(root, self.cache_parts)

    def negative(self, prompts: Sequence[str]) -> SanaCondition:
        return self(prompts)

    def to(self, device) -> None:
        """Nothing of its own: Gemma-2 is part of the base."""

    def window(self, prompts: Sequence[str]) -> dict:
        prompts = [self.rewrite(p) for p in prompts] if self.rewrite else list(prompts)
        return {"encoder": "Gemma-2", "window": self.base.text_window, "too_long": self.base.count_too_long(prompts),
                "handling": f"truncated to Sana's {self.base.text_window}-token Gemma-2 window"}


class Sana(TransformerBase, nn.Module):
    """Frozen Sana parts (``vae``, ``text_encoder``, ``transformer``; ``tokenizer``, ``noise_scheduler``) with the
    base-family interface of :mod:`models.families`."""

    family = "sana"
    default_class_sampler = "euler"
    pipeline_class = "SanaPipeline"
    # prompts are encoded as diffusers' Sana script trains (no complex-human-instruction prefix); SanaPipeline's default
    # at inference adds one, so exports name the argument that samples them as trained
    # and its resolution binning refuses transformers of other sample sizes than its bins' (the tiny presets'): off
    sampling_arguments = {"complex_human_instruction": None, "use_resolution_binning": False}

    def __init__(self, vae, text_encoder, tokenizer, transformer, noise_scheduler, spec, sample_scheduler=None):
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.spec = spec
        # the folder's own sampler (the hub's Sana folders ship a flow DPM-Solver), else Euler on the training schedule
        self._sample_scheduler = sample_scheduler
        for part in (self.vae, self.text_encoder, self.transformer):
            part.requires_grad_(False)
            part.eval()
        self.text_window = check_window(get_family("sana"), spec.max_sequence_length)
        self.objective = FlowMatchingObjective(noise_scheduler)

    # ------------------------------------------------------------------ the base-family interface
    @property
    def default_sampler(self) -> str:
        from diffusers import DPMSolverMultistepScheduler

        return "dpm" if isinstance(self._sample_scheduler, DPMSolverMultistepScheduler) else "euler"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def tokenize(self, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` right-padded to the window, as ``SanaPipeline._get_gemma_prompt_embeds``."""
        self.tokenizer.padding_side = "right"
        out = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_window, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = out.input_ids, out.attention_mask
        return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)

    def count_too_long(self, prompts: Sequence[str]) -> int:
        lengths = self.tokenizer(list(prompts), truncation=False, add_special_tokens=True).input_ids
        return sum(len(ids) > self.text_window for ids in lengths)

    @staticmethod
    def condition(embeds: torch.Tensor, mask: torch.Tensor) -> SanaCondition:
        """The denoiser's condition from a sequence and its mask (the textual projection's output)."""
        return SanaCondition(embeds, mask)

    def conditioning(self, cache_size: int = 0, rewrite=None) -> GemmaConditioning:
        return GemmaConditioning(self, cache_size, rewrite)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SanaCondition:
        return GemmaConditioning(self)(prompts)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: SanaCondition) -> torch.Tensor:
        """The transformer's flow prediction, called as diffusers' Sana script calls it."""
        return self.transformer(hidden_states=noisy, encoder_hidden_states=condition.embeds.to(noisy.dtype),
                                encoder_attention_mask=condition.mask, timestep=timesteps, return_dict=False)[0]

    # ------------------------------------------------------------------ the autoencoder
    def encode_images(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1] (the DC autoencoder is deterministic: ``generator`` is not drawn from)."""
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            latent = self.vae.encode(pixel_values.to(device=vae_param.device, dtype=vae_param.dtype)).latent
        return latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_param = next(self.vae.parameters())
        return self.vae.decode(latents.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent cache's ``(mean, logvar)``: the deterministic latent and zeros (which :meth:`latents_from_posterior`
        does not read)."""
        vae_param = next(self.vae.parameters())
        latent = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype)).latent
        return latent, torch.zeros_like(latent)

    def latents_from_posterior(self, dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean = dist.chunk(2, dim=1)[0]
        vae_dtype = next(self.vae.parameters()).dtype
        return (mean.to(vae_dtype) * self.vae.config.scaling_factor).float()

    # ------------------------------------------------------------------ sampling
    def inference_scheduler(self, name: str):
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        if name == "euler":
            if isinstance(self._sample_scheduler, FlowMatchEulerDiscreteScheduler):
                return FlowMatchEulerDiscreteScheduler.from_config(self._sample_scheduler.config)
            return FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        if name == "dpm":
            if isinstance(self._sample_scheduler, DPMSolverMultistepScheduler):
                return DPMSolverMultistepScheduler.from_config(self._sample_scheduler.config)
            return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                               flow_shift=float(self.noise_scheduler.config.shift))
        raise UserError(f"scheduler {name!r}: a Sana base samples with flow-matching schedulers: euler or dpm")

    @torch.no_grad()
    def sample(self, prompt_embeds: SanaCondition, negative_prompt_embeds: SanaCondition, seeds: Sequence[int], steps: int = 25,
               guidance: float = 4.5, height: Optional[int] = None, width: Optional[int] = None,
               scheduler: Optional[str] = None) -> torch.Tensor:
        """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU, one seed per image (its starting noise from its own seed)."""
        return self.sample_masked(prompt_embeds, negative_prompt_embeds, seeds, steps, guidance, height, width, scheduler)


# ---------------------------------------------------------------------- loading
def _how_to_get(spec) -> str:
    return (f"Sana weights {spec.pretrained!r} could not be loaded. Pass a local folder holding a diffusers SanaPipeline "
            f"({parts_text(PARTS)}), e.g. one made with `huggingface-cli download "
            "Efficient-Large-Model/Sana_600M_512px_diffusers --local-dir sana-600m` on a machine with internet access, or "
            "make sure the hub id is in your Hugging Face cache (HF_HOME)")


def load(spec, source_spec) -> Sana:
    """Sana from a folder or hub id (``source_spec`` reads the files; ``spec`` is what the base records)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import AutoTokenizer, Gemma2Model

    source = pipeline_source(source_spec, PARTS, SanaLoadError, "a Sana", _how_to_get(spec))
    kwargs = dict(revision=source_spec.revision, local_files_only=source_spec.local_files_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = Gemma2Model.from_pretrained(source, subfolder="text_encoder", **kwargs)
        vae = AutoencoderDC.from_pretrained(source, subfolder="vae", **kwargs)
        transformer = SanaTransformer2DModel.from_pretrained(source, subfolder="transformer", **kwargs)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        sample_scheduler = folder_sampler(source, FlowMatchEulerDiscreteScheduler, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise SanaLoadError(f"{_how_to_get(spec)}. Underlying error: {load_failure(err)}") from None
    return Sana(vae, text_encoder, tokenizer, transformer, noise_scheduler, spec, sample_scheduler)


FAMILY = BaseFamily(name="sana", pipelines=("SanaPipeline",), parts=PARTS, load=load, text_window=TEXT_WINDOW,
                    objective="flow-matching")
