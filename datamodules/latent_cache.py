"""VAE posteriors cached on disk, so the frozen VAE encodes each training image once, not every step.

The VAE is frozen in every strategy, yet the diffusers training scripts encode every image at every step. Here each
image's posterior is encoded once and stored as its **distribution**: the mean and log-variance ``[C, h, w]`` of the
diagonal Gaussian. Training then draws ``mean + exp(logvar / 2) · ε`` with the step's own generator, exactly as
``latent_dist.sample`` would (:func:`sample_latents`), so sampling stays stochastic and a cached run follows the same
trajectory as an uncached one.

A cache is a :mod:`core.cache` entry of kind ``latents``: ``mean.npy`` and ``logvar.npy`` (float32, memory-mapped),
``ids.json`` (row order) and ``ENTRY.json``. Its key covers the VAE (its spec's cache key), the preprocessing, the
resolution and the image list, so changing any of them builds a new cache instead of reusing a stale one; an
interrupted build is never read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.cache import ENTRY_FILE, CacheEntry

KIND = "latents"
FORMAT_VERSION = 2


@dataclass
class LatentCachePlan:
    """What to encode: image ids, a loader giving each image as a ``[3, H, W]`` tensor in [-1, 1], and the key parts."""

    root: Path  # the cache root; the cache goes to root / "latents" / key
    ids: list[str]
    load: Callable[[str], torch.Tensor]
    key_parts: dict  # model, preprocessing, resolution, ... (JSON-serialisable)

    @property
    def entry(self) -> CacheEntry:
        parts = dict(self.key_parts, ids_sha1=hashlib.sha1("\n".join(self.ids).encode()).hexdigest(), version=FORMAT_VERSION)
        return CacheEntry(KIND, parts, root=Path(self.root))

    @property
    def directory(self) -> Path:
        return self.entry.path


class LatentCache:
    """A complete cache, memory-mapped: ``cache.get(image_id) -> [2C, h, w]`` (mean and log-variance stacked on channels)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.is_complete(self.directory):
            raise FileNotFoundError(f"{self.directory}: no complete latent cache here ({ENTRY_FILE} missing)")
        entry = json.loads((self.directory / ENTRY_FILE).read_text())
        self.info = {**entry["parts"], "n_images": entry.get("n_images")}
        self.ids = json.loads((self.directory / "ids.json").read_text())
        self.row = {i: r for r, i in enumerate(self.ids)}
        self.mean = np.load(self.directory / "mean.npy", mmap_mode="r")
        self.logvar = np.load(self.directory / "logvar.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, image_id: str) -> torch.Tensor:
        """``[2C, h, w]`` float32: mean then log-variance of one image's posterior."""
        try:
            r = self.row[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not in the latent cache {self.directory} (built for {len(self.ids)} images)") from None
        return torch.from_numpy(np.concatenate([self.mean[r], self.logvar[r]], axis=0))

    @staticmethod
    def is_complete(directory: Path | str) -> bool:
        return (Path(directory) / ENTRY_FILE).is_file()


def build_latent_cache(plan: LatentCachePlan, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int = 16, progress: bool = True) -> LatentCache:
    """Encode every image of ``plan`` with ``encode(pixels) -> (mean, logvar)`` and return the cache (or the complete
    cache already there)."""
    from tqdm.auto import tqdm

    entry = plan.entry
    if entry.is_complete():
        return LatentCache(entry.path)
    if not plan.ids:
        raise ValueError("the latent cache plan has no images")
    with entry.build(n_images=len(plan.ids)) as folder:
        mean_mm = logvar_mm = None
        for start in tqdm(range(0, len(plan.ids), batch_size), desc="caching VAE latents", unit="batch", disable=not progress):
            ids = plan.ids[start:start + batch_size]
            with torch.no_grad():
                mean, logvar = encode(torch.stack([plan.load(i) for i in ids]))
            mean, logvar = mean.float().cpu().numpy(), logvar.float().cpu().numpy()
            if mean_mm is None:
                shape = (len(plan.ids), *mean.shape[1:])
                mean_mm = np.lib.format.open_memmap(folder / "mean.npy", mode="w+", dtype=np.float32, shape=shape)
                logvar_mm = np.lib.format.open_memmap(folder / "logvar.npy", mode="w+", dtype=np.float32, shape=shape)
            mean_mm[start:start + len(ids)] = mean
            logvar_mm[start:start + len(ids)] = logvar
        mean_mm.flush()
        logvar_mm.flush()
        del mean_mm, logvar_mm
        (folder / "ids.json").write_text(json.dumps(plan.ids))
    return LatentCache(entry.path)


def sample_latents(dist: torch.Tensor, generator: torch.Generator, scaling_factor: float, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents from cached ``[B, 2C, h, w]`` posteriors, drawing ε exactly as diffusers'
    ``DiagonalGaussianDistribution.sample(generator)`` does (shape ``[B, C, h, w]``, the VAE's dtype, CPU generator)."""
    mean, logvar = dist.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(mean.shape, generator=generator, dtype=dtype).to(mean.device)
    return (mean.to(dtype) + std.to(dtype) * eps) * scaling_factor
