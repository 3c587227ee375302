"""The typed contract between a strategy and its datamodule, for what is prepared once at the start of fit.

A datamodule that trains a strategy implements :class:`TrainingData`: it says which prompts, images or captions it
trains on, and it receives what was prepared from them (:class:`Prepared`): VAE latents to serve instead of pixels,
class images to serve beside each batch (prior preservation). The preparation itself (generating class images,
encoding latents and document embeddings, all through :mod:`core.cache`) is one component on the model side,
``lightning_modules.preparation``. Nothing is probed with ``hasattr``: a datamodule either implements the protocol or
fit stops with an error naming what is missing.

Batches (DESIGN): image datamodules yield ``{"pixel_values" [B,3,H,W] in [-1,1] | "latent_dist" [B,2C,h,w], "prompt",
"finding", "labels", "dicom_id"}``, and ``{"instance": batch, "prior": batch}`` with prior preservation; caption
datamodules yield ``{"caption", "index"}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSet:
    """Training images a model may encode once: their ids, a loader giving each as ``[3, H, W]`` in [-1, 1], what the
    pixels depend on (``key_parts``: source, resolution, preprocessing) for cache keys, and the cache root the
    datamodule uses (what is made from these images is cached there too)."""

    ids: tuple[str, ...]
    load: Callable[[str], torch.Tensor]
    key_parts: dict
    resolution: int
    cache_root: Path


@dataclass(frozen=True)
class CaptionSet:
    """Training captions a model may encode once: ``captions_at(rows) -> list[str]`` for rows ``0 .. count-1``, and a key
    that changes whenever the caption at some row would."""

    key: str
    count: int
    captions_at: Callable[[np.ndarray], list[str]]


@dataclass(frozen=True)
class ClassImages:
    """Prior-preservation images made by the base model: ``count`` PNGs in ``directory`` for ``prompt``."""

    directory: Path
    prompt: str
    count: int
    resolution: int

    def path(self, index: int) -> Path:
        return Path(self.directory) / f"class_{index:05d}.png"

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.path(i).is_file()]

    @staticmethod
    def image_id(index: int) -> str:
        """The latent-cache id of class image ``index`` (dicom_ids never contain ':')."""
        return f"class:{index:05d}"


@dataclass
class Prepared:
    """What was prepared: latents to serve (by image id) and class images to serve, for the datamodule; document
    embeddings, which the strategy looks up itself."""

    latents: Optional[object] = None  # datamodules.latent_cache.LatentCache
    class_images: Optional[ClassImages] = None
    documents: Optional[object] = None  # lightning_modules.preparation.DocumentEmbeddings


@runtime_checkable
class TrainingData(Protocol):
    def training_prompts(self) -> list[str]:
        """Every training prompt, once per image (to warn about prompts longer than the text encoder's window)."""

    def training_findings(self) -> list[str]:
        """The findings the training images were selected for (empty for caption data)."""

    def training_images(self) -> Optional[ImageSet]:
        """The training images, or None when there are none (captions) or they cannot be cached (random flips)."""

    def training_captions(self) -> Optional[CaptionSet]:
        """The training captions, or None for image data."""

    def use_prepared(self, prepared: Prepared) -> None:
        """Serve what was prepared from now on (called before the training dataloader is built)."""

    def manifest(self) -> dict:
        """What the run trains and validates on, for the run folder's ``data.json`` (ids only: no pixels, no text)."""


@runtime_checkable
class RealImages(Protocol):
    """Real images a callback may compare with or show (FID reference, ``log_real_images``)."""

    def validation_images(self, finding: str, limit: int) -> list[str]:
        """Ids of up to ``limit`` validation images of ``finding``, in a fixed order."""

    def read_images(self, ids: Sequence[str]) -> np.ndarray:
        """uint8 ``[N, H, W]`` gray images at the training resolution."""

    def real_image_examples(self, n: int) -> tuple[list, list[str]]:
        """The first ``n`` training images (PIL) and a caption for each."""


def require(datamodule, protocol, what: str):
    """``datamodule`` if it implements ``protocol``; else one error naming the datamodule and what it lacks."""
    if isinstance(datamodule, protocol):
        return datamodule
    missing = [name for name in protocol.__dict__ if not name.startswith("_") and callable(protocol.__dict__[name])
               and not hasattr(datamodule, name)]
    raise TypeError(f"{what} needs a datamodule that implements {protocol.__name__} ({', '.join(missing)} missing on "
                    f"{type(datamodule).__name__})")
