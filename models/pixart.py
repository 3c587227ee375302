"""The PixArt-Σ family (CheXGenBench's second base, FID 60 on RAD-DINO features): a DiT (``PixArtTransformer2DModel``)
trained as DDPM (ε prediction, with a learned variance: the transformer outputs ``2 x`` the latent channels) on
SDXL's 4-channel ``AutoencoderKL``, conditioned by T5 (``T5EncoderModel``'s last hidden state with its attention mask;
a 300-token window).

The training maths follow diffusers' ``examples/research_projects/pixart/train_pixart_controlnet_hf.py`` (the only
PixArt training script in diffusers; it trains PixArt-α's ControlNet adapter on the same transformer call):

* latents ``vae.encode(x).latent_dist.sample() * scaling_factor`` (SDXL's VAE: no shift);
* the training schedule is ``DDPMScheduler.from_pretrained(<folder>, subfolder="scheduler")``, as the script (the hub's
  PixArt-Σ folders ship a ``DPMSolverMultistepScheduler`` config: linear betas 1e-4 .. 0.02, 1000 steps, ε);
* the objective is :class:`~models.families.DDPMObjective` (noise, uniform integer timesteps, ``add_noise``, target ε or
  v; Min-SNR-γ optional, as the script's ``--snr_gamma``);
* the transformer is called as the script calls it (``encoder_attention_mask``, ``added_cond_kwargs`` with resolution
  and aspect ratio set to None: PixArt-Σ's transformers have no micro-conditions, ``use_additional_conditions`` false;
  one that has them, PixArt-α 1024's, is refused at load since ``PixArtSigmaPipeline`` never passes them); its output's
  first half along the channels (ε) is the prediction, as the script's ``model_pred.chunk(2, dim=1)[0]`` when
  ``out_channels // 2 == latent_channels``. The variance half takes no loss and so no gradient (the script's choice;
  PixArt's own training adds a variational-bound term for it, which neither diffusers nor we do);
* prompts are tokenized as ``PixArtSigmaPipeline.encode_prompt``: lower-cased and stripped (its ``clean_caption=False``
  preprocessing), right-padded to 300 tokens with ``</s>``, the attention mask passed to T5 and to the transformer. The
  script tokenizes the raw caption at 120 tokens (PixArt-α's window); we differ on purpose, so that training conditions
  the transformer exactly as the Σ pipeline will at sampling.

Sampling and exports use ``PixArtSigmaPipeline``. Its pipelines have no LoRA loader (``PixArtTransformer2DModel`` has no
``PeftAdapterMixin``), so LoRA adapters are injected with peft (``inject_adapter_in_model``) and exported as peft's
adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(
pipe.transformer, folder)`` loads onto a plain pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from core.errors import UserError
from models.families import (BaseFamily, DDPMObjective, KLAutoencoder, PromptCache, TextCondition, TransformerBase, check_window,
                             folder_sampler, get_family, load_failure, parts_text, pipeline_source, text_cache_parts)

PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "transformer", "scheduler")
TEXT_WINDOW = 300  # PixArtSigmaPipeline's max_sequence_length, the window PixArt-Σ's T5 conditioning was trained with
SAMPLERS = ("dpm", "ddim", "euler")
LORA_WEIGHTS = "adapter_model.safetensors"  # peft's adapter folder (PeftModel.save_pretrained's names)
LORA_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # the key prefix PeftModel.from_pretrained expects in an adapter file


class PixArtLoadError(UserError, RuntimeError):
    """A PixArt-Σ folder or hub id could not be read, or holds what this family does not implement."""


# T5 conditioning: ``embeds [B, T, D]`` and its ``mask [B, T]`` (1 for prompt tokens and ``</s>``, 0 for padding)
PixArtCondition = TextCondition


class T5Conditioning:
    """PixArt-Σ's conditioning: T5's last hidden state of each prompt, right-padded to the window, with its mask.

    ``cache_size`` > 0 keeps each distinct prompt's output (T5 is frozen on every strategy that runs on PixArt-Σ, so
    it never changes), least recently used dropped; :meth:`use_disk` keeps every prompt's on disk too."""

    def __init__(self, base: "PixArtSigma", cache_size: int = 0):
        self.base = base
        self.cache = PromptCache(cache_size)

    def _encode(self, prompts: Sequence[str]) -> PixArtCondition:
        base = self.base
        device = next(base.text_encoder.parameters()).device
        ids, mask = base.tokenize(prompts, device)
        return PixArtCondition(base.text_encoder(ids, attention_mask=mask)[0], mask)

    def __call__(self, prompts: Sequence[str]) -> PixArtCondition:
        prompts = list(prompts)
        if not self.cache.active:
            return self._encode(prompts)
        return self.cache(prompts, self._encode, like=next(self.base.text_encoder.parameters()),
                          device=next(self.base.transformer.parameters()).device)

    def cache_parts(self) -> dict:
        """What a cached condition depends on (:func:`~models.families.text_cache_parts`): T5, its tokenizer, the window,
        the pipeline's preprocessing (lower-cased, stripped) and right padding."""
        return text_cache_parts(self.base, ("text_encoder",), ("tokenizer",), preprocessing="lower-cased and stripped",
                                padding="right, to the window")

    def use_disk(self, root) -> None:
        """Keep every prompt's condition on disk under ``root`` too (``text_cache: disk``)."""
        self.cache.use_disk(root, self.cache_parts)

    def negative(self, prompts: Sequence[str]) -> PixArtCondition:
        return self(prompts)

    def to(self, device) -> None:
        """Nothing of its own: T5 is part of the base."""

    def window(self, prompts: Sequence[str]) -> dict:
        return {"encoder": "T5", "window": self.base.text_window, "too_long": self.base.count_too_long(prompts),
                "handling": f"truncated to PixArt-Σ's {self.base.text_window}-token T5 window"}


class PixArtSigma(TransformerBase, KLAutoencoder, nn.Module):
    """Frozen PixArt-Σ parts (``vae``, ``text_encoder``, ``transformer``; ``tokenizer``, ``noise_scheduler``) with the
    base-family interface of :mod:`models.families`."""

    family = "pixart"
    pipeline_class = "PixArtSigmaPipeline"
    # The suite samples at exactly the size asked for (the trained one). PixArtSigmaPipeline's default resolution
    # binning snaps a size to its aspect-ratio bins, and refuses transformers of other sample sizes than 32, 64, 128 and
    # 256 (the tiny preset's is 16); at a real model's native square size it changes nothing.
    sampling_arguments = {"use_resolution_binning": False}

    def __init__(self, vae, text_encoder, tokenizer, transformer, noise_scheduler, spec, sample_scheduler=None):
        super().__init__()
        if getattr(transformer, "use_additional_conditions", False):
            raise PixArtLoadError(
                f"{spec.pretrained}: the transformer takes resolution and aspect-ratio micro-conditions "
                "(use_additional_conditions, PixArt-α 1024's), which PixArtSigmaPipeline never passes; PixArt-Σ bases have none")
        self.vae = vae
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.spec = spec
        self._sample_scheduler = sample_scheduler  # the folder's own sampler (the hub's: DPM-Solver++)
        for part in (self.vae, self.text_encoder, self.transformer):
            part.requires_grad_(False)
            part.eval()
        self.text_window = check_window(get_family("pixart"), spec.max_sequence_length)
        self.objective = DDPMObjective(noise_scheduler)

    # ------------------------------------------------------------------ the base-family interface
    default_sampler = "dpm"  # PixArtSigmaPipeline's (the hub folders' DPMSolverMultistepScheduler)
    default_class_sampler = "dpm"  # prior preservation's class images: the base's own sampler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @staticmethod
    def preprocess(prompts: Sequence[str]) -> list[str]:
        """``PixArtSigmaPipeline._text_preprocessing(clean_caption=False)``: lower-cased and stripped."""
        return [str(p).lower().strip() for p in prompts]

    def tokenize(self, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` right-padded to the window, as ``PixArtSigmaPipeline.encode_prompt``."""
        out = self.tokenizer(self.preprocess(prompts), padding="max_length", max_length=self.text_window, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = out.input_ids, out.attention_mask
        return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)

    def count_too_long(self, prompts: Sequence[str]) -> int:
        lengths = self.tokenizer(self.preprocess(prompts), truncation=False, add_special_tokens=True).input_ids
        return sum(len(ids) > self.text_window for ids in lengths)

    def conditioning(self, cache_size: int = 0) -> T5Conditioning:
        return T5Conditioning(self, cache_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PixArtCondition:
        return T5Conditioning(self)(prompts)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: PixArtCondition) -> torch.Tensor:
        """The transformer's ε prediction, called as diffusers' PixArt script calls it; the learned-variance half of its
        output is dropped (``chunk(2, dim=1)[0]``), as the script and ``PixArtSigmaPipeline`` do."""
        out = self.transformer(noisy, encoder_hidden_states=condition.embeds.to(noisy.dtype), encoder_attention_mask=condition.mask,
                               timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                               return_dict=False)[0]
        if self.transformer.config.out_channels // 2 == noisy.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    # the autoencoder: a KL VAE, as Stable Diffusion's (models.families.KLAutoencoder: encode_images, decode_latents, ...)

    # ------------------------------------------------------------------ sampling
    def inference_scheduler(self, name: str):
        """``dpm`` (the folder's DPM-Solver++, PixArtSigmaPipeline's default), ``ddim`` or ``euler`` on the same DDPM
        schedule; ``pndm`` (Stable Diffusion v1's) is not offered here."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
        if name not in classes:
            raise UserError(f"scheduler {name!r}: a PixArt-Σ base samples with {', '.join(SAMPLERS)} (dpm: its own DPM-Solver++)")
        own = self._sample_scheduler
        return classes[name].from_config(own.config if own is not None else self.noise_scheduler.config)

    @torch.no_grad()
    def sample(self, prompt_embeds: PixArtCondition, negative_prompt_embeds: PixArtCondition, seeds: Sequence[int], steps: int = 20,
               guidance: float = 4.5, height: Optional[int] = None, width: Optional[int] = None,
               scheduler: Optional[str] = None) -> torch.Tensor:
        """Images in [0, 1], ``[B, 3, H, W]`` float32 on CPU, one seed per image (its starting noise from its own seed)."""
        return self.sample_masked(prompt_embeds, negative_prompt_embeds, seeds, steps, guidance, height, width, scheduler)

    # ------------------------------------------------------------------ LoRA (the base hooks of lightning_modules/lora.py)
    def add_lora_adapter(self, config) -> None:
        """Adapters on the transformer with peft's ``inject_adapter_in_model`` (what diffusers' ``add_adapter`` does for
        denoisers with ``PeftAdapterMixin``, which ``PixArtTransformer2DModel`` lacks); parameter names stay the
        transformer's own (``...to_q.lora_A.default.weight``)."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, self.transformer)  # sets transformer.peft_config, read by get_peft_model_state_dict

    def save_lora_weights(self, out_dir: Path, state: dict) -> None:
        """peft's adapter folder: ``adapter_config.json`` (lora_alpha = r: the scale is already folded into lora_B) and
        ``adapter_model.safetensors`` keyed as ``PeftModel.save_pretrained`` keys them."""
        import dataclasses

        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = state[self.denoiser_name]
        config = self.transformer.peft_config["default"]
        config = dataclasses.replace(config, lora_alpha=config.r, lora_dropout=0.0, inference_mode=True,
                                     base_model_name_or_path=str(self.spec.pretrained))
        config.save_pretrained(str(out_dir))
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in weights.items()}, str(out_dir / LORA_WEIGHTS),
                  metadata={"format": "pt"})

    def load_lora_weights(self, folder: Path) -> None:
        """A LoRA export (peft's adapter folder) onto this base's transformer, exactly as the plain loading code does."""
        from peft import PeftModel

        folder = Path(folder)
        missing = [name for name in (LORA_CONFIG, LORA_WEIGHTS) if not (folder / name).is_file()]
        if missing:
            raise PixArtLoadError(f"{folder}: not a PixArt-Σ LoRA export: missing {missing} (peft's adapter folder, as "
                                  "export.py writes it for a PixArt-Σ base)")
        PeftModel.from_pretrained(self.transformer, str(folder))  # injects the adapters into self.transformer in place

    def merge_lora(self) -> None:
        """Merge the adapters into the transformer's weights and remove them (``export.py --merge``)."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(self.transformer)
        if hasattr(self.transformer, "peft_config"):
            del self.transformer.peft_config

    def lora_loading_code(self) -> str:
        """How a LoRA export loads in plain diffusers + peft (``export.json``'s ``loading_code``, the model card's)."""
        return "\n".join([f'pipe = PixArtSigmaPipeline.from_pretrained("{self.spec.pretrained}")',
                          "from peft import PeftModel",
                          'PeftModel.from_pretrained(pipe.transformer, "THIS_FOLDER")  # injects the adapters into pipe.transformer'])


# ---------------------------------------------------------------------- loading
def _how_to_get(spec) -> str:
    return (f"PixArt-Σ weights {spec.pretrained!r} could not be loaded. Pass a local folder holding a diffusers "
            f"PixArtSigmaPipeline ({parts_text(PARTS)}); for the 512 px model, whose hub "
            "repository holds its transformer only, make one on a machine with internet access with `PixArtSigmaPipeline."
            "from_pretrained('PixArt-alpha/PixArt-Sigma-XL-2-1024-MS', transformer=PixArtTransformer2DModel.from_pretrained("
            "'PixArt-alpha/PixArt-Sigma-XL-2-512-MS', subfolder='transformer')).save_pretrained('pixart-sigma-512')`, or "
            "make sure the hub id is in your Hugging Face cache (HF_HOME)")


def load(spec, source_spec) -> PixArtSigma:
    """PixArt-Σ from a folder or hub id (``source_spec`` reads the files; ``spec`` is what the base records)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

    source = pipeline_source(source_spec, PARTS, PixArtLoadError, "a PixArt-Σ", _how_to_get(spec))
    kwargs = dict(revision=source_spec.revision, local_files_only=source_spec.local_files_only)
    try:
        tokenizer = T5Tokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = T5EncoderModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        transformer = PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)  # the script's
        sample_scheduler = folder_sampler(source, DDPMScheduler, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise PixArtLoadError(f"{_how_to_get(spec)}. Underlying error: {load_failure(err)}") from None
    return PixArtSigma(vae, text_encoder, tokenizer, transformer, noise_scheduler, spec, sample_scheduler)


FAMILY = BaseFamily(name="pixart", pipelines=("PixArtSigmaPipeline",), parts=PARTS, load=load, text_window=TEXT_WINDOW,
                    objective="ddpm")
