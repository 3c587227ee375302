"""VAE posteriors cached on disk, so the frozen VAE encodes each training image once, not every step.

The VAE is frozen in every strategy, yet the diffusers training scripts encode every image at every step. Here each
image's posterior is encoded once and stored as its **distribution**: the mean and log-variance ``[C, h, w]`` of the
diagonal Gaussian. Training then draws ``mean + exp(logvar / 2) · ε`` with the step's own generator, exactly as
``latent_dist.sample`` would (:func:`sample_latents`), so sampling stays stochastic and a cached run follows the same
trajectory as an uncached one.

A cache is a :mod:`core.cache` entry of kind ``latents``: ``mean.<first row>.npy`` and ``logvar.<first row>.npy``
(float32 row blocks, memory-mapped, one block per process that encoded it: :class:`core.cache.RowBlocks`),
``ids.json`` (row order) and ``ENTRY.json``. Its key covers the VAE (its spec's cache key and the dtype it encoded in),
the preprocessing, the resolution and the image list, so changing any of them builds a new cache instead of reusing a
stale one; an interrupted build is never read, and two runs building one entry at once take turns (the entry's lock).

Building (:func:`build_latent_cache` in one process; :func:`encode_rows` per DDP rank, each its contiguous block of rows,
as ``lightning_modules.preparation`` does): images are decoded in a ``DataLoader`` (``num_workers`` processes), so PNG
decoding overlaps the VAE.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.cache import ENTRY_FILE, CacheEntry, RowBlocks, create_row_block
from models.families import sample_latents  # noqa: F401  (the draw from cached posteriors; it lives with the autoencoders)

KIND = "latents"
FORMAT_VERSION = 3  # 3: row blocks (one per encoding rank) and the VAE's dtype in the key; version 2 entries are rebuilt


@dataclass
class LatentCachePlan:
    """What to encode: image ids, a loader giving each image as a ``[3, H, W]`` tensor in [-1, 1], and the key parts."""

    root: Path  # the cache root; the cache goes to root / "latents" / key
    ids: list[str]
    load: Callable[[str], torch.Tensor]
    key_parts: dict  # model, VAE dtype, preprocessing, resolution, ... (JSON-serialisable)

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
        self.mean = RowBlocks(self.directory, "mean")
        self.logvar = RowBlocks(self.directory, "logvar")
        if len(self.mean) != len(self.ids) or len(self.logvar) != len(self.ids):
            raise FileNotFoundError(f"{self.directory}: the latent cache holds {len(self.mean)} posteriors for "
                                    f"{len(self.ids)} images; delete it to build it again")

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


class _Images(torch.utils.data.Dataset):
    """Rows ``start .. stop - 1`` of a plan, as ``(row, pixels)``, for the decoding DataLoader."""

    def __init__(self, plan: LatentCachePlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        row = self.start + i
        return row, self.plan.load(self.plan.ids[row])


def encode_rows(plan: LatentCachePlan, folder: Path, start: int, stop: int,
                encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batch_size: int = 16,
                num_workers: int = 0, progress: bool = True) -> None:
    """Encode rows ``start .. stop - 1`` of ``plan`` into their own row blocks ``mean/logvar.<start>.npy`` in ``folder``
    (what one process writes of a shared build). Images are decoded by ``num_workers`` DataLoader processes (0: here),
    forked, so the plan's loader need not be picklable."""
    from tqdm.auto import tqdm

    if stop <= start:
        return
    workers = int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    fork = "fork" in multiprocessing.get_all_start_methods()
    loader = torch.utils.data.DataLoader(_Images(plan, start, stop), batch_size=int(batch_size), num_workers=workers,
                                         multiprocessing_context="fork" if workers and fork else None)
    mean_mm = logvar_mm = None
    for rows, pixels in tqdm(loader, desc="caching VAE latents", unit="batch", disable=not progress):
        with torch.no_grad():
            mean, logvar = encode(pixels)
        mean, logvar = mean.float().cpu().numpy(), logvar.float().cpu().numpy()
        if mean_mm is None:
            shape = (stop - start, *mean.shape[1:])
            mean_mm = create_row_block(folder, "mean", start, shape)
            logvar_mm = create_row_block(folder, "logvar", start, shape)
        first, last = int(rows[0]) - start, int(rows[-1]) - start + 1
        mean_mm[first:last] = mean
        logvar_mm[first:last] = logvar
    mean_mm.flush()
    logvar_mm.flush()


def finish_latent_cache(plan: LatentCachePlan, folder: Path) -> dict:
    """Write ``ids.json`` into a built partial folder, after checking that its row blocks hold every image; returns
    what goes into ``ENTRY.json`` besides the parts."""
    rows = len(RowBlocks(folder, "mean"))
    if rows != len(plan.ids) or len(RowBlocks(folder, "logvar")) != rows:
        raise RuntimeError(f"{folder}: the encoded row blocks hold {rows} posteriors, not {len(plan.ids)}")
    (Path(folder) / "ids.json").write_text(json.dumps(plan.ids))
    return {"n_images": len(plan.ids)}


def build_latent_cache(plan: LatentCachePlan, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int = 16, num_workers: int = 0, progress: bool = True) -> LatentCache:
    """Encode every image of ``plan`` with ``encode(pixels) -> (mean, logvar)`` and return the cache (or the complete
    cache already there, or the one another process built while this one waited for the entry's lock)."""
    entry = plan.entry
    if entry.is_complete():
        return LatentCache(entry.path)
    if not plan.ids:
        raise ValueError("the latent cache plan has no images")
    with entry.lock():
        if not entry.is_complete():  # else another process built it while we waited
            folder = entry.begin()
            try:
                encode_rows(plan, folder, 0, len(plan.ids), encode, batch_size, num_workers, progress)
                extra = finish_latent_cache(plan, folder)
            except BaseException:
                entry.abort()
                raise
            entry.commit(**extra)
    return LatentCache(entry.path)


