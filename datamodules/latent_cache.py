"""On-disk cache of VAE posteriors, so the frozen VAE encodes each training image once, not every step.

The VAE is frozen in all three strategies, yet the diffusers training scripts encode every image at
every step. Here each image's posterior is encoded once and stored as its **distribution**: the mean
and log-variance ``[C, h, w]`` of the diagonal Gaussian. Training then draws
``mean + exp(logvar / 2) · ε`` with the step's own generator, exactly as ``latent_dist.sample`` would, so
sampling stays stochastic and a cached run follows the same trajectory as an uncached one.

Layout: ``<cache root>/latents/<key>/`` with ``mean.npy`` and ``logvar.npy`` (float32, memory-mapped),
``ids.json`` (row order) and ``COMPLETE.json`` (what the key was made of). The key hashes the VAE
(its spec's cache key), the preprocessing (``preprocessing_id``), the resolution and the image list,
so changing any of them builds a new cache instead of reusing a stale one. A cache is written into a
temporary folder and renamed into place when complete: an interrupted build is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

COMPLETE = "COMPLETE.json"
FORMAT_VERSION = 1


@dataclass
class LatentCachePlan:
    """What to encode: image ids, a loader giving each image as a ``[3, H, W]`` tensor in [-1, 1], and the key parts."""

    root: Path  # the cache root; the cache goes to root / "latents" / key
    ids: list[str]
    load: Callable[[str], torch.Tensor]
    key_parts: dict  # model, preprocessing, resolution, ... (JSON-serialisable)

    @property
    def key(self) -> str:
        parts = dict(self.key_parts, ids_sha1=hashlib.sha1("\n".join(self.ids).encode()).hexdigest(), version=FORMAT_VERSION)
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def directory(self) -> Path:
        return Path(self.root) / "latents" / self.key


class LatentCache:
    """A complete cache, memory-mapped: ``cache.get(image_id) -> [2C, h, w]`` (mean and log-variance stacked on channels)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not (self.directory / COMPLETE).is_file():
            raise FileNotFoundError(f"{self.directory}: no complete latent cache here ({COMPLETE} missing)")
        self.info = json.loads((self.directory / COMPLETE).read_text())
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
        return (Path(directory) / COMPLETE).is_file()


def build_latent_cache(plan: LatentCachePlan, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int = 16, progress: bool = True) -> LatentCache:
    """Encode every image of ``plan`` with ``encode(pixels) -> (mean, logvar)`` and return the cache.

    Written to a temporary sibling folder and renamed into place; if another process finished the same
    cache first, its copy is kept and this one discarded.
    """
    from tqdm.auto import tqdm

    target = plan.directory
    if LatentCache.is_complete(target):
        return LatentCache(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        mean_mm = logvar_mm = None
        for start in tqdm(range(0, len(plan.ids), batch_size), desc="caching VAE latents", unit="batch", disable=not progress):
            ids = plan.ids[start:start + batch_size]
            pixels = torch.stack([plan.load(i) for i in ids])
            with torch.no_grad():
                mean, logvar = encode(pixels)
            mean, logvar = mean.float().cpu().numpy(), logvar.float().cpu().numpy()
            if mean_mm is None:
                shape = (len(plan.ids), *mean.shape[1:])
                mean_mm = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=np.float32, shape=shape)
                logvar_mm = np.lib.format.open_memmap(tmp / "logvar.npy", mode="w+", dtype=np.float32, shape=shape)
            mean_mm[start:start + len(ids)] = mean
            logvar_mm[start:start + len(ids)] = logvar
        if mean_mm is None:
            raise ValueError("the latent cache plan has no images")
        mean_mm.flush()
        logvar_mm.flush()
        del mean_mm, logvar_mm
        (tmp / "ids.json").write_text(json.dumps(plan.ids))
        (tmp / COMPLETE).write_text(json.dumps(dict(plan.key_parts, n_images=len(plan.ids), version=FORMAT_VERSION), indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if not LatentCache.is_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LatentCache(target)


def sample_latents(dist: torch.Tensor, generator: torch.Generator, scaling_factor: float, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents from cached ``[B, 2C, h, w]`` posteriors, drawing ε exactly as diffusers'
    ``DiagonalGaussianDistribution.sample(generator)`` does (shape ``[B, C, h, w]``, the VAE's dtype, CPU generator)."""
    mean, logvar = dist.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(mean.shape, generator=generator, dtype=dtype).to(mean.device)
    return (mean.to(dtype) + std.to(dtype) * eps) * scaling_factor

