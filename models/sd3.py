"""The SD 3.5 family (Stability AI's Stable Diffusion 3 / 3.5; SD 3.5 medium scores FID 91 on CheXGenBench's RAD-DINO
features): an MM-DiT (``SD3Transformer2DModel``) trained by rectified-flow matching on a 16-channel ``AutoencoderKL`` with
a shift and a scale, conditioned by three text encoders: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``) and T5-XXL
(``T5EncoderModel``).

The training maths follow diffusers' ``examples/dreambooth/train_dreambooth_sd3.py`` and
``train_dreambooth_lora_sd3.py``:

* latents ``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor``, decoded from
  ``latents / scaling_factor + shift_factor``;
* the training schedule ``FlowMatchEulerDiscreteScheduler.from_pretrained(<folder>, subfolder="scheduler")`` (SD 3.5's:
  ``shift=3.0``);
* the prompt encoding of ``StableDiffusion3Pipeline.encode_prompt``: each CLIP's penultimate hidden state (77 tokens),
  the two concatenated on the feature axis and their pooled (projected) outputs concatenated; T5's last hidden state;
  the CLIP part zero-padded to T5's width and put before T5's on the sequence axis;
* the objective :class:`SD3FlowMatchingObjective`: :class:`~models.families.FlowMatchingObjective`'s draw (the scripts'
  default ``--weighting_scheme logit_normal`` is the configs' ``timestep_sampling``) with the scripts' default
  ``--precondition_outputs 1``: the prediction is turned into an estimate of the clean latents
  (``pred * (-σ) + noisy``) and the target is the latents themselves;
* the transformer called with ``pooled_projections`` (the two CLIPs' pooled outputs).

Where we differ on purpose: T5's window is ``StableDiffusion3Pipeline``'s default of 256 tokens (the scripts'
``--max_sequence_length`` defaults to 77), so a model trains with the window it samples with in plain diffusers.

Sampling and exports use ``StableDiffusion3Pipeline`` (its LoRA loader for adapters), so every export loads in plain
diffusers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from models.families import (BaseFamily, Draw, FlowMatchingObjective, KLAutoencoder, PromptCache, TextCondition, TimestepSampling,
                             TransformerBase, check_window, get_family, load_failure, parts_text, pipeline_source,
                             sample_with_pipeline, text_cache_parts)

PARTS = ("model_index.json", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
         "tokenizer_3", "transformer", "scheduler")
TEXT_WINDOW = 256  # StableDiffusion3Pipeline's max_sequence_length (T5's window); the pipeline takes at most 512
SAMPLERS = ("euler", "dpm")


class SD3LoadError(UserError, RuntimeError):
    """An SD 3.5 folder or hub id could not be read."""


class SD3SettingError(UserError, ValueError):
    """A setting that does not fit an SD 3.5 base."""


# SD 3.5's conditioning: ``embeds [B, 77 + T, D]`` (the two CLIPs' penultimate states, padded to T5's width, then T5's)
# and ``pooled [B, P]`` (the two CLIPs' pooled projections, concatenated)
SD3Condition = TextCondition


class SD3FlowMatchingObjective(FlowMatchingObjective):
    """:class:`~models.families.FlowMatchingObjective` with the SD3 scripts' output preconditioning.

    diffusers' ``train_dreambooth_sd3.py`` and ``train_dreambooth_lora_sd3.py`` default to ``--precondition_outputs 1``
    (EDM, Karras et al. 2022, §5): ``model_pred = model_pred * (-sigmas) + noisy_model_input`` and ``target =
    model_input``. The draw is the parent's (noise, then timesteps, from one generator); only the target changes here, and
    the base's :meth:`SD3.denoise` applies :meth:`precondition` to the transformer's output, looking σ up by timestep
    value as the scripts' ``get_sigmas`` does. With ``precondition_outputs=False`` it is the parent's objective (target
    ``noise - latents``), as the scripts with ``--precondition_outputs 0``.
    """

    def __init__(self, scheduler, precondition_outputs: bool = True):
        super().__init__(scheduler)
        self.precondition_outputs = bool(precondition_outputs)

    def draw(self, latents: torch.Tensor, generator: torch.Generator, sampling: Optional[TimestepSampling] = None) -> Draw:
        draw = super().draw(latents, generator, sampling)
        if self.precondition_outputs:
            draw.target = latents  # the scripts' `target = model_input`
        return draw

    def sigmas_of(self, timesteps: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        """σ of each timestep, looked up by value in the training schedule (the scripts' ``get_sigmas``)."""
        schedule = self._timesteps.to(timesteps.device)
        hits = schedule[None, :] == timesteps.reshape(-1, 1).to(schedule.dtype)
        if not bool(hits.any(dim=1).all()):
            raise ValueError("SD3 preconditioning: a timestep is not one of the training schedule's (draw it with the objective)")
        sigmas = self._sigmas.to(timesteps.device)[hits.float().argmax(dim=1)].to(dtype)
        return sigmas.view(-1, *([1] * (ndim - 1)))

    def precondition(self, pred: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if not self.precondition_outputs:
            return pred
        return pred * (-self.sigmas_of(timesteps, noisy.ndim, noisy.dtype)) + noisy


class SD3Conditioning:
    """SD 3.5's conditioning (:class:`SD3Condition`) of prompts, as ``StableDiffusion3Pipeline.encode_prompt``.

    ``cache_size`` > 0 keeps each distinct prompt's output (only while the three encoders are frozen: it never changes
    then; at full size T5-XXL alone is 4.7 B parameters), least recently used dropped; :meth:`use_disk` keeps every
    prompt's on disk too."""

    def __init__(self, base: "SD3", cache_size: int = 0):
        self.base = base
        self.cache = PromptCache(cache_size)

    def __call__(self, prompts: Sequence[str]) -> SD3Condition:
        prompts = list(prompts)
        if not self.cache.active:
            return self.base.encode(prompts)
        return self.cache(prompts, self.base.encode, like=next(self.base.text_encoder_3.parameters()),
                          device=next(self.base.transformer.parameters()).device)

    def cache_parts(self) -> dict:
        """What a cached condition depends on (:func:`~models.families.text_cache_parts`): the three encoders and
        tokenizers, T5's window and the CLIPs' (``StableDiffusion3Pipeline.encode_prompt``: penultimate CLIP states)."""
        return text_cache_parts(self.base, ("text_encoder", "text_encoder_2", "text_encoder_3"),
                                ("tokenizer", "tokenizer_2", "tokenizer_3"), clip_window=self.base.clip_window,
                                clip_states="penultimate (clip_skip None)")

    def use_disk(self, root) -> None:
        """Keep every prompt's condition on disk under ``root`` too (``text_cache: disk``)."""
        self.cache.use_disk(root, self.cache_parts)

    def negative(self, prompts: Sequence[str]) -> SD3Condition:
        return self(prompts)

    def to(self, device) -> None:
        """Nothing of its own: the three encoders are part of the base."""

    def window(self, prompts: Sequence[str]) -> dict:
        base = self.base
        return {"encoder": "CLIP-L + CLIP-G + T5", "window": base.text_window, "too_long": base.count_too_long(prompts),
                "handling": f"truncated to T5's {base.text_window} tokens (the two CLIPs read the first {base.clip_window})"}


class SD3(TransformerBase, KLAutoencoder, nn.Module):
    """Frozen SD 3.5 parts (``vae``, ``text_encoder`` CLIP-L, ``text_encoder_2`` CLIP-G, ``text_encoder_3`` T5,
    ``transformer``; their tokenizers and the ``noise_scheduler``) with the base-family interface of
    :mod:`models.families`."""

    family = "sd3"
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    default_sampler = "euler"  # StableDiffusion3Pipeline's FlowMatchEulerDiscreteScheduler
    default_class_sampler = "euler"
    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3, transformer,
                 noise_scheduler, spec):
        super().__init__()
        self.vae = vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.transformer = transformer
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.noise_scheduler = noise_scheduler
        self.spec = spec
        for part in self.parts():
            part.requires_grad_(False)
            part.eval()
        self.text_window = check_window(get_family("sd3"), spec.max_sequence_length)
        self.objective = SD3FlowMatchingObjective(noise_scheduler)

    def parts(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.transformer]

    # ------------------------------------------------------------------ the base-family interface
    @property
    def sampling_arguments(self) -> dict:
        """Pipeline arguments that sample as trained: the T5 window when it is not the pipeline's default (256)."""
        return {} if self.text_window == TEXT_WINDOW else {"max_sequence_length": self.text_window}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def clip_window(self) -> int:
        """The CLIPs' window (``StableDiffusion3Pipeline.tokenizer_max_length``: the first tokenizer's, 77)."""
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(clip_l_ids, clip_g_ids, t5_ids)``, each padded to its window, as ``StableDiffusion3Pipeline`` tokenizes."""
        prompts = list(prompts)
        clip = [tok(prompts, padding="max_length", max_length=self.clip_window, truncation=True, return_tensors="pt").input_ids
                for tok in (self.tokenizer, self.tokenizer_2)]
        t5 = self.tokenizer_3(prompts, padding="max_length", max_length=self.text_window, truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids
        ids = (clip[0], clip[1], t5)
        return tuple(i.to(device) for i in ids) if device is not None else ids

    def count_too_long(self, prompts: Sequence[str]) -> int:
        """How many prompts are longer than T5's window (they are truncated; CLIP reads the first 77 tokens anyway)."""
        lengths = self.tokenizer_3(list(prompts), truncation=False, add_special_tokens=True).input_ids
        return sum(len(ids) > self.text_window for ids in lengths)

    def encode(self, prompts: Sequence[str]) -> SD3Condition:
        """``StableDiffusion3Pipeline.encode_prompt`` (the SD3 scripts' ``encode_prompt``), gradients where they train."""
        ids_l, ids_g, ids_t5 = self.tokenize(prompts)
        embeds, pooled = [], []
        for ids, encoder in ((ids_l, self.text_encoder), (ids_g, self.text_encoder_2)):
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the pooled output through the projection
            embeds.append(out.hidden_states[-2].to(self.text_encoder.dtype))  # the penultimate layer (clip_skip None)
        clip = torch.cat(embeds, dim=-1)
        t5 = self.text_encoder_3(ids_t5.to(next(self.text_encoder_3.parameters()).device))[0]
        t5 = t5.to(device=clip.device, dtype=self.text_encoder_3.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return SD3Condition(torch.cat([clip, t5], dim=-2), pooled=torch.cat(pooled, dim=-1).to(clip.device))

    def conditioning(self, cache_size: int = 0) -> SD3Conditioning:
        return SD3Conditioning(self, cache_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> SD3Condition:
        return self.encode(prompts)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: SD3Condition) -> torch.Tensor:
        """The transformer's prediction, called as the SD3 scripts call it, preconditioned as they do
        (:class:`SD3FlowMatchingObjective`: an estimate of the clean latents by default)."""
        pred = self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=condition.embeds.to(noisy.dtype),
                                pooled_projections=condition.pooled.to(noisy.dtype), return_dict=False)[0]
        return self.objective.precondition(pred, noisy, timesteps)

    # the autoencoder: a KL VAE with SD 3.5's shift and scale (models.families.KLAutoencoder: latents
    # (z - shift_factor) * scaling_factor, decoded from latents / scaling_factor + shift_factor)

    # ------------------------------------------------------------------ sampling
    def inference_scheduler(self, name: str):
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        if name == "euler":
            return FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        if name == "dpm":
            return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                               flow_shift=float(self.noise_scheduler.config.shift))
        raise SD3SettingError(f"scheduler {name!r}: an SD 3.5 base samples with flow-matching schedulers: euler or dpm")

    def export_pipeline(self):
        """The pipeline ``export.py`` saves (Euler, SD 3.5's own sampler). The strategies cast the VAE, CLIP-L and the
        denoiser to float32 before saving; CLIP-G and T5 are cast here, so no 16-bit training dtype leaks into it."""
        for part in (self.text_encoder_2, self.text_encoder_3):
            part.float()
        return self.pipeline()

    @torch.no_grad()
    def sample(self, prompt_embeds: SD3Condition, negative_prompt_embeds: SD3Condition, seeds: Sequence[int], steps: int = 28,
               guidance: float = 7.0, height: Optional[int] = None, width: Optional[int] = None,
               scheduler: Optional[str] = None) -> torch.Tensor:
        """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU, one seed per image (its starting noise from its own seed)."""
        if len(seeds) != prompt_embeds.shape[0]:
            raise ValueError(f"got {prompt_embeds.shape[0]} prompts but {len(seeds)} seeds")
        dtype = next(self.transformer.parameters()).dtype
        return sample_with_pipeline(
            self, self.pipeline(scheduler), seeds, prompt_embeds.device, height, width,
            prompt_embeds=prompt_embeds.embeds.to(dtype), pooled_prompt_embeds=prompt_embeds.pooled.to(dtype),
            negative_prompt_embeds=negative_prompt_embeds.embeds.to(dtype),
            negative_pooled_prompt_embeds=negative_prompt_embeds.pooled.to(dtype), num_inference_steps=steps,
            guidance_scale=guidance, max_sequence_length=self.text_window)

# ---------------------------------------------------------------------- loading
def _how_to_get(spec) -> str:
    return (f"SD 3.5 weights {spec.pretrained!r} could not be loaded. Pass a local folder holding a diffusers "
            f"StableDiffusion3Pipeline ({parts_text(PARTS)}), e.g. one made with "
            "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir sd35-medium` on a machine with "
            "internet access (accept the model licence on the Hub first), or make sure the hub id is in your Hugging Face "
            "cache (HF_HOME)")


def load(spec, source_spec) -> SD3:
    """SD 3.5 from a folder or hub id (``source_spec`` reads the files; ``spec`` is what the base records)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    source = pipeline_source(source_spec, PARTS, SD3LoadError, "an SD 3.5", _how_to_get(spec))
    kwargs = dict(revision=source_spec.revision, local_files_only=source_spec.local_files_only)
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
                      CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs),
                      T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **kwargs)]
        encoders = [CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", **kwargs),
                    CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kwargs),
                    T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **kwargs)]
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **kwargs)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise SD3LoadError(f"{_how_to_get(spec)}. Underlying error: {load_failure(err)}") from None
    return SD3(vae, *encoders, *tokenizers, transformer, noise_scheduler, spec)


FAMILY = BaseFamily(name="sd3", pipelines=("StableDiffusion3Pipeline",), parts=PARTS, load=load, text_window=TEXT_WINDOW,
                    objective="flow-matching")
