"""Statistics of the generation study: FID and KID with their N, bootstrap intervals, diversity.

* **FID** (:func:`fid_with_ci`): torchmetrics' formula on feature vectors (``evaluation.vae_study.frechet_distance``),
  with a percentile bootstrap interval over the *generated* set (the reference set is fixed: it is the
  target distribution, not a sample we could draw again). ``sqrt(S_real)`` is computed once, so each
  replicate costs one symmetric eigen-decomposition.
* **KID** (:func:`kid`): torchmetrics' ``KernelInceptionDistance`` on the same features (an identity
  "feature extractor"), unbiased for small N; its ``subset_size`` is capped at N.
* **Diversity** (:func:`ms_ssim_diversity`): mean pairwise MS-SSIM between the samples of one prompt
  (higher = less diverse). torchmetrics' default 5 scales need images over 160 px; smaller images use
  fewer scales (the first weights of the default, renormalised), and the setting is returned with the value.
* **Intervals**: :func:`bootstrap_ci` (percentile, seeded) for any statistic of resampled indices.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # torchmetrics' (and Wang et al.'s) default weights


class GenerationStatsError(ValueError):
    """Too few samples, or inputs of the wrong shape, for a statistic."""


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``n_boot`` resamples (with replacement) of ``range(n)``."""
    if n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid_with_ci(real: torch.Tensor, fake: torch.Tensor, n_boot: int = 100, seed: int = 0) -> dict:
    """``{"fid", "ci_low", "ci_high", "n_real", "n_generated", "feature_dim", "n_boot"}`` on features ``[N, d]``."""
    real, fake = real.double(), fake.double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise GenerationStatsError(f"FID: features must be [N, d] with the same d; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise GenerationStatsError(f"FID needs at least 2 images on each side; got {real.shape[0]} real and {fake.shape[0]} generated")
    mu1, s1 = real.mean(0), torch.cov(real.T).reshape(real.shape[1], -1)
    root = _sqrtm_psd(s1)
    const = float(s1.trace())

    def fid_of(f: torch.Tensor) -> float:
        mu2, s2 = f.mean(0), torch.cov(f.T).reshape(f.shape[1], -1)
        m = root @ s2 @ root
        ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
        return float(((mu1 - mu2) ** 2).sum() + const + s2.trace() - 2 * ev.sqrt().sum())

    value = fid_of(fake)
    lo, hi = bootstrap_ci(lambda idx: fid_of(fake[torch.from_numpy(idx)]), fake.shape[0], n_boot, seed)
    return {"fid": value, "ci_low": lo, "ci_high": hi, "n_real": int(real.shape[0]), "n_generated": int(fake.shape[0]),
            "feature_dim": int(real.shape[1]), "n_boot": int(n_boot)}


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100) -> dict:
    """KID (mean ± std over subsets) with torchmetrics, on precomputed features; ``subset_size`` capped at N."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        raise GenerationStatsError(f"KID needs at least 2 images on each side; got {real.shape[0]} real and {fake.shape[0]} generated")
    size = min(int(subset_size), n)
    metric = KernelInceptionDistance(feature=_Identity(), subsets=subsets, subset_size=size, normalize=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "subset_size": size, "subsets": subsets,
            "n_real": int(real.shape[0]), "n_generated": int(fake.shape[0])}


def ms_ssim_scales(size: int, kernel_size: int = 11) -> int:
    """How many MS-SSIM scales an image of side ``size`` allows: each halving must leave more than ``kernel_size - 1`` px."""
    scales = 1
    while scales < len(MS_SSIM_BETAS) and size > (kernel_size - 1) * 2 ** scales:
        scales += 1
    return scales


def ms_ssim_diversity(images: torch.Tensor, max_pairs: Optional[int] = None, seed: int = 0, n_boot: int = 200) -> dict:
    """Mean pairwise MS-SSIM of ``images [N, C, H, W]`` in [0, 1] (higher = more alike), with a bootstrap interval
    over pairs and the scale setting used."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    n = images.shape[0]
    if n < 2:
        raise GenerationStatsError(f"diversity needs at least 2 images of a prompt; got {n}")
    size = min(images.shape[-2:])
    scales = ms_ssim_scales(size)
    betas = tuple(b / sum(MS_SSIM_BETAS[:scales]) for b in MS_SSIM_BETAS[:scales])
    pairs = list(itertools.combinations(range(n), 2))
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    a = images[[i for i, _ in pairs]].float()
    b = images[[j for _, j in pairs]].float()
    values = ms_ssim(a, b, data_range=1.0, betas=betas, reduction="none").double().cpu().numpy()
    lo, hi = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), n_boot, seed)
    return {"ms_ssim": float(values.mean()), "ci_low": lo, "ci_high": hi, "n_images": int(n), "n_pairs": len(pairs),
            "scales": scales, "betas": [round(x, 4) for x in betas], "image_size": int(size)}


def auroc_with_ci(scores_positive: Sequence[float], scores_negative: Sequence[float], n_boot: int = 200, seed: int = 0) -> dict:
    """AUROC of separating positive-prompt from negative-prompt scores, with a stratified bootstrap interval."""
    from torchmetrics.functional.classification import binary_auroc

    pos, neg = np.asarray(scores_positive, float), np.asarray(scores_negative, float)
    if len(pos) < 2 or len(neg) < 2:
        raise GenerationStatsError(f"AUROC needs at least 2 scores per prompt; got {len(pos)} and {len(neg)}")

    def auc(p: np.ndarray, q: np.ndarray) -> float:
        scores = torch.from_numpy(np.concatenate([p, q]))
        target = torch.cat([torch.ones(len(p)), torch.zeros(len(q))]).long()
        return float(binary_auroc(scores, target))

    rng = np.random.default_rng(seed)
    reps = [auc(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]) for _ in range(max(n_boot, 0))]
    lo, hi = (np.quantile(reps, [0.025, 0.975]) if reps else (float("nan"), float("nan")))
    return {"auroc": auc(pos, neg), "ci_low": float(lo), "ci_high": float(hi), "n_positive": len(pos), "n_negative": len(neg)}
