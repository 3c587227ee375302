"""The metrics module: FID (closed form, and accumulated as a torchmetrics Metric), KID, MS-SSIM diversity at small sizes,
intervals (what they mean: tests/test_intervals.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.scores import (FeatureFID, MetricInputError as GenerationStatsError, auroc_with_ci, fid_with_ci, frechet_distance,
                            kid, ms_ssim_diversity, ms_ssim_scales)


def test_fid_of_identical_sets_is_zero_and_of_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    assert abs(fid_with_ci(x, x, n_boot=0)["fid"]) < 1e-6
    # N(0, diag(1)) vs N(mu, diag(sigma^2)): |mu|^2 + sum (1 - sigma)^2
    mu, sigma = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    a = torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    b = mu + sigma * torch.randn(40_000, 4, generator=g, dtype=torch.float64)
    closed = float((mu ** 2).sum() + ((1 - sigma) ** 2).sum())
    out = fid_with_ci(a, b, n_boot=20)
    assert out["fid"] == pytest.approx(closed, rel=0.03)
    assert out["ci_low"] <= out["fid"] <= out["ci_high"] and out["n_generated"] == 40_000 and out["n_real"] == 40_000


def test_fid_needs_two_samples_and_matching_widths():
    with pytest.raises(GenerationStatsError, match="at least 2 images on each side; got 10 real and 1 generated"):
        fid_with_ci(torch.randn(10, 3), torch.randn(1, 3))
    with pytest.raises(GenerationStatsError, match="same d"):
        fid_with_ci(torch.randn(10, 3), torch.randn(10, 4))


def test_kid_caps_its_subset_size_at_n():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(12, 16, generator=g), torch.rand(9, 16, generator=g) + 0.5
    out = kid(real, fake, subset_size=1000, subsets=10)
    assert out["subset_size"] == 9 and out["kid"] > 0
    assert abs(kid(real, real, subset_size=6, subsets=10)["kid"]) < 0.2 * out["kid"]  # unbiased: ~0 up to subset noise


def test_ms_ssim_uses_fewer_scales_on_small_images_and_records_them():
    assert [ms_ssim_scales(s) for s in (32, 64, 128, 161, 256)] == [2, 3, 4, 5, 5]
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 1, 64, 64, generator=g).expand(4, 1, 64, 64)
    out = ms_ssim_diversity(same, n_boot=10)
    assert out["ms_ssim"] == pytest.approx(1.0, abs=1e-4) and out["scales"] == 3 and len(out["betas"]) == 3
    assert sum(out["betas"]) == pytest.approx(1.0, abs=1e-3) and out["n_pairs"] == 6
    noise = ms_ssim_diversity(torch.rand(5, 1, 64, 64, generator=g), n_boot=10)
    assert noise["ms_ssim"] < 0.5 and noise["ci_low"] <= noise["ms_ssim"] <= noise["ci_high"]
    with pytest.raises(GenerationStatsError, match="at least 2 images"):
        ms_ssim_diversity(torch.rand(1, 1, 64, 64))


def test_auroc_with_interval():
    # the perfect-separation case (no "[1, 1]") is in tests/test_intervals.py
    mixed = auroc_with_ci([0.9, 0.2, 0.6, 0.4], [0.5, 0.3, 0.7, 0.1], n_boot=100)
    assert 0 <= mixed["ci_low"] < mixed["auroc"] < mixed["ci_high"] <= 1 and mixed["auroc"] == 0.625
    assert np.isnan(auroc_with_ci([0.9, 0.2], [0.5, 0.3], n_boot=0)["ci_low"])  # n_boot 0: no interval, as --n_boot 0 asks


def test_fid_accumulated_batch_by_batch_is_the_same_fid_and_keeps_its_real_side():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g) + 0.5
    metric = FeatureFID(6, reset_real=False)
    metric.update(real[:11], real=True)
    metric.update(real[11:], real=True)
    for chunk in fake.split(7):
        metric.update(chunk, real=False)
    assert float(metric.compute()) == pytest.approx(frechet_distance(real, fake), rel=1e-9)
    metric.reset()  # the generated side only
    assert metric.real_count == 30
    metric.update(real, real=False)
    assert abs(float(metric.compute())) < 1e-8
    with pytest.raises(GenerationStatsError, match="at least 2 images on each side"):
        FeatureFID(6).compute()


# ---------------------------------------------------------------------------------------------- PRDC
def test_prdc_on_identical_far_and_random_sets_matches_the_authors_implementation():
    """Identical sets: precision = recall = coverage = 1; sets far apart: all 0; random sets: the values of the
    authors' ``prdc`` package (Naeem et al. 2020), k = 5."""
    from prdc import compute_prdc

    from metrics.scores import prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 6))
    same = prdc(torch.tensor(real), torch.tensor(real))
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["prdc_k"] == 5
    far = prdc(torch.tensor(real), torch.tensor(real + 100.0))
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    for shift in (0.0, 0.7):
        fake = rng.normal(size=(30, 6)) + shift
        ours, theirs = prdc(torch.tensor(real), torch.tensor(fake)), compute_prdc(real, fake, nearest_k=5)
        assert {k: round(ours[k], 10) for k in theirs} == {k: round(float(v), 10) for k, v in theirs.items()}


def test_prdc_needs_more_images_than_k():
    from metrics.scores import MetricInputError, prdc

    with pytest.raises(MetricInputError, match="PRDC with k=5 needs more than 5 real and generated images, got 5 real"):
        prdc(torch.zeros(5, 3), torch.zeros(9, 3))
