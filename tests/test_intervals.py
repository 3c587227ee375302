"""What the reported intervals mean (docs/statistics.md): FID's grouped-jackknife interval, the exact interval of a copy rate,
AUROC's Newcombe interval, and that none of them collapses or misses its own estimate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.memorization import copy_rate
from metrics.scores import MetricInputError, auroc_with_ci, fid_with_ci, frechet_distance

D, N_REAL = 256, 2000  # issue 29's case: real and generated features from one Gaussian


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """256 x 256 eigen-decompositions are faster on one thread, and far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gaussian_real():
    return torch.randn(N_REAL, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("n", [100, 400])
def test_fid_interval_of_same_distribution_sets_contains_the_fid(gaussian_real, n):
    # FID is biased upward in 1 / N (217 at N = 100, 53 at 400 here); resampling with replacement duplicates images and
    # raised every replicate above the estimate: the old "95% interval" was [270, 293] at N = 100, [88.9, 100.6] at 400
    fake = torch.randn(n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    out = fid_with_ci(gaussian_real, fake, n_boot=40)
    assert out["ci_low"] <= out["fid"] <= out["ci_high"], out
    assert out["ci_low"] >= 0 and out["fid_se"] > 0 and out["n_generated"] == n


def test_fid_interval_has_the_spread_of_fids_of_independent_generated_sets(gaussian_real):
    """The interval's half-width / 1.96 is the standard error of FID at this N: compared with the spread of FIDs of 30
    independent generated sets of the same size against the same reference."""
    g = torch.Generator().manual_seed(1)
    draws = [torch.randn(200, D, generator=g, dtype=torch.float64) * 1.2 + 0.1 for _ in range(31)]
    spread = np.std([frechet_distance(gaussian_real, f) for f in draws[1:]], ddof=1)
    out = fid_with_ci(gaussian_real, draws[0], n_boot=40)
    se = (out["ci_high"] - out["ci_low"]) / (2 * 1.96)
    assert 0.5 * spread < se < 2.0 * spread, (se, spread)
    assert np.isnan(fid_with_ci(gaussian_real, draws[0][:2], n_boot=40)["ci_low"])  # leaving one out leaves 1: none


@pytest.mark.parametrize("n", [16, 32])
def test_no_copies_among_n_images_is_not_certainty(n):
    # 0/16 was "0.0% [0.0, 0.0]"; the exact (Clopper-Pearson) upper bound for 0 of n is 1 - 0.025^(1/n): 0.206, 0.109
    out = copy_rate([False] * n)
    assert out["rate"] == 0.0 and out["ci_low"] == 0.0
    assert out["ci_high"] == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9) and out["copies"] == 0 and out["n"] == n
    from metrics.scores import proportion_ci

    lo, hi = proportion_ci(32, 64)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi, rel=1e-9)  # symmetric around one half
    assert proportion_ci(16, 16)[1] == 1.0 and proportion_ci(16, 16)[0] == pytest.approx(0.025 ** (1 / 16), rel=1e-9)
    with pytest.raises(MetricInputError, match="17 successes of 16"):
        proportion_ci(17, 16)


def test_perfect_auroc_keeps_a_lower_bound_below_one():
    # with a percentile bootstrap every resample of perfectly separated scores has AUROC 1: "[1, 1]" from 16 + 16 images
    out = auroc_with_ci(np.linspace(0.6, 0.9, 16), np.linspace(0.1, 0.4, 16), n_boot=200)
    assert out["auroc"] == 1.0 and out["ci_high"] == 1.0 and 0.8 < out["ci_low"] < 0.99
    small = auroc_with_ci([0.9, 0.8, 0.95], [0.1, 0.2, 0.3], n_boot=200)
    assert small["ci_low"] < out["ci_low"]  # fewer images, a wider interval
    zero = auroc_with_ci([0.1, 0.2, 0.3], [0.9, 0.8, 0.95], n_boot=200)
    assert zero["ci_low"] == 0.0 and zero["ci_high"] == pytest.approx(1 - small["ci_low"])


def test_auroc_interval_is_newcombes_method_5():
    # the example of R's SingleCaseES (NAP, whose CI is Newcombe's method 5): phases [20, 20, 26, 25, 22, 23] and
    # [28, 25, 24, 27, 30, 30, 29], NAP 11/12, 95% CI [0.59732, 0.98600], 90% [0.65911, 0.98222]
    from metrics.scores import auroc_interval

    assert auroc_interval(11 / 12, 7, 6) == pytest.approx((0.5973193600384168, 0.9859976893703788), abs=1e-9)
    assert auroc_interval(11 / 12, 7, 6, level=0.90) == pytest.approx((0.6591091902344411, 0.9822247870934007), abs=1e-9)


def test_auroc_interval_covers_the_true_auroc():
    """Binormal scores with true AUROC Phi(1 / sqrt 2) = 0.760, 20 per class: about 95% of the intervals hold it."""
    from scipy.stats import norm

    rng, truth = np.random.default_rng(0), norm.cdf(1 / np.sqrt(2))
    hits = []
    for _ in range(300):
        r = auroc_with_ci(rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 20))
        hits.append(r["ci_low"] <= truth <= r["ci_high"])
    assert 0.91 <= np.mean(hits) <= 0.99
