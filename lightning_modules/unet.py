"""U-Net fine-tuning (paper §2.7, after DreamBooth): train the U-Net, keep VAE and CLIP frozen.

With prior preservation (``prior_preservation``) the datamodule serves class images beside each batch; they are
generated once by the frozen base model at the start of fit (each rank its share) and cached on disk
(:mod:`lightning_modules.preparation`).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from core.cache import cache_root
from lightning_modules.base import DiffusionModule, ModuleConfigError
from lightning_modules.preparation import Needs, TextConditions
from models.exports import write_manifest
from models.generator import ClipConditioning

TEXT_CACHES = ("memory", "disk")

class CachedClipConditioning(ClipConditioning):
    """CLIP's conditioning with each distinct prompt's output kept (CLIP is frozen, so it never changes): at most
    ``size`` prompts, least recently used dropped, on the text encoder's device and dtype."""

    def __init__(self, sd, size: int):
        super().__init__(sd)
        self.size = max(int(size), 0)
        self.cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        cache = self.cache
        param = next(self.sd.text_encoder.parameters())
        if cache and (next(iter(cache.values())).device != param.device or next(iter(cache.values())).dtype != param.dtype):
            cache.clear()  # the text encoder moved or changed precision
        for p in dict.fromkeys(prompts):  # one by one: a cached value must not depend on the batch it was made in
            if p not in cache:  # (batched products round otherwise; a resumed run meets its prompts in other batches)
                cache[p] = self.sd.encode_prompts([p])[0]
        for p in prompts:
            cache.move_to_end(p)
        out = torch.stack([cache[p] for p in prompts])
        while len(cache) > self.size:
            cache.popitem(last=False)
        return out


class UNetFineTuning(DiffusionModule):
    """Fine-tune the denoiser on image–prompt pairs: Stable Diffusion's U-Net, or a DiT family's transformer (Sana).

    Args:
        cache_text: keep CLIP's output for each distinct prompt (CLIP is frozen here, so a prompt's
            conditioning never changes); at most ``text_cache_size`` prompts, least recently used dropped.
        text_cache_size: how many prompts' ``[77, 768]`` conditioning the cache holds (on the model's device).
        text_cache: ``memory`` (the cache above) or ``disk``: every prompt's condition also in
            ``<cache>/text_conditions/<key>`` (one safetensors file per prompt), all training prompts encoded once at fit
            start and the frozen text encoders then moved to the CPU (Sana, SD 3.5, PixArt-Σ; not Stable Diffusion).
        text_cache_dir: the cache root of ``text_cache: disk`` (default ``$CXR_DIFFUSION_CACHE``).
        **kwargs: see :class:`~lightning_modules.base.DiffusionModule` (``prior_preservation``, ``gradient_checkpointing``
            and the other speed settings are there).
    """

    def __init__(self, cache_text: bool = True, text_cache_size: int = 1024, text_cache: Literal["memory", "disk"] = "memory",
                 text_cache_dir: Optional[str] = None, **kwargs):
        if text_cache not in TEXT_CACHES:
            raise ModuleConfigError(f"text_cache: {text_cache!r}; expected one of {', '.join(TEXT_CACHES)}")
        if text_cache == "disk" and not cache_text:
            raise ModuleConfigError("text_cache: disk caches the text encoders' outputs, but cache_text is false; set "
                                    "cache_text: true or text_cache: memory")
        super().__init__(**kwargs)

    def configure_trainable(self) -> ClipConditioning:
        self.sd.denoiser.requires_grad_(True)
        self.sd.denoiser.train()
        return self.frozen_clip_conditioning()

    def frozen_clip_conditioning(self) -> ClipConditioning:
        """The text conditioning while the text encoder is frozen: with ``cache_text``, each distinct prompt's output is
        kept (CLIP's here; another family's own conditioning keeps its own, e.g. Sana's Gemma-2 output and mask)."""
        disk = self.hparams.get("text_cache", "memory") == "disk"
        if self.sd.family != "stable-diffusion":
            conditioning = self.sd.conditioning(self.hparams.text_cache_size if self.hparams.cache_text else 0)
            if disk:
                conditioning.use_disk(cache_root(self.hparams.get("text_cache_dir")))
            return conditioning
        if disk:
            raise ModuleConfigError("text_cache: disk is implemented for the DiT families' large text encoders (Sana, SD 3.5, "
                                    "PixArt-Σ); Stable Diffusion's CLIP is cached in memory: set text_cache: memory")
        if self.hparams.cache_text:
            return CachedClipConditioning(self.sd, self.hparams.text_cache_size)
        return ClipConditioning(self.sd)

    def needs(self) -> Needs:
        """With ``text_cache: disk``, also the text conditions of every training prompt (then the encoders leave the GPU)."""
        needs = super().needs()
        if self.hparams.get("text_cache", "memory") != "disk":
            return needs
        encoders = tuple(p for p in self.sd.text_parts if not p.startswith("tokenizer"))
        return dataclasses.replace(needs, text=TextConditions(self.conditioning, encoders))

    def write_export(self, out_dir: Path) -> Path:
        """The family's diffusers pipeline folder (safetensors, fp32; Stable Diffusion's with PNDM as SD v1.4, Sana's
        ``SanaPipeline`` with its own sampler) and ``export.json``."""
        out = Path(out_dir)
        pipe = self.sd.export_pipeline()
        for part in (pipe.vae, pipe.text_encoder, self.sd.denoiser):  # .float(): diffusers warns on .to(dtype) for some
            part.float()
        pipe.save_pretrained(out, safe_serialization=True)
        trained = [name for name in (self.sd.denoiser_name, "text_encoder")
                   if any(p.requires_grad for p in getattr(self.sd, name).parameters())]
        write_manifest(out, "pipeline", type(self).__name__, dict(vars(self.spec)), trained=trained)
        return out
