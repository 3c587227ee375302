"""The one metrics module: FID, KID, AUROC and MS-SSIM on feature tensors (or images), with N and intervals.

The callbacks and every study use these; nothing else computes them.

* **FID** (:func:`frechet_distance` on features, :func:`frechet_distance_from_statistics` on their means and
  covariances): torchmetrics' formula (unbiased covariances, docs/formats.md §4) evaluated with symmetric
  eigen-decompositions. :func:`fid_with_ci` adds a grouped-jackknife interval over the *generated* set (the
  reference set is fixed: it is the target distribution, not a sample we could draw again); ``sqrt(S_real)`` is
  computed once, so each replicate costs one symmetric eigen-decomposition. :func:`fid_minibatches` is the paper's
  FID on minibatches of 32. :class:`FeatureFID` is the same FID as a torchmetrics ``Metric`` on feature batches, whose
  sums are reduced over DDP ranks in ``compute()`` (the FID callback).
* **KID** (:func:`kid`): torchmetrics' ``KernelInceptionDistance`` on the same features (an identity
  "feature extractor"), unbiased for small N; its ``subset_size`` is capped at N.
* **Diversity** (:func:`ms_ssim_diversity`): mean pairwise MS-SSIM between the samples of one prompt
  (higher = less diverse). torchmetrics' default 5 scales need images over 160 px; smaller images use
  fewer scales (the first weights of the default, renormalised), and the setting is returned with the value.
* **Precision, recall, density, coverage** (:func:`prdc`, Naeem et al. 2020, k = 5 as they recommend): fidelity
  (precision, density) and diversity (recall, coverage) of generated features against real ones from k-nearest-
  neighbour balls; tests check it against the authors' ``prdc`` package.
* **AUROC** (:func:`auroc`, :func:`auroc_with_ci`): torchmetrics' ``binary_auroc``; NaN when one class is absent;
  Newcombe's score interval (:func:`auroc_interval`), which does not collapse at 0 or 1.
* **Intervals** (what each means: docs/statistics.md): :func:`bootstrap_ci` (percentile, seeded) for any statistic
  of resampled indices; :func:`proportion_ci` (exact, Clopper-Pearson) for a proportion such as a copy rate;
  :func:`summarize` gives mean, sd, median and range.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from core.errors import UserError

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # torchmetrics' (and Wang et al.'s) default weights


class MetricInputError(UserError, ValueError):
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


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion ``successes / n``, from scipy's ``binomtest``.

    It never collapses: 0 of 16 gives [0, 0.206] (``1 - 0.025^(1/16)``), where a percentile bootstrap of the
    proportion gives [0, 0] (every resample of 16 zeros is zero)."""
    from scipy.stats import binomtest

    k, n = int(successes), int(n)
    if n < 1 or not 0 <= k <= n:
        raise MetricInputError(f"proportion interval: {k} successes of {n} trials; expected 0 <= successes <= trials, "
                               "trials >= 1")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def summarize(values) -> dict[str, float]:
    """mean, sd (sample, ddof=1), median, min, max and n of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def format_summary(s: dict, digits: int = 2) -> str:
    """``mean ± sd; median, m; range, lo – hi (n=N)`` as in the paper's text."""
    if s["n"] == 0:
        return "n/a (n=0)"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['mean'])} ± {f.format(s['sd'])}; median, {f.format(s['median'])}; "
            f"range, {f.format(s['min'])} – {f.format(s['max'])} (n={s['n']})")


# ---------------------------------------------------------------------- FID
def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _check_features(real: torch.Tensor, fake: torch.Tensor, what: str = "FID") -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricInputError(f"{what}: features must be [N, d] with the same d; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise MetricInputError(f"{what} needs at least 2 images on each side; got {real.shape[0]} real and {fake.shape[0]} generated")


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of features ``[N, d]``, float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], -1)


def frechet_distance_from_statistics(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor,
                                     root1: Optional[torch.Tensor] = None) -> float:
    """``|mu1 - mu2|² + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2))`` (torchmetrics' FID formula).

    torchmetrics takes a general (non-symmetric) ``eigvals(S1 @ S2)``; that is slow and its convergence data-dependent
    for rank-deficient d x d covariances (12 s for d = 1024 seen on CPU). The eigenvalues of ``S1 S2`` equal those of
    the symmetric PSD ``sqrt(S1) S2 sqrt(S1)``, so symmetric ``eigh`` is used (``root1``: ``sqrt(S1)`` if known).
    """
    root = _sqrtm_psd(s1) if root1 is None else root1
    m = root @ s2 @ root
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * ev.sqrt().sum())


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID on feature vectors ``[N, d]`` (float64; tests check it against torchmetrics' FrechetInceptionDistance)."""
    _check_features(real, fake)
    return frechet_distance_from_statistics(*statistics(real), *statistics(fake))


def fid_with_ci(real: torch.Tensor, fake: torch.Tensor, n_boot: int = 100, seed: int = 0, level: float = 0.95) -> dict:
    """FID on features ``[N, d]`` with a grouped-jackknife interval over the generated set (docs/statistics.md):
    ``{"fid", "fid_se", "ci_low", "ci_high", "ci_method", "n_groups", "n_real", "n_generated", "feature_dim", "n_boot"}``.

    ``fid`` is the FID of all images. The generated images are split at random (seeded) into ``n_groups = G =
    min(n_boot, N)`` disjoint groups of ``d = N // G`` images (the ``N mod G`` left over stay in every replicate); each
    replicate is the FID of all images but one group, without replacement. ``fid_se`` is the delete-d jackknife
    standard error ``sqrt((N - d) / d · mean_g (FID_-g - mean)²)`` (``(G - 1) / G · Σ`` when d = N / G), and
    ``[ci_low, ci_high] = fid ± t(G - 1) · fid_se`` (lower end clipped at 0). A bootstrap *with* replacement duplicates
    images, and FID is biased upward in 1/N, so its replicates all lay above the estimate and its "interval" missed
    it (issue 29); leaving images out changes N by only N/G and the spread, not the level, is used. By Efron–Stein the
    jackknife variance errs on the large side; on Gaussian features (d = 256, N = 100–400) it measured 1.0–1.4 times
    the spread of FIDs of independent generated sets. The interval is the sampling variability of the generated
    images at this N against this reference set (held fixed); it says nothing of the bias in N, so FIDs compare only at
    equal N. NaN when ``n_boot < 2`` or N < 3."""
    from scipy.stats import t as student_t

    _check_features(real, fake)
    fake = fake.double()
    mu1, s1 = statistics(real)
    root = _sqrtm_psd(s1)

    def fid_of(f: torch.Tensor) -> float:
        return frechet_distance_from_statistics(mu1, s1, *statistics(f), root1=root)

    value, n = fid_of(fake), fake.shape[0]
    groups = min(int(n_boot), n)
    se = lo = hi = float("nan")
    if groups >= 2 and n >= 3:
        size = n // groups  # every replicate leaves out the same number: FID depends on N, unequal groups would show it
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        left_out = np.array([fid_of(fake[torch.cat([order[:g * size], order[(g + 1) * size:]])]) for g in range(groups)])
        # delete-d jackknife, d = size: var = (N - d) / d · mean((FID_-g - mean)²), i.e. (G - 1) / G · Σ when d = N / G
        se = float(np.sqrt((n - size) / size * ((left_out - left_out.mean()) ** 2).mean()))
        half_width = float(student_t.ppf(1 - (1 - level) / 2, groups - 1)) * se
        lo, hi = max(0.0, value - half_width), value + half_width
    return {"fid": value, "fid_se": se, "ci_low": lo, "ci_high": hi, "ci_method": "grouped jackknife", "n_groups": groups,
            "n_real": int(real.shape[0]), "n_generated": int(n), "feature_dim": int(real.shape[1]), "n_boot": int(n_boot)}


PRDC_K = 5  # Naeem et al. (2020) recommend k = 5; CheXGenBench reports PRDC with it too


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = PRDC_K) -> dict:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features (Naeem et al. 2020).

    Each real point's ball has the radius of its distance to its ``k``-th nearest other real point (each fake point's
    likewise among fakes). Precision: share of fakes inside some real ball. Recall: share of reals inside some fake
    ball. Density: mean over fakes of the number of real balls containing it, divided by ``k`` (can exceed 1).
    Coverage: share of real balls containing at least one fake. Euclidean distances, float64."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricInputError(f"PRDC needs feature matrices [N, d] of one d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise MetricInputError(f"PRDC with k={k} needs more than {k} real and generated images, got {len(real)} real and "
                               f"{len(fake)} generated")
    radius_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # the first is the point itself
    radius_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    distance = torch.cdist(real, fake)  # [N_real, N_fake]
    inside_real = distance < radius_real[:, None]
    return {"precision": float(inside_real.any(0).double().mean()),
            "recall": float((distance < radius_fake[None, :]).any(1).double().mean()),
            "density": float(inside_real.double().sum(0).mean() / k),
            "coverage": float((distance.min(1).values < radius_real).double().mean()), "prdc_k": k}


def fid_minibatches(real: torch.Tensor, fake: torch.Tensor, batch: int = 32) -> dict:
    """FID on consecutive minibatches of ``batch`` pairs (the paper's protocol; a last incomplete batch is dropped
    unless it is the only one) and on the whole set."""
    n = real.shape[0]
    if n < 2:
        raise MetricInputError(f"FID needs at least 2 images, got {n}")
    starts = list(range(0, n - batch + 1, batch)) or [0]
    size = batch if n >= batch else n
    per_batch = [frechet_distance(real[s : s + size], fake[s : s + size]) for s in starts]
    return {
        "minibatch": {"batch_size": size, "n_batches": len(per_batch), "n_images_used": size * len(per_batch),
                      "values": per_batch, **summarize(per_batch)},
        "whole_set": {"n": n, "fid": frechet_distance(real, fake)},
        "feature_dim": int(real.shape[1]),
    }


class FeatureFID(Metric):
    """FID between two sets of feature vectors, accumulated batch by batch as sums (exact under DDP: torchmetrics sums
    the states over ranks in ``compute()``, which every rank must call). ``reset_real=False`` keeps the real side
    across :meth:`reset`, so reference features are added once."""

    full_state_update = False

    def __init__(self, num_features: int, reset_real: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.reset_real = reset_real
        d = int(num_features)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, real: bool) -> None:
        f = features.double().flatten(1)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])

    @property
    def real_count(self) -> int:
        return int(self.real_n)

    def _stats(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = getattr(self, f"{side}_n").double()
        mu = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov

    def compute(self) -> torch.Tensor:
        if int(self.real_n) < 2 or int(self.fake_n) < 2:
            raise MetricInputError(f"FID needs at least 2 images on each side; got {int(self.real_n)} real and "
                                   f"{int(self.fake_n)} generated")
        return torch.tensor(frechet_distance_from_statistics(*self._stats("real"), *self._stats("fake")), dtype=torch.float64)

    def reset(self) -> None:
        if self.reset_real:
            return super().reset()
        kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)


# ---------------------------------------------------------------------- KID
class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100) -> dict:
    """KID (mean ± std over subsets) with torchmetrics, on precomputed features; ``subset_size`` capped at N."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        raise MetricInputError(f"KID needs at least 2 images on each side; got {real.shape[0]} real and {fake.shape[0]} generated")
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
        raise MetricInputError(f"diversity needs at least 2 images of a prompt; got {n}")
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


# ---------------------------------------------------------------------- AUROC
def auroc(y, scores) -> float:
    """Area under the ROC curve of ``scores`` for binary labels ``y`` (ties count half); NaN when one class is absent."""
    from torchmetrics.functional.classification import binary_auroc

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(binary_auroc(torch.as_tensor(np.asarray(scores, dtype=np.float64)), torch.from_numpy(y).long()))


def auroc_interval(value: float, n_positive: int, n_negative: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (2006, method 5) score interval for an AUROC ``value`` from ``n_positive`` and ``n_negative`` scores.

    The Wilson idea applied to the Mann-Whitney statistic: every ``theta`` in [0, 1] with
    ``(value - theta)² <= z² V(theta)``, where ``V`` is Hanley and McNeil's (1982) variance evaluated at ``theta``
    (not at the estimate) with both ``n - 1`` replaced by ``(n_positive + n_negative) / 2 - 1``. Evaluated at the
    estimate, Hanley-McNeil's and DeLong's variances are 0 at AUROC 1 and a bootstrap's replicates all equal 1, so all
    three give "[1, 1]"; this interval keeps a lower bound below 1 for any finite sample (the upper end is then 1)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    m, n, a = int(n_positive), int(n_negative), float(value)
    if m < 1 or n < 1 or not 0.0 <= a <= 1.0:
        raise MetricInputError(f"AUROC interval: needs an AUROC in [0, 1] and at least 1 score per side; got {a} from "
                               f"{m} positive and {n} negative scores")
    z2, half = float(norm.ppf(1 - (1 - level) / 2)) ** 2, (m + n) / 2 - 1

    def gap(theta: float) -> float:  # (a - theta)² - z² V(theta); <= 0 inside the interval
        v = theta * (1 - theta) / (m * n) * (1 + half * ((1 - theta) / (2 - theta) + theta / (1 + theta)))
        return (a - theta) ** 2 - z2 * v

    eps = 1e-12
    inside = min(max(a, eps), 1 - eps)  # gap < 0 there (at a itself unless a is 0 or 1)
    lo = 0.0 if a <= eps else brentq(gap, 0.0, inside, xtol=1e-12)
    hi = 1.0 if a >= 1 - eps else brentq(gap, inside, 1.0, xtol=1e-12)
    return float(lo), float(hi)


def auroc_with_ci(scores_positive: Sequence[float], scores_negative: Sequence[float], n_boot: int = 200, seed: int = 0) -> dict:
    """AUROC of separating positive from negative scores (e.g. effusion-prompt vs plain-prompt images), with
    Newcombe's score interval (:func:`auroc_interval`; ``ci_method``). The interval is analytic: ``n_boot`` only
    switches it on (``n_boot <= 0``: NaN, as before) and ``seed`` is unused; both are kept for the callers."""
    pos, neg = np.asarray(scores_positive, float), np.asarray(scores_negative, float)
    if len(pos) < 2 or len(neg) < 2:
        raise MetricInputError(f"AUROC needs at least 2 scores per prompt; got {len(pos)} and {len(neg)}")
    value = auroc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.concatenate([pos, neg]))
    lo, hi = auroc_interval(value, len(pos), len(neg)) if n_boot > 0 and np.isfinite(value) else (float("nan"), float("nan"))
    return {"auroc": value, "ci_low": lo, "ci_high": hi, "ci_method": "Newcombe score", "n_positive": len(pos),
            "n_negative": len(neg)}


# ---------------------------------------------------------------------- classification at a threshold
def accuracy_f1(y, pred) -> tuple[float, float]:
    """Accuracy and F1 of binary predictions (F1 = 0 when there is nothing positive to find or predict)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp, fn = int((y & pred).sum()), int((~y & pred).sum()), int((y & ~pred).sum())
    acc = float((y == pred).mean())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0
    return acc, float(f1)


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, d]`` arrays (NaN where a row is zero)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), np.nan)
