"""Per-image reconstruction metrics (RMSE, PSNR, SSIM) with an explicit data range and scale.

All metrics go through ``skimage.metrics`` with ``data_range`` always given (docs/formats.md §5):

* ``8bit``: images as 0–255 gray levels, ``data_range=255``;
* ``xrv``: torchxrayvision's scale ``(2*x/255 - 1) * 1024`` in [-1024, 1024], ``data_range=2048``.

RMSE depends on the scale (RMSE_xrv = RMSE_8bit * 2048/255); PSNR does not, as long as
``data_range`` follows the scale. SSIM does: it is invariant to scaling but not to the offset
(its luminance term ``(2 mu_x mu_y + C1) / (mu_x² + mu_y² + C1)`` changes when the means move
towards 0), so SSIM on [-1024, 1024] differs from SSIM on 0–255 and both are reported. The paper's "RMSE 41, PSNR 33.6 dB" only fits together on the xrv
scale (docs/formats.md §5), which is why both are reported.

PSNR here is **per image** (``10 log10(range² / MSE_i)``, then averaged over images);
:func:`pooled_psnr` gives the dataset-level PSNR from the mean MSE (what torchmetrics'
``PeakSignalNoiseRatio(dim=None)`` reports), which is always <= the mean of per-image PSNRs.

SSIM uses Wang et al.'s settings: Gaussian window, sigma 1.5, population covariance.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

SCALES = {"8bit": (0.0, 255.0), "xrv": (-1024.0, 1024.0)}
SSIM_KWARGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def to_scale(image_u8: np.ndarray, scale: str) -> np.ndarray:
    """uint8 (or 0–255 float) image -> float64 on ``scale`` (``8bit`` or ``xrv``)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    x = np.asarray(image_u8, dtype=np.float64)
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"expected an 8-bit image (values 0–255), got values in [{x.min()}, {x.max()}]")
    if scale == "8bit":
        return x
    return (2.0 * x / 255.0 - 1.0) * 1024.0


def data_range(scale: str) -> float:
    lo, hi = SCALES[scale]
    return hi - lo


def corner_mask(shape: tuple[int, int], fraction: float) -> Optional[np.ndarray]:
    """Boolean mask, True where pixels count: everything but four corner squares of side ``fraction * min(H, W)``.

    ``fraction`` 0 gives None (no masking). Burnt-in annotations sit in the corners of many CXRs.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"mask_corners must be in [0, 0.5), got {fraction}")
    side = int(round(fraction * min(shape)))
    if side == 0:
        return None
    mask = np.ones(shape, dtype=bool)
    for rows in (slice(0, side), slice(shape[0] - side, shape[0])):
        for cols in (slice(0, side), slice(shape[1] - side, shape[1])):
            mask[rows, cols] = False
    return mask


def image_metrics(original: np.ndarray, reconstruction: np.ndarray, scale: str = "8bit",
                  mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """MSE, RMSE, PSNR (dB) and SSIM of one 2-D image pair on ``scale``; ``mask`` (True = counts) restricts them."""
    if original.shape != reconstruction.shape or original.ndim != 2:
        raise ValueError(f"expected two 2-D images of the same shape, got {original.shape} and {reconstruction.shape}")
    a, b = to_scale(original, scale), to_scale(reconstruction, scale)
    rng = data_range(scale)
    if mask is None:
        mse = float(mean_squared_error(a, b))
        psnr = float(peak_signal_noise_ratio(a, b, data_range=rng)) if mse > 0 else float("inf")
        ssim = float(structural_similarity(a, b, data_range=rng, **SSIM_KWARGS))
    else:
        if mask.shape != a.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {a.shape}")
        mse = float(np.mean((a[mask] - b[mask]) ** 2))
        psnr = float(10 * np.log10(rng**2 / mse)) if mse > 0 else float("inf")
        # masked pixels of the reconstruction take the original's values, so that they do not leak into the
        # SSIM windows of nearby unmasked pixels; the map is then averaged over the unmasked pixels only
        _, smap = structural_similarity(a, np.where(mask, b, a), data_range=rng, full=True, **SSIM_KWARGS)
        # skimage averages the map without a border of (win_size - 1) // 2 pixels; do the same inside the mask
        pad = (2 * int(3.5 * 1.5 + 0.5) + 1 - 1) // 2
        inner = np.zeros_like(mask)
        inner[pad : a.shape[0] - pad, pad : a.shape[1] - pad] = True
        ssim = float(smap[mask & inner].mean())
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "psnr": psnr, "ssim": ssim}


def pair_metrics(original: np.ndarray, reconstruction: np.ndarray, mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """Metrics on both scales, keys ``rmse_8bit``, ``psnr_8bit``, ``ssim_8bit``, ``mse_8bit``, ``rmse_xrv``, ..."""
    out = {}
    for scale in SCALES:
        for key, value in image_metrics(original, reconstruction, scale, mask).items():
            out[f"{key}_{scale}"] = value
    return out


def pooled_psnr(mse_values, scale: str) -> float:
    """Dataset-level PSNR from the mean of per-image MSEs (``10 log10(range² / mean MSE)``)."""
    mse = float(np.mean(np.asarray(mse_values, dtype=np.float64)))
    return float(10 * np.log10(data_range(scale) ** 2 / mse)) if mse > 0 else float("inf")
