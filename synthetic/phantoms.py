"""Synthetic chest X-ray phantoms written in the MIMIC-CXR-JPG v2.0.0 layout.

The phantoms are procedurally drawn, grayscale look-alikes of frontal (PA/AP)
chest radiographs: dark lungs with branching vascular markings, a bright
mediastinum and spine, a heart sitting mostly on the image right (the
patient's left), clavicles, posterior and anterior ribs, domed hemidiaphragms
(the right one higher) with sharp costophrenic angles, a gastric air bubble and
soft tissue of the chest wall and shoulders.  Findings are drawn on top of the
same anatomy:

* ``"No Finding"``: normal, cardiothoracic ratio (CTR) 0.41-0.47.
* ``"Pleural Effusion"``: basal opacity with a meniscus rising along the
  lateral chest wall that obliterates the costophrenic angle and the
  hemidiaphragm (right, left or bilateral).
* ``"Cardiomegaly"``: enlarged, more globular heart, CTR 0.55-0.65.
* ``"Pneumothorax"``: apical/lateral lucency without lung markings, bounded by
  a thin visceral pleural line (not in the default dataset).

What they are NOT: anatomically accurate, physically simulated (no
projection of a 3-D body), or derived from any patient data.  Every image,
report, identifier and date is generated from a seeded random generator; no
real patient information is involved.  They exist so that the suite can run,
be tested and demo-train end to end without credentialed MIMIC-CXR access,
and so that a generative model has a clearly learnable, correctly placed
visual difference between findings.

``write_phantom_mimic`` writes a small dataset with exactly the file layout,
CSV columns, identifier formats and report formatting of MIMIC-CXR-JPG
v2.0.0, so the suite's real MIMIC loader reads it unchanged;
``PhantomCXRDataModule`` is that loader writing the phantoms on first use
(imported lazily, so rendering and writing need only numpy/scipy/PIL/pandas).

Image convention (as a PA radiograph is displayed): patient's right on the
image left; "right"/"left" in reports and geometry always mean the
*patient's* side.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pathlib
import shutil
import tempfile
import textwrap
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from core.errors import UserError, run_main

__all__ = [
    "SUPPORTED_FINDINGS",
    "DEFAULT_FINDINGS",
    "CHEXPERT_COLUMNS",
    "METADATA_COLUMNS",
    "SPLIT_COLUMNS",
    "render_phantom",
    "render_phantom_with_geometry",
    "render_lateral",
    "write_phantom_mimic",
    "PhantomDataError",
    "DEMO_N_PER_FINDING",
    "preview_grid",
    "main",
    "PhantomCXRDataModule",
]

SUPPORTED_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Pleural Effusion",
    "Cardiomegaly",
    "Pneumothorax",
)
DEFAULT_FINDINGS: tuple[str, ...] = ("No Finding", "Pleural Effusion", "Cardiomegaly")

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
CHEXPERT_COLUMNS: tuple[str, ...] = ("subject_id", "study_id") + CHEXPERT_LABELS
METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
SPLIT_NAMES: tuple[str, ...] = ("train", "validate", "test")

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
MARKER_FILE = "PHANTOMS.json"
_FORMAT_VERSION = 1
# Studies per finding in data/phantoms, as the demo configs (configs/*_demo.yaml, demo.yaml) write it on first use:
# `python -m synthetic.phantoms data/phantoms` writes the same set, so the docs' commands agree in any order.
DEMO_N_PER_FINDING = 16
_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train, validate, test: write_phantom_mimic's default


class PhantomDataError(UserError, ValueError):
    """Phantom arguments that cannot be written, or a folder that holds something else: one line, naming it."""


def _check_finding(finding: str) -> None:
    if finding not in SUPPORTED_FINDINGS:
        raise PhantomDataError(
            f"unknown finding {finding!r}; supported findings are "
            f"{list(SUPPORTED_FINDINGS)}"
        )


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------
# Frontal rendering
# --------------------------------------------------------------------------
#
# Everything is computed in "image units" (x, y in [0, 1], y downwards) and
# composed as an additive density map D (0 = air, ~0.9 = bone over the
# mediastinum), which is blurred, tone-mapped and quantised at the end.


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """Per-image anatomy, in image units.  Independent of the finding."""
    yt = rng.uniform(0.085, 0.12)  # top of the thoracic cavity (lung apices)
    ycp = min(yt + rng.uniform(0.60, 0.66), 0.79)  # costophrenic angle level
    dome_depth_r = rng.uniform(0.09, 0.115)
    return dict(
        cx=0.5 + rng.normal(0.0, 0.01),
        W=rng.uniform(0.335, 0.37),  # half of the internal thoracic width
        yt=yt,
        ycp_r=ycp,
        ycp_l=ycp + rng.uniform(0.0, 0.012),
        dome_depth_r=dome_depth_r,
        dome_depth_l=dome_depth_r + rng.uniform(0.008, 0.022),  # left dome lower
        dome_peak_r=rng.uniform(0.40, 0.52),  # |u| of the dome apex (u = x / W)
        dome_peak_l=rng.uniform(0.45, 0.56),
        wall=rng.uniform(0.10, 0.16),  # chest wall soft tissue, in units of W
        arm_gap=rng.uniform(0.0, 0.12),
        arm_end=rng.uniform(0.8, 1.15),
        ctr=rng.uniform(0.41, 0.47),
        heart_tilt=np.deg2rad(rng.uniform(26.0, 36.0)),
        heart_aspect=rng.uniform(0.70, 0.78),  # minor / major semi-axis
        heart_shift=rng.uniform(0.28, 0.34),  # fraction of the heart right of midline
        knob=rng.uniform(0.10, 0.14),
        rib_count=int(rng.integers(9, 11)),
        rib_spacing=rng.uniform(0.95, 1.05),
        rib_curve=rng.uniform(0.85, 1.15),
        rib_density=rng.uniform(0.075, 0.10),
        vessel_density=rng.uniform(0.13, 0.18),
        lung_air=rng.uniform(0.42, 0.48),
        tissue=rng.uniform(0.40, 0.48),
        bubble=bool(rng.uniform() < 0.8),
        bubble_size=rng.uniform(0.025, 0.04),
        rotation=rng.uniform(-3.0, 3.0),
        brightness=rng.normal(0.0, 0.025),
        contrast=rng.uniform(0.92, 1.08),
        gamma=rng.uniform(0.88, 1.12),
        noise=rng.uniform(0.008, 0.014),
        vessel_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _sample_finding(finding: str, rng: np.random.Generator) -> dict:
    f: dict = {"finding": finding, "sides": [], "severity": None}
    if finding == "Cardiomegaly":
        ctr = float(rng.uniform(0.56, 0.64))
        f["ctr"] = ctr
        f["severity"] = "mild" if ctr < 0.585 else ("moderate" if ctr < 0.615 else "severe")
    elif finding == "Pleural Effusion":
        r = rng.uniform()
        sides = ["right"] if r < 0.36 else (["left"] if r < 0.72 else ["right", "left"])
        sev = {}
        for s in sides:
            q = rng.uniform()
            sev[s] = "small" if q < 0.25 else ("moderate" if q < 0.72 else "large")
        if len(sides) == 2 and sev["right"] == "large" and sev["left"] == "large":
            sev[sides[int(rng.integers(0, 2))]] = "moderate"
        f["sides"] = sides
        f["severity"] = sev
        f["effusion_params"] = {s: (float(rng.uniform()), float(rng.uniform())) for s in sides}
    elif finding == "Pneumothorax":
        side = "right" if rng.uniform() < 0.5 else "left"
        q = rng.uniform()
        f["sides"] = [side]
        f["severity"] = {side: "small" if q < 0.5 else "moderate"}
        f["gap"] = float(rng.uniform(0.05, 0.065) if q < 0.5 else rng.uniform(0.08, 0.11))
    return f


def _thorax_halfwidth(y: np.ndarray, a: dict) -> np.ndarray:
    """Internal thoracic half-width (inner rib margin) per row, image units."""
    yt, W = a["yt"], a["W"]
    ycp = max(a["ycp_r"], a["ycp_l"])
    yw = yt + 0.64 * (ycp - yt)
    t = np.clip((yw - y) / (yw - yt), 0.0, 1.0)
    upper = W * np.power(np.clip(1.0 - t**2.0, 0.0, 1.0), 1.0 / 2.0)
    lower = W * (1.0 - 0.03 * np.clip((y - yw) / (ycp - yw), 0.0, 1.5) ** 2)
    h = np.where(y < yw, upper, lower)
    return np.where(y < yt, 0.0, h)


def _diaphragm(x: np.ndarray, a: dict) -> np.ndarray:
    """Row (image units) of the hemidiaphragm surface for each column x."""
    u = (x - a["cx"]) / a["W"]
    out = np.empty_like(u)
    for side in ("r", "l"):
        sel = (u < 0) if side == "r" else (u >= 0)
        us = np.abs(u[sel])
        peak = a[f"dome_peak_{side}"]
        depth = a[f"dome_depth_{side}"]
        top = a[f"ycp_{side}"] - depth
        lat = np.clip((us - peak) / (1.0 - peak), 0.0, None)
        med = np.clip((peak - us) / peak, 0.0, None)
        out[sel] = top + depth * lat**2.2 + 0.6 * depth * med**2
    return out


def _gauss(y, mu, sigma):
    return np.exp(-0.5 * ((y - mu) / sigma) ** 2)


def _ellipse(X, Y, cx, cy, ax, bx, tilt):
    c, s = np.cos(tilt), np.sin(tilt)
    dx, dy = X - cx, Y - cy
    p = (dx * c + dy * s) / ax
    q = (-dx * s + dy * c) / bx
    return p * p + q * q


def _heart(X, Y, a: dict, hw: float, aspect: float, above_dia):
    """Cardiac silhouette: a tilted egg (apex down towards the image right)
    of horizontal extent ~hw, about a third of it right of the midline (image
    left), resting on the left hemidiaphragm.
    Returns (mask, centre row in image units)."""
    cx = a["cx"]
    tilt = a["heart_tilt"]
    c, s = np.cos(tilt), np.sin(tilt)
    lv_a = 0.5 * hw / np.sqrt(c**2 + (aspect * s) ** 2)
    lv_b = lv_a * aspect
    ext_y = np.sqrt((lv_a * s) ** 2 + (lv_b * c) ** 2)
    base = a["ycp_l"] - a["dome_depth_l"] + 0.045
    hcx = cx + (0.5 - a["heart_shift"]) * hw
    hcy = base - 0.8 * ext_y
    m = (_ellipse(X, Y, hcx, hcy, lv_a, lv_b, tilt) <= 1.0) & above_dia
    return m, float(hcy)


def _close_with_diaphragm(heart, above_dia, radius_px: float):
    """Fill thin lung wedges between the heart and the diaphragm
    (morphological closing of heart + abdomen, via distance transforms)."""
    solid = heart | ~above_dia
    grown = ndimage.distance_transform_edt(~solid) <= radius_px
    closed = ndimage.distance_transform_edt(grown) > radius_px
    cols = np.nonzero(heart.any(axis=0))[0]
    rows = np.nonzero(heart.any(axis=1))[0]
    if cols.size == 0:
        return heart
    box = np.zeros_like(heart)
    box[(rows[0] + rows[-1]) // 2 :, cols[0] : cols[-1] + 1] = True
    return ((closed & box) | heart) & above_dia


def _segments_tree(rng, x0, y0, ang, length, gens, out, weight=1.0, gen=0):
    """Recursively generate vessel segments (x0, y0, x1, y1, weight, gen)."""
    ang = ang + rng.normal(0.0, 0.12)
    x1 = x0 + length * np.cos(ang)
    y1 = y0 + length * np.sin(ang)
    out.append((x0, y0, x1, y1, weight, gen))
    if gen + 1 < gens:
        for k in (-1, 1):
            _segments_tree(rng, x1, y1, ang + k * rng.uniform(0.25, 0.5),
                           length * rng.uniform(0.68, 0.82), gens, out, weight * 0.62, gen + 1)


def _vessels(S: int, a: dict, hila) -> np.ndarray:
    """Canvas of branching pulmonary vessels radiating from the hila."""
    rng = np.random.default_rng(a["vessel_seed"])
    canv = [np.zeros((S, S), np.float32), np.zeros((S, S), np.float32)]
    for hx, hy, lateral in hila:
        base = np.linspace(-1.2, 1.1, 7) + rng.normal(0, 0.08, 7)
        for ang in base:
            segs: list = []
            a0 = ang if lateral > 0 else np.pi - ang
            length = a["W"] * rng.uniform(0.21, 0.27) * (1.15 if ang < -0.6 else 1.0)
            oy = hy + 0.06 * ang / 1.2 + rng.normal(0.0, 0.006)  # spread along the hilum
            ox = hx + lateral * rng.uniform(0.0, 0.02)
            _segments_tree(rng, ox, oy, a0, length, 4, segs)
            for x0, y0, x1, y1, w, g in segs:
                n = max(2, int(np.hypot(x1 - x0, y1 - y0) * S * 1.5))
                t = np.linspace(0.0, 1.0, n)
                xs = np.clip(((x0 + (x1 - x0) * t) * S).astype(np.int32), 0, S - 1)
                ys = np.clip(((y0 + (y1 - y0) * t) * S).astype(np.int32), 0, S - 1)
                c = canv[0 if g < 2 else 1]
                c[ys, xs] = np.maximum(c[ys, xs], w)
    px = S / 256.0
    v = ndimage.gaussian_filter(canv[0], 1.3 * px) * 2.4 + ndimage.gaussian_filter(canv[1], 0.7 * px) * 1.4
    return np.clip(v, 0.0, 1.0)


def _band(d: np.ndarray, half) -> np.ndarray:
    """Bone band profile across a rib/clavicle: denser cortical margins."""
    r = np.abs(d) / half
    return np.where(r < 1.0, 0.6 + 0.4 * np.minimum(r, 1.0) ** 4, 0.0)


def _render_frontal(finding: str, S: int, a: dict, f: dict, noise_rng) -> tuple[np.ndarray, dict]:
    px = 1.0 / S
    coords = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = np.meshgrid(coords, coords)
    cx, W, yt = a["cx"], a["W"], a["yt"]
    ycp = max(a["ycp_r"], a["ycp_l"])
    L = ycp - yt  # lung height
    dX = X - cx
    adX = np.abs(dX)
    u1 = np.abs(coords - cx) / W  # per-column normalised distance from midline

    # ---- body outline, soft tissue, arms ----------------------------------
    B_chest = W * (1.0 + a["wall"])
    B_sh = W * 1.3
    y_sh = yt + 0.02
    neck = 0.5 * W
    t_up = np.clip((Y - (y_sh - 0.14)) / 0.14, 0.0, 1.0)
    B_up = neck + (B_sh - neck) * np.sin(t_up * np.pi / 2) ** 0.7
    t_dn = np.clip((Y - y_sh) / 0.16, 0.0, 1.0)
    B = np.where(Y < y_sh, B_up, B_sh + (B_chest - B_sh) * (3 * t_dn**2 - 2 * t_dn**3))
    B = B + 0.04 * W * np.clip((Y - ycp) / 0.2, 0.0, 1.0)
    body = adX < B
    thick = np.sqrt(np.clip(1.0 - (dX / B) ** 2, 0.0, 1.0))
    D = np.where(body, 0.18 + a["tissue"] * thick**0.6, 0.0).astype(np.float32)
    # arms hanging beside the chest, separated by an axillary gap; humeri
    arm_top = y_sh - 0.03
    arm_m = B_chest + 0.012 + a["arm_gap"] * np.clip(Y - (yt + 0.16), 0.0, None)
    arm_w = 0.11 + 0.05 * np.clip((Y - arm_top) / 0.15, 0.0, 1.0)
    r_arm = np.clip((adX - arm_m) / arm_w, 0.0, 1.0)
    in_arm = (adX > arm_m) & (adX < arm_m + arm_w) & (Y > arm_top)
    cap = np.hypot((adX - (arm_m + 0.5 * arm_w)) / (0.5 * arm_w), (Y - (arm_top + 0.06)) / 0.07) < 1.0
    end_cap = np.hypot((adX - (arm_m + 0.5 * arm_w)) / (0.5 * arm_w), (Y - a["arm_end"]) / 0.06) < 1.0
    in_arm &= ((Y > arm_top + 0.06) | cap) & ((Y < a["arm_end"]) | end_cap)
    arm_t = np.sqrt(np.clip(1.0 - (2 * r_arm - 1.0) ** 2, 0.0, 1.0))
    D = np.maximum(D, np.where(in_arm, 0.14 + 0.30 * arm_t**0.6, 0.0))
    hum_x = arm_m + 0.45 * arm_w
    head = np.hypot(adX - hum_x, Y - (arm_top + 0.055)) / 0.045
    shaft = (np.abs(adX - hum_x) < 0.022) & (Y > arm_top + 0.06) & (Y < a["arm_end"] - 0.04)
    humerus = np.where(head < 1.0, 0.6 + 0.4 * head**4, 0.0)
    humerus = np.maximum(humerus, np.where(shaft, _band(adX - hum_x, 0.022), 0.0))
    D += 0.10 * humerus * (in_arm | (head < 1.0))
    # ---- thoracic cavity, mediastinum, heart, diaphragm -------------------
    h = _thorax_halfwidth(Y, a)
    thorax = adX < h
    dia1d = _diaphragm(coords, a)
    dia = dia1d[None, :]
    above_dia = Y < dia

    knob_y = yt + 0.20 * L
    trunk_y = knob_y + 0.085
    med_r = cx + W * (0.13 + a["knob"] * _gauss(Y, knob_y, 0.028) + 0.06 * _gauss(Y, trunk_y, 0.03))
    t_asc = np.clip((Y - (yt + 0.22 * L)) / (0.25 * L), 0.0, 1.0)
    med_l = cx - W * (0.12 + 0.07 * t_asc**2 * (3 - 2 * t_asc))
    mediast = (X > med_l) & (X < med_r)

    ctr = f.get("ctr", a["ctr"])
    HW = 2.0 * ctr * W  # target horizontal heart extent
    aspect = a["heart_aspect"] * (1.12 if finding == "Cardiomegaly" else 1.0)
    k = 1.0
    heart = np.zeros_like(thorax)
    heart_cy = ycp
    for it in range(5):
        heart, heart_cy = _heart(X, Y, a, HW * k, aspect, above_dia)
        if it == 4:
            break
        cols = np.nonzero(heart.any(axis=0))[0]
        if cols.size == 0:
            break
        k *= HW / ((cols[-1] - cols[0] + 1) * px)
    heart = _close_with_diaphragm(heart, above_dia, 0.03 * S)
    # heart region joins the mediastinum above it
    mediast &= Y < heart_cy
    lungs = thorax & above_dia & ~mediast & ~heart & (Y > yt)

    # lung air: thinner lung at the lateral periphery and apex
    taper = np.clip(np.minimum((h - adX) / 0.05, (Y - yt) / 0.06), 0.0, 1.0) ** 0.6
    depth = 0.9 + 0.1 * np.clip((Y - yt) / (0.5 * L), 0.0, 1.0)
    air = np.where(lungs, a["lung_air"] * depth * (0.35 + 0.65 * taper), 0.0).astype(np.float32)

    # ---- findings that modify the lung -----------------------------------
    eff_op = np.zeros_like(D)
    geom_eff: dict = {}
    if finding == "Pleural Effusion":
        for side in f["sides"]:
            sgn = -1.0 if side == "right" else 1.0
            k = "r" if side == "right" else "l"
            p_level, p_rise = f["effusion_params"][side]
            sev = f["severity"][side]
            ycp_s = a[f"ycp_{k}"]
            top_s = ycp_s - a[f"dome_depth_{k}"]
            if sev == "small":
                level = ycp_s - 0.025 - 0.015 * p_level
                rise = 0.09 + 0.025 * p_rise
            elif sev == "moderate":
                level = top_s - 0.02 - 0.04 * p_level
                rise = 0.10 + 0.04 * p_rise
            else:
                level = top_s - 0.12 - 0.07 * p_level
                rise = 0.12 + 0.05 * p_rise
            dl = np.clip((adX - 0.12 * W) / (h - 0.12 * W + 1e-6), 0.0, 1.0)
            surf = level - rise * dl**3
            op = np.clip((Y - surf) / 0.03, 0.0, 1.0) ** 1.3
            op = np.where(((dX * sgn) > 0) & (adX < h + 0.01), op, 0.0)
            eff_op = np.maximum(eff_op, op)
            geom_eff[side] = dict(severity=sev, surface_medial_y=float(level * S),
                                  surface_lateral_y=float((level - rise) * S))
    ptx = np.zeros_like(thorax)
    ptx_line = np.zeros_like(D)
    if finding == "Pneumothorax":
        side = f["sides"][0]
        sgn = -1.0 if side == "right" else 1.0
        lung_side = lungs & ((dX * sgn) > 0)
        dist = ndimage.distance_transform_edt(thorax) * px
        g = f["gap"] * np.clip(1.0 - (Y - yt) / (0.75 * L), 0.0, 1.0) ** 0.7
        ptx = lung_side & (dist < g)
        ptx_line = np.where(lung_side & (np.abs(dist - g) < 0.005) & (g > 0.006), 1.0, 0.0)

    # ---- compose densities ----------------------------------------------
    D -= air
    hila = [
        (cx - 0.22 * W, yt + 0.36 * L, -1.0),
        (cx + 0.25 * W, yt + 0.33 * L, 1.0),
    ]
    ves = _vessels(S, a, hila)
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), 1.0 * S / 256.0)
    D += a["vessel_density"] * ves * lung_soft * (1.0 - eff_op) * (~ptx)
    for hx, hy, _ in hila:  # hilar vessels
        r = np.hypot((X - hx) / 0.04, (Y - hy) / 0.075)
        D += np.where(lungs, 0.11 * np.clip(1.0 - r, 0.0, 1.0) ** 0.7, 0.0) * (1.0 - eff_op)
    D -= np.where(ptx, 0.08 + a["lung_air"] * depth * 0.65 * (1.0 - taper), 0.0)
    D += 0.16 * ndimage.gaussian_filter(ptx_line, 0.5 * S / 256.0)
    # fluid replaces air; slightly denser than the chest wall
    D += eff_op * (air + 0.08 * lung_soft)
    # mediastinum / heart slightly denser than the chest wall
    D += np.where((mediast | heart) & (Y > yt - 0.05), 0.06, 0.0)
    D += np.where(heart, 0.02, 0.0)
    # liver under the right hemidiaphragm (image left) a bit denser
    below = (~above_dia) & body
    D += np.where(below, 0.05 * thick + 0.03 * np.clip((0.1 * W - dX) / (0.3 * W), 0.0, 1.0), 0.0)
    # spine: vertebral bodies with disc spaces and pedicles
    vh = L / 11.5
    phase = ((Y - yt) / vh) % 1.0
    disc = np.clip(1.0 - np.abs(phase - 0.5) / 0.13, 0.0, 1.0)
    spine = (np.abs(X - cx) < 0.029) & body
    vis = np.where(Y < ycp + 0.02, 1.0, 0.5) * np.where(Y < yt - 0.02, 0.6, 1.0)
    D += np.where(spine, (0.04 - 0.025 * disc) * vis, 0.0)
    for sgn in (-1, 1):
        ped = np.hypot((X - (cx + sgn * 0.021)) / 0.0065, (phase - 0.28) * vh / 0.009) < 1.0
        D += np.where(ped & spine, 0.025 * vis, 0.0)
    # trachea and main bronchi (air)
    carina_y = knob_y + 0.045
    trach = (np.abs(X - (cx + 0.004)) < 0.0135) & (Y < carina_y)
    D -= np.where(trach & body, 0.11, 0.0)
    for sgn, slope in ((-1, 0.6), (1, 0.9)):
        bxc = cx + sgn * slope * (Y - carina_y)
        br = (np.abs(X - bxc) < 0.0095) & (Y >= carina_y) & (Y < carina_y + 0.05)
        D -= np.where(br, 0.08 * (1.0 - (Y - carina_y) / 0.05), 0.0)
    # gastric bubble under the left hemidiaphragm (image right)
    if a["bubble"]:
        gx = cx + 0.45 * W
        gy = dia1d[min(S - 1, int(gx * S))] + 0.012 + a["bubble_size"] * 0.7
        r = np.hypot((X - gx) / (a["bubble_size"] * 1.3), (Y - gy) / a["bubble_size"])
        bub = (r < 1.0) & (Y > dia + 0.01) & (Y < gy + 0.35 * a["bubble_size"])
        D -= np.where(bub, 0.12, 0.0) * (1.0 - eff_op)

    # ---- bones ------------------------------------------------------------
    bones = np.zeros_like(D)
    chest = np.clip((h + 0.03 - adX) / 0.02, 0.0, 1.0) * np.clip((dia + 0.02 - Y) / 0.03, 0.0, 1.0)
    chest *= np.clip((Y - (yt - 0.03)) / 0.02, 0.0, 1.0)
    n_ribs = a["rib_count"]
    spacing = L / (n_ribs - 0.6) * a["rib_spacing"]
    for i in range(n_ribs):
        y0 = yt - 0.012 + i * spacing
        c = a["rib_curve"] * (1.0 + 0.04 * (i - 4))
        half = 0.009 + 0.0008 * i
        if i == 0:  # first rib: short tight arc around the apex
            yc = y0 + 0.01 - 0.20 * u1 + 0.32 * u1**2
            seg = (u1 > 0.08) & (u1 < 0.8)
        else:  # posterior rib: up and out from the spine, then down laterally
            yc = y0 - 0.14 * c * u1 + 0.23 * c * u1**2 + 1.2 * np.clip(u1 - 0.8, 0, None) ** 2
            seg = (u1 > 0.07) & (u1 < 1.08)
        bones += np.where(seg[None, :], _band(Y - yc[None, :], half), 0.0)
        if 1 <= i < n_ribs - 2:  # anterior rib: from the lateral wall down-medially
            ya = y0 + 0.045 + 0.55 * spacing
            yc2 = ya + 0.12 * np.clip(1.0 - u1, 0.0, None) ** 1.2
            seg2 = (u1 > 0.32 + 0.015 * i) & (u1 < 1.02)
            bones += np.where(seg2[None, :], 0.55 * _band(Y - yc2[None, :], half * 1.3), 0.0)
    bones *= a["rib_density"] * chest * np.where(mediast | heart, 0.2, 1.0) * (1.0 - 0.5 * eff_op)
    # clavicles: from the sternal notch laterally and up to the acromion
    uu = adX / W
    ycl = yt + 0.10 - 0.085 * uu + 0.02 * np.sin(np.pi * np.clip(uu / 1.25, 0.0, 1.0))
    half = 0.0135 + 0.004 * np.clip(1.0 - uu, 0.0, 1.0)
    seg = (uu > 0.07) & (uu < 1.2)
    bones += np.where(seg, 0.14 * _band(Y - ycl, half), 0.0)
    D += bones

    # ---- tone mapping, blur, noise, rotation -----------------------------
    D = ndimage.gaussian_filter(D, 0.75 * S / 256.0)
    mottle = ndimage.gaussian_filter(noise_rng.standard_normal((S, S)).astype(np.float32), max(1.6 * S / 256.0, 1.0))
    D += 0.045 * mottle * lung_soft * (1.0 - eff_op)
    img = np.clip(D, 0.0, 1.0) ** (1.0 / a["gamma"])
    img = (img - 0.45) * a["contrast"] + 0.45 + a["brightness"]
    img = 0.03 + 0.97 * img
    img += noise_rng.standard_normal((S, S)).astype(np.float32) * a["noise"] * min(1.0, S / 256.0) ** 0.5
    if abs(a["rotation"]) > 1e-3:
        img = ndimage.rotate(img, a["rotation"], reshape=False, order=1, mode="nearest")
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # ---- geometry (pixels, before the small rotation) --------------------
    hcols = np.nonzero(heart.any(axis=0))[0]
    tcols = np.nonzero((thorax & above_dia).any(axis=0))[0]
    heart_w = int(hcols[-1] - hcols[0] + 1)
    thorax_w = int(tcols[-1] - tcols[0] + 1)
    hy, hx = ndimage.center_of_mass(heart)
    cp = {}
    for side, k in (("right", "r"), ("left", "l")):
        hw = float(_thorax_halfwidth(np.array([a[f"ycp_{k}"]]), a)[0])
        cp[side] = (float((cx + (-hw if side == "right" else hw)) * S), float(a[f"ycp_{k}"] * S))
    geom = dict(
        finding=finding,
        size=S,
        cardiothoracic_ratio=heart_w / thorax_w,
        heart_width=heart_w,
        thorax_width=thorax_w,
        heart_left_px=int(hcols[0]),
        heart_right_px=int(hcols[-1]),
        heart_center=(float(hx), float(hy)),
        midline_x=float(cx * S),
        thorax_left_px=int(tcols[0]),
        thorax_right_px=int(tcols[-1]),
        costophrenic_angle=cp,
        hemidiaphragm_top={
            "right": float((a["ycp_r"] - a["dome_depth_r"]) * S),
            "left": float((a["ycp_l"] - a["dome_depth_l"]) * S),
        },
        lung_apex_y=float(yt * S),
        rotation_deg=float(a["rotation"]),
        sides=list(f["sides"]),
        severity=f["severity"],
    )
    if geom_eff:
        geom["effusion"] = geom_eff
    return out, geom


def render_phantom_with_geometry(
    finding: str, size: int = 256, rng: np.random.Generator | int | None = 0
) -> tuple[np.ndarray, dict]:
    """Render a frontal phantom and return ``(image, geometry)``.

    ``image`` is uint8 ``(size, size)``.  ``geometry`` holds (pixel units,
    measured before the small random rotation) ``cardiothoracic_ratio``,
    ``heart_width``, ``thorax_width``, ``heart_center`` (x, y), ``midline_x``,
    ``costophrenic_angle`` and ``hemidiaphragm_top`` per patient side,
    ``sides``/``severity`` of the finding and ``rotation_deg``.

    The anatomy depends only on ``rng``, not on ``finding``: the same seed
    gives the same patient with a different finding drawn on top.
    """
    _check_finding(finding)
    size = int(size)
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    g = _as_rng(rng)
    seeds = g.integers(0, 2**63 - 1, size=3)
    anat = _sample_anatomy(np.random.default_rng(seeds[0]))
    fnd = _sample_finding(finding, np.random.default_rng(seeds[1]))
    return _render_frontal(finding, size, anat, fnd, np.random.default_rng(seeds[2]))


def render_phantom(finding: str, size: int = 256, rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Render one frontal chest X-ray phantom as uint8 ``(size, size)``."""
    return render_phantom_with_geometry(finding, size, rng)[0]


# --------------------------------------------------------------------------
# Lateral rendering (a simple side-view silhouette; anterior on image left)
# --------------------------------------------------------------------------


def render_lateral(finding: str = "No Finding", size: int = 256,
                   rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Render a plausible lateral chest view as uint8 ``(size, size)``.

    Anterior is on the image left, the spine on the right.  It is much
    simpler than the frontal phantom; it exists so that the dataset has
    lateral images for a loader's frontal-only filter to drop.  Effusion
    fills the posterior costophrenic sulcus, cardiomegaly enlarges the heart.
    """
    _check_finding(finding)
    S = int(size)
    if S < 32:
        raise ValueError(f"size must be >= 32, got {S}")
    g = _as_rng(rng)
    coords = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = np.meshgrid(coords, coords)
    X = X - g.normal(0.0, 0.012)
    xa0 = g.uniform(0.15, 0.2)  # anterior chest wall at mid-chest
    xp0 = g.uniform(0.84, 0.89)  # skin of the back
    ty = np.clip((0.22 - Y) / 0.22, 0.0, 1.0)
    xa = xa0 + 0.17 * ty**1.6 - 0.04 * np.clip((Y - 0.6) / 0.4, 0, 1)
    xp = xp0 - 0.07 * ty**1.6
    body = (X > xa) & (X < xp)
    mid = 0.5 * (xa + xp)
    thick = np.sqrt(np.clip(1.0 - ((X - mid) / (0.5 * (xp - xa))) ** 2, 0.0, 1.0))
    D = np.where(body, 0.24 + 0.42 * thick**0.5, 0.0)
    # arms raised forward, overlapping the upper anterior chest, with humeri
    arm = _ellipse(X, Y, 0.40, 0.05, 0.30, 0.09, np.deg2rad(-12)) <= 1.0
    D = np.where(arm, np.maximum(D, 0.3) + 0.1, D)
    hum = np.abs((Y - 0.05) + 0.2 * (X - 0.40)) < 0.018
    D += np.where(hum & arm, 0.08, 0.0)
    # spine (gentle kyphosis) and its anterior edge
    xs = xp0 - 0.115 + 0.03 * np.sin(np.pi * np.clip(Y, 0, 1))
    # lungs: rounded apex, anterior border behind the sternum, domed diaphragm
    lx0, ly0 = 0.5 * (xa0 + 0.05 + xs), g.uniform(0.40, 0.44)
    lax, lay = 0.5 * (xs - xa0 - 0.04), g.uniform(0.30, 0.33)
    la = xa0 + 0.05
    dome = g.uniform(0.6, 0.65)
    tt = np.clip((X - la) / (xs - la), 0.0, 1.0)
    dia = dome - 0.035 * np.sin(np.pi * np.clip(tt * 1.3, 0, 1)) + 0.16 * tt**2.4
    lungs = (np.hypot((X - lx0) / lax, np.clip(ly0 - Y, 0, None) / lay) < 1.0) & (Y < dia) & (X > la)
    lungs &= X < xs + 0.03
    # heart, anterior and inferior
    scale = g.uniform(1.22, 1.35) if finding == "Cardiomegaly" else g.uniform(0.95, 1.05)
    hx, hy = la + 0.14 * scale, dome - 0.05
    heart = (_ellipse(X, Y, hx, hy, 0.15 * scale, 0.115 * scale, np.deg2rad(-30)) <= 1.0) & (Y < dia + 0.02)
    lungs &= ~heart
    edge = np.clip(np.minimum((X - la) / 0.05, (Y - (ly0 - lay)) / 0.06), 0.25, 1.0)
    air = np.where(lungs, 0.40 * edge, 0.0)
    if finding == "Pleural Effusion":
        rise = g.uniform(0.08, 0.15)
        surf = dia - rise * np.clip((tt - 0.35) / 0.65, 0, 1) ** 2 - 0.012
        air = air * (1.0 - np.clip((Y - surf) / 0.025, 0.0, 1.0) * (tt > 0.3))
    if finding == "Pneumothorax":
        air = air * np.where(Y < ly0 - 0.15, 1.15, 1.0)
    D = D - air
    D += np.where(heart, 0.05, 0.0)
    # hila, trachea
    D += 0.1 * np.clip(1.0 - np.hypot((X - 0.55) / 0.06, (Y - 0.38) / 0.08), 0.0, 1.0)
    tx = 0.53 + 0.1 * Y
    D -= np.where((np.abs(X - tx) < 0.016) & (Y < 0.36) & body, 0.09, 0.0)
    # vertebral bodies with disc spaces; lower ones a little more lucent
    vh = g.uniform(0.048, 0.056)
    phase = (Y / vh) % 1.0
    vb = (X > xs) & (X < xs + 0.065) & (np.abs(phase - 0.5) < 0.38)
    D += np.where(vb & body, 0.09 - 0.03 * np.clip((Y - 0.3) / 0.4, 0, 1), 0.0)
    D += np.where((X > xs + 0.07) & (X < xs + 0.1) & body, 0.04, 0.0)
    # sternum
    D += np.where((np.abs(X - (xa + 0.015)) < 0.009) & (Y > 0.18) & (Y < 0.58), 0.09, 0.0)
    D = ndimage.gaussian_filter(D.astype(np.float32), 1.0 * S / 256.0)
    img = np.clip(D, 0, 1) ** (1.0 / g.uniform(0.9, 1.1))
    img = 0.03 + 0.97 * img + g.normal(0.0, 0.02)
    img += g.standard_normal((S, S)).astype(np.float32) * 0.012
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

_TITLE = " " * 33 + "FINAL REPORT"
_RULE = " " + "_" * 78
_SEV_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def _wrap(text: str) -> list[str]:
    w = textwrap.TextWrapper(width=78, break_long_words=True, break_on_hyphens=False)
    return [" " + line for line in w.wrap(text)] or [" "]


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(0, len(options)))]


def _side_phrase(sev: dict) -> tuple[str, str]:
    """(findings sentence, impression sentence) for a pleural effusion."""
    if len(sev) == 1:
        (side, s), = sev.items()
        return f"{s.capitalize()} {side} pleural effusion", f"{s} {side} pleural effusion"
    r, l = sev["right"], sev["left"]
    if r == l:
        return f"{r.capitalize()} bilateral pleural effusions", f"{r} bilateral pleural effusions"
    return (
        f"Bilateral pleural effusions, {r} on the right and {l} on the left",
        f"bilateral pleural effusions, {r} on the right and {l} on the left",
    )


def _report_body(st: dict, rng: np.random.Generator) -> tuple[list[str], list[str], set[str]]:
    """Findings sentences, impression sentences and negated CheXpert labels."""
    f = st["finding"]
    neg: set[str] = set()
    if f == "No Finding":
        fs = [
            _pick(rng, ["The lungs are clear.", "The lungs are well expanded and clear.",
                        "Lungs are clear without focal consolidation."]),
            _pick(rng, ["There is no pleural effusion or pneumothorax.",
                        "No pleural effusion or pneumothorax is seen."]),
            _pick(rng, ["The cardiomediastinal silhouette is normal.", "Heart size is normal.",
                        "The heart is normal in size.  Mediastinal and hilar contours are unremarkable."]),
        ]
        neg |= {"Pleural Effusion", "Pneumothorax"}
        if rng.uniform() < 0.5:
            fs.append("There is no pulmonary edema.")
            neg.add("Edema")
        fs.append(_pick(rng, ["No acute osseous abnormalities.", "Imaged osseous structures are intact."]))
        imp = [_pick(rng, ["No acute cardiopulmonary process.", "No acute intrathoracic process.",
                           "No acute cardiopulmonary abnormality."])]
    elif f == "Pleural Effusion":
        sev = st["severity"]
        long, short = _side_phrase(sev)
        plural = len(sev) == 2
        if st["uncertain"]:
            if all(v == "small" for v in sev.values()):
                where = "costophrenic angles" if plural else f"{next(iter(sev))} costophrenic angle"
                eff = "small pleural effusions" if plural else "a small pleural effusion"
                fs = [f"Blunting of the {where} may reflect {eff}."]
            else:
                fs = [f"Basal opacity {'bilaterally' if plural else 'on the ' + next(iter(sev))} "
                      f"likely represents {short}."]
            imp = [f"Possible {short}."]
        else:
            fs = [_pick(rng, [f"{long} {'are' if plural else 'is'} present.",
                              f"{long} {'are' if plural else 'is'} new.",
                              f"There {'are' if plural else 'is a'} {short}."])]
            if any(v != "small" for v in sev.values()):
                fs.append(f"There is a meniscus along the lateral chest wall with obscuration of the "
                          f"{'hemidiaphragms' if plural else 'hemidiaphragm'}.")
            else:
                fs.append(f"There is blunting of the {'costophrenic angles' if plural else 'costophrenic angle'}.")
            imp = [_pick(rng, [f"{long}.", f"{long}, new since the prior study."])]
        if len(sev) == 1:
            other = "left" if "right" in sev else "right"
            fs.append(f"The {other} lung is clear.")
        fs.append(_pick(rng, ["Heart size is normal.", "The cardiac silhouette is within normal limits."]))
        fs.append("No pneumothorax.")
        neg |= {"Cardiomegaly", "Pneumothorax"}
    elif f == "Cardiomegaly":
        s = st["severity"]
        fs = [_pick(rng, [f"The heart is {_SEV_ADV[s]} enlarged.", f"{s.capitalize()} cardiomegaly is present.",
                          f"There is {s} enlargement of the cardiac silhouette."]),
              "The lungs are clear.",
              "No pulmonary edema, pleural effusion, or pneumothorax."]
        neg |= {"Edema", "Pleural Effusion", "Pneumothorax"}
        imp = [_pick(rng, [f"{s.capitalize()} cardiomegaly.", f"{s.capitalize()} cardiomegaly without pulmonary edema.",
                           f"{s.capitalize()} cardiomegaly.  No acute cardiopulmonary process."])]
    elif f == "Pneumothorax":
        (side, s), = st["severity"].items()
        fs = [f"There is a {s} {side} apical pneumothorax with a visible pleural line.",
              "No pleural effusion.", "Heart size is normal."]
        neg |= {"Pleural Effusion", "Cardiomegaly"}
        imp = [f"{s.capitalize()} {side} pneumothorax."]
    else:  # pragma: no cover - guarded by _check_finding
        raise ValueError(f)
    return fs, imp, neg


def _make_report(st: dict, rng: np.random.Generator) -> tuple[str, set[str]]:
    fs, imp, neg = _report_body(st, rng)
    woman = rng.uniform() < 0.5
    who = _pick(rng, ["woman", "female"]) if woman else _pick(rng, ["man", "male"])
    reason = {
        "No Finding": ["chest pain", "cough", "pre-operative evaluation", "fever"],
        "Pleural Effusion": ["shortness of breath", "dyspnea", "?pleural effusion", "CHF"],
        "Cardiomegaly": ["dyspnea on exertion", "hypertension, shortness of breath", "leg swelling"],
        "Pneumothorax": ["chest pain after fall", "sudden dyspnea"],
    }[st["finding"]]
    q = {"No Finding": "eval for acute process", "Pleural Effusion": "?pleural effusion",
         "Cardiomegaly": "eval for pulmonary edema", "Pneumothorax": "?pneumothorax"}[st["finding"]]
    indication = f"___ year old {who} with {_pick(rng, reason)}  // {q}"
    lines: list[str] = []
    if st.get("addendum"):
        lines += [" ADDENDUM:  "]
        if st["finding"] == "No Finding":
            lines += _wrap("Comparison was made with the prior study from ___, which shows no "
                           "interval change.")
        else:
            lines += _wrap("The findings were discussed with Dr. ___ by telephone at ___ on ___, "
                           "approximately 10 minutes after discovery.")
        lines += [" ", _RULE]
    lines.append(_TITLE)
    lines.append(f" EXAMINATION:  {st['exam']}")
    lines.append(" ")
    lines += _wrap(f"INDICATION:  {indication}")
    lines.append(" ")
    lines.append(f" TECHNIQUE:  {st['technique']}")
    lines.append(" ")
    lines.append(f" COMPARISON:  {_pick(rng, ['___', 'None.', 'Chest radiograph ___.'])}")
    lines.append(" ")
    lines += [" FINDINGS: ", " "]
    lines += _wrap("  ".join(fs))
    if not st.get("no_impression"):
        lines += [" ", " IMPRESSION: ", " "]
        lines += _wrap("  ".join(imp))
    return "\n".join(lines) + "\n", neg


# --------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------


def _normalise_args(n_per_finding, size, seed, findings, split_fractions, n_lateral) -> dict:
    if isinstance(n_per_finding, Mapping):
        counts = {str(k): v for k, v in n_per_finding.items()}
        findings = tuple(counts)
    else:
        if isinstance(findings, str):
            findings = (findings,)
        findings = tuple(findings)
        counts = {f: n_per_finding for f in findings}
    if not findings:
        raise PhantomDataError("at least one finding is required")
    if len(set(findings)) != len(findings):
        raise PhantomDataError(f"duplicate findings in {list(findings)}")
    for f in findings:
        _check_finding(f)
    for f, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise PhantomDataError(f"n_per_finding[{f!r}] must be a non-negative int, got {n!r}")
    if sum(counts.values()) == 0:
        raise PhantomDataError("n_per_finding must request at least one image")
    size = int(size)
    if size < 32:
        raise PhantomDataError(f"size must be >= 32, got {size}")
    fr = [float(x) for x in split_fractions]
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
        raise PhantomDataError(f"split_fractions must be 3 non-negative numbers (train, validate, test), got {split_fractions!r}")
    total = sum(counts.values())
    if n_lateral is not None:
        n_lateral = int(n_lateral)
        if not 0 <= n_lateral <= total:
            raise PhantomDataError(f"n_lateral must be in [0, {total}], got {n_lateral}")
    return {
        "n_per_finding": {f: int(counts[f]) for f in findings},
        "size": size,
        "seed": int(seed),
        "findings": list(findings),
        "split_fractions": fr,
        "n_lateral": n_lateral,
    }


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items by fractions; every non-zero split gets >= 1 if n allows."""
    fr = np.asarray(fractions, float) / float(sum(fractions))
    raw = fr * n
    cnt = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    need = [i for i in range(3) if fr[i] > 0 and cnt[i] == 0]
    if n >= int((fr > 0).sum()):
        for i in need:
            cnt[int(np.argmax(cnt))] -= 1
            cnt[i] += 1
    return [int(c) for c in cnt]


def _unique_ints(rng, lo, hi, n, taken: set) -> list[int]:
    out = []
    while len(out) < n:
        v = int(rng.integers(lo, hi))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _plan(args: dict) -> list[dict]:
    """Deterministic study plan: ids, split, finding, views, report variants (one seeded generator, in this order)."""
    rng = np.random.default_rng(args["seed"])
    studies = _plan_studies(args, rng)
    _plan_views(studies, rng, args["n_lateral"])
    _plan_variants(studies, rng)
    return studies


def _plan_studies(args: dict, rng: np.random.Generator) -> list[dict]:
    """Subjects, studies, splits, dates and ids per finding (about 1 subject in 6 has two studies)."""
    fr = args["split_fractions"]
    taken_subj: set = set()
    taken_study: set = set()
    taken_dicom: set = set()
    studies: list[dict] = []

    def dicom_id() -> str:
        while True:
            d = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
            if d not in taken_dicom:
                taken_dicom.add(d)
                return d

    for f in args["findings"]:
        n = args["n_per_finding"][f]
        if n == 0:
            continue
        n_multi = n // 6
        n_sub = n - n_multi
        per_subject = [1] * n_sub
        for i in rng.permutation(n_sub)[:n_multi]:
            per_subject[int(i)] += 1
        alloc = _allocate(n_sub, fr)
        split_of = np.repeat(np.arange(3), alloc)
        split_of = split_of[rng.permutation(n_sub)]
        subj_ids = _unique_ints(rng, 10_000_000, 20_000_000, n_sub, taken_subj)
        for s_idx, (sid, k) in enumerate(zip(subj_ids, per_subject)):
            year = int(rng.integers(2110, 2200))
            month = int(rng.integers(1, 13))
            for j in range(k):
                day = int(rng.integers(1, 29))
                date = (year + j) * 10000 + month * 100 + day
                hh, mm, ss = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
                ms = int(rng.integers(0, 1000))
                time = round(hh * 10000 + mm * 100 + ss + ms / 1000.0, 3)
                studies.append(dict(
                    subject_id=sid,
                    study_id=_unique_ints(rng, 50_000_000, 60_000_000, 1, taken_study)[0],
                    finding=f,
                    split=SPLIT_NAMES[int(split_of[s_idx])],
                    date=date,
                    time=time,
                    frontal_dicom=dicom_id(),
                    lateral_dicom=dicom_id(),
                    image_seed=int(rng.integers(0, 2**63 - 1)),
                    report_seed=int(rng.integers(0, 2**63 - 1)),
                    u_view=float(rng.uniform()),
                    u_orient=float(rng.uniform()),
                ))
    return studies


def _plan_views(studies: list[dict], rng: np.random.Generator, n_lateral) -> None:
    """Which studies have a lateral view; PA or AP, erect or recumbent, and the technique line."""
    n_total = len(studies)
    n_lat = int(round(0.6 * n_total)) if n_lateral is None else n_lateral
    has_lat = np.zeros(n_total, bool)
    has_lat[rng.permutation(n_total)[:n_lat]] = True
    for st, lat in zip(studies, has_lat):
        st["has_lateral"] = bool(lat)
        if lat or st["u_view"] < 0.5:
            st["view"], st["exam"] = "PA", "CHEST (PA AND LAT)"
            st["technique"] = "Chest PA and lateral" if lat else "Chest PA"
            st["orientation"] = "Erect"
        else:
            st["view"], st["exam"] = "AP", "CHEST (PORTABLE AP)"
            recumbent = st["u_orient"] < 0.3
            st["orientation"] = "Recumbent" if recumbent else "Erect"
            st["technique"] = ("Portable supine AP view of the chest" if recumbent
                               else "Portable upright AP view of the chest")
        st["uncertain"] = False
        st["addendum"] = False
        st["no_impression"] = False


def _plan_variants(studies: list[dict], rng: np.random.Generator) -> None:
    """Uncertain effusion labels (about 1 in 8) and two report variants: one with an addendum, one without IMPRESSION."""
    n_total = len(studies)
    eff = [i for i, st in enumerate(studies) if st["finding"] == "Pleural Effusion"]
    n_unc = int(round(len(eff) / 8.0))
    cand = [eff[int(i)] for i in rng.permutation(len(eff))]

    # prefer effusions that are not large: "possible effusion" fits them
    def is_large(i: int) -> bool:
        sev = _finding_for_seed("Pleural Effusion", studies[i]["image_seed"])["severity"]
        return "large" in sev.values()

    cand.sort(key=is_large)
    for i in cand[:n_unc]:
        studies[i]["uncertain"] = True
    if n_total >= 2:
        order = [int(i) for i in rng.permutation(n_total)]
        normals = [i for i in order if studies[i]["finding"] == "No Finding"]
        no_imp = normals[0] if normals else order[0]
        abnormal = [i for i in order if i != no_imp and studies[i]["finding"] != "No Finding"]
        add = abnormal[0] if abnormal else next(i for i in order if i != no_imp)
        studies[no_imp]["no_impression"] = True
        studies[add]["addendum"] = True


def _finding_for_seed(finding: str, seed: int) -> dict:
    """The finding parameters render_phantom(finding, rng=seed) will draw."""
    seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=3)
    return _sample_finding(finding, np.random.default_rng(seeds[1]))


def _study_dir(root: pathlib.Path, subject_id: int, study_id: int) -> pathlib.Path:
    s = str(subject_id)
    return root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{study_id}"


def _save_jpeg(img: np.ndarray, path: pathlib.Path) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if im.mode != "L":
        im = im.convert("L")
    im.save(path, format="JPEG", quality=95)


def _write_csv_gz(df, path: pathlib.Path, **kw) -> None:
    # gzip with a fixed mtime and no file name so the bytes are reproducible
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n", **kw)
    with open(path, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(buf.getvalue().encode("utf-8"))


def _build(root: pathlib.Path, args: dict) -> dict:
    import pandas as pd

    S = args["size"]
    studies = _plan(args)
    meta_rows, split_rows, chex_rows, manifest = [], [], [], []
    for st in studies:
        d = _study_dir(root, st["subject_id"], st["study_id"])
        d.mkdir(parents=True, exist_ok=True)
        img, geom = render_phantom_with_geometry(st["finding"], S, st["image_seed"])
        st["severity"] = geom["severity"]
        _save_jpeg(img, d / f"{st['frontal_dicom']}.jpg")
        views = [(st["frontal_dicom"], st["view"],
                  "postero-anterior" if st["view"] == "PA" else "antero-posterior")]
        if st["has_lateral"]:
            lat = render_lateral(st["finding"], S, st["image_seed"] ^ 0x5EED)
            _save_jpeg(lat, d / f"{st['lateral_dicom']}.jpg")
            views.append((st["lateral_dicom"], "LATERAL", "lateral"))
        for dicom, vp, vcode in views:
            meta_rows.append({
                "dicom_id": dicom, "subject_id": st["subject_id"], "study_id": st["study_id"],
                "PerformedProcedureStepDescription": st["exam"], "ViewPosition": vp,
                "Rows": S, "Columns": S, "StudyDate": st["date"], "StudyTime": st["time"],
                "ProcedureCodeSequence_CodeMeaning": st["exam"],
                "ViewCodeSequence_CodeMeaning": vcode,
                "PatientOrientationCodeSequence_CodeMeaning": st["orientation"],
            })
            split_rows.append({"dicom_id": dicom, "study_id": st["study_id"],
                               "subject_id": st["subject_id"], "split": st["split"]})
        text, negated = _make_report(st, np.random.default_rng(st["report_seed"]))
        (d.parent / f"s{st['study_id']}.txt").write_text(text, encoding="utf-8")
        row = {"subject_id": st["subject_id"], "study_id": st["study_id"]}
        row.update({c: np.nan for c in CHEXPERT_LABELS})
        for c in negated:
            row[c] = 0.0
        row[st["finding"]] = -1.0 if st["uncertain"] else 1.0
        chex_rows.append(row)
        manifest.append({
            "subject_id": st["subject_id"], "study_id": st["study_id"], "finding": st["finding"],
            "split": st["split"], "dicom_id": st["frontal_dicom"],
            "lateral_dicom_id": st["lateral_dicom"] if st["has_lateral"] else None,
            "view": st["view"], "sides": geom["sides"], "severity": geom["severity"],
            "cardiothoracic_ratio": round(float(geom["cardiothoracic_ratio"]), 4),
            "uncertain": st["uncertain"], "addendum": st["addendum"],
            "no_impression": st["no_impression"],
        })
    meta = pd.DataFrame(meta_rows, columns=list(METADATA_COLUMNS))
    meta = meta.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable")
    split = pd.DataFrame(split_rows, columns=list(SPLIT_COLUMNS)).loc[meta.index]
    chex = pd.DataFrame(chex_rows, columns=list(CHEXPERT_COLUMNS))
    chex = chex.sort_values(["subject_id", "study_id"], kind="stable")
    _write_csv_gz(meta, root / METADATA_FILE)
    _write_csv_gz(split, root / SPLIT_FILE)
    _write_csv_gz(chex, root / CHEXPERT_FILE, float_format="%.1f")
    manifest.sort(key=lambda m: (m["subject_id"], m["study_id"]))
    return {
        "format": "phantom MIMIC-CXR-JPG v2.0.0",
        "version": _FORMAT_VERSION,
        "generator": "synthetic.phantoms.write_phantom_mimic",
        "note": "synthetic phantoms; no real patient data",
        "arguments": args,
        "n_studies": len(studies),
        "n_images": len(meta),
        "n_lateral": int(sum(st["has_lateral"] for st in studies)),
        "split_counts": {s: int((split["split"] == s).sum()) for s in SPLIT_NAMES},
        "uncertain_studies": [
            {"study_id": st["study_id"], "label": st["finding"], "value": -1.0}
            for st in studies if st["uncertain"]
        ],
        "report_variants": {
            "addendum": [st["study_id"] for st in studies if st["addendum"]],
            "no_impression": [st["study_id"] for st in studies if st["no_impression"]],
        },
        "studies": manifest,
    }


def _describe(args: dict) -> str:
    """A phantom dataset's arguments in a few words: ``16 No Finding, 16 Pleural Effusion at 256 px, seed 0``."""
    counts = ", ".join(f"{n} {f}" for f, n in (args.get("n_per_finding") or {}).items())
    text = f"{counts} at {args.get('size')} px, seed {args.get('seed')}"
    if args.get("split_fractions") not in (None, list(_SPLIT_FRACTIONS)):
        text += f", split fractions {args['split_fractions']}"
    return text + (f", {args['n_lateral']} lateral" if args.get("n_lateral") is not None else "")


def _covers(marker: dict, args: dict) -> bool:
    """Whether the dataset ``marker`` describes serves a request for ``args``: the same format, size, seed, split
    fractions and lateral count, and at least as many studies of every finding asked for. (Its images are not the
    requested set's: other counts draw other patients. For the demos and studies that read a phantom root, more
    phantoms of the same kind serve as well.)"""
    have = marker.get("arguments") or {}
    same = all(have.get(k) == args[k] for k in ("size", "seed", "split_fractions", "n_lateral"))
    counts = have.get("n_per_finding") or {}
    return (marker.get("version") == _FORMAT_VERSION and same
            and all(counts.get(f, 0) >= n for f, n in args["n_per_finding"].items()))


def _read_marker(root: pathlib.Path) -> dict | None:
    p = root / MARKER_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _seed(text: str) -> int:
    """``--seed``: what numpy's generator takes (argparse prints the one-line error)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value}: expected 0 to 2**32 - 1")
    return value


def write_phantom_mimic(
    root: str | os.PathLike,
    n_per_finding: Mapping[str, int] | int = 8,
    size: int = 256,
    seed: int = 0,
    findings: Iterable[str] = DEFAULT_FINDINGS,
    split_fractions: Sequence[float] = _SPLIT_FRACTIONS,
    n_lateral: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a phantom dataset in the MIMIC-CXR-JPG v2.0.0 layout; return ``root``.

    ``n_per_finding`` counts frontal images (= studies) per finding; an int
    applies to every name in ``findings``, a dict defines the findings itself
    (``findings`` is then ignored).  ``n_lateral`` studies also get a lateral
    image (default: ~60 % of the studies).  The split is per subject,
    stratified by finding, with values ``train``/``validate``/``test``.

    Deterministic: the same arguments give byte-identical files.  Idempotent:
    if ``root/PHANTOMS.json`` records the same arguments nothing is written.
    If it records different arguments, or ``root`` holds anything else, a
    :class:`PhantomDataError` (a ``ValueError``) is raised unless ``overwrite=True``.  The set is built in a
    temporary sibling directory and renamed into place, so a partially written
    set is never mistaken for a complete one.  ``PHANTOMS.json`` also lists
    the studies whose finding is labelled uncertain (-1.0), the report
    variants (addendum, no IMPRESSION) and a per-study manifest.
    """
    args = _normalise_args(n_per_finding, size, seed, findings, split_fractions, n_lateral)
    root = pathlib.Path(root)
    marker = _read_marker(root)
    if marker is not None and not overwrite:
        if marker.get("version") == _FORMAT_VERSION and marker.get("arguments") == args:
            return root
        raise PhantomDataError(
            f"{root} already holds a phantom dataset written with different arguments "
            f"({_describe(marker.get('arguments') or {})}, format version {marker.get('version')!r}); asked for "
            f"{_describe(args)}. Write these to another folder, or replace it (--overwrite, overwrite=True)."
        )
    # --overwrite replaces a phantom dataset, never anything else: a folder of other files (or a file) is refused
    if root.exists() and marker is None and (not root.is_dir() or any(root.iterdir())):
        raise PhantomDataError(
            f"{root} exists and is not an empty folder nor a phantom dataset (no {MARKER_FILE}); refusing to write "
            "into it or replace it, also with --overwrite: choose another folder."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        info = _build(tmp, args)
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        trash = None
        if root.exists():
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            else:
                trash = root.parent / f".{root.name}.old-{os.getpid()}-{tmp.name[-8:]}"
                os.replace(root, trash)
        try:
            os.replace(tmp, root)
        except OSError:
            # another process finished the same set first
            other = _read_marker(root)
            if other is not None and other.get("arguments") == args:
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------
# Preview and CLI
# --------------------------------------------------------------------------


def preview_grid(
    root_or_images,
    path: str | os.PathLike,
    n_per_finding: int = 4,
    size: int = 256,
) -> pathlib.Path:
    """Save a PNG grid for eyeballing.

    ``root_or_images`` is a dataset root written by ``write_phantom_mimic``
    (one row per finding, frontal images), a sequence of finding names
    (freshly rendered, seeds 0..n-1), or a sequence/array of uint8 images
    (one row).
    """
    from PIL import Image

    rows: list[list[np.ndarray]] = []
    if isinstance(root_or_images, (str, os.PathLike)) and pathlib.Path(root_or_images).is_dir():
        root = pathlib.Path(root_or_images)
        info = _read_marker(root)
        if info is None:
            raise PhantomDataError(f"{root} is not a phantom dataset (no {MARKER_FILE})")
        by_f: dict[str, list[np.ndarray]] = {f: [] for f in info["arguments"]["findings"]}
        for m in info["studies"]:
            lst = by_f.setdefault(m["finding"], [])
            if len(lst) < n_per_finding:
                p = _study_dir(root, m["subject_id"], m["study_id"]) / f"{m['dicom_id']}.jpg"
                lst.append(np.asarray(Image.open(p).convert("L")))
        rows = [r for r in by_f.values() if r]
    elif len(root_or_images) and all(isinstance(x, str) for x in root_or_images):
        rows = [[render_phantom(f, size, k) for k in range(n_per_finding)] for f in root_or_images]
    else:
        rows = [list(root_or_images)]
    h = max(im.shape[0] for r in rows for im in r)
    w = max(im.shape[1] for r in rows for im in r)
    ncol = max(len(r) for r in rows)
    grid = np.zeros((h * len(rows), w * ncol), np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            grid[i * h : i * h + im.shape[0], j * w : j * w + im.shape[1]] = im
    path = pathlib.Path(path)
    Image.fromarray(grid).save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m synthetic.phantoms",
        description="Write synthetic chest X-ray phantoms in the MIMIC-CXR-JPG v2.0.0 layout.",
    )
    p.add_argument("out_dir")
    p.add_argument("--n-per-finding", type=int, default=DEMO_N_PER_FINDING,
                   help=f"frontal studies per finding (default {DEMO_N_PER_FINDING}: what the demo configs write to data/phantoms)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=_seed, default=0, help="0 to 2**32 - 1")
    p.add_argument("--findings", nargs="+", default=list(DEFAULT_FINDINGS),
                   help=f"any of {list(SUPPORTED_FINDINGS)}")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--preview", default=None, help="also write a PNG preview grid here")
    a = p.parse_args(argv)
    args = _normalise_args(a.n_per_finding, a.size, a.seed, a.findings, _SPLIT_FRACTIONS, None)
    root = pathlib.Path(a.out_dir)
    marker = None if a.overwrite else _read_marker(root)
    if marker is not None and _covers(marker, args):
        # e.g. data/phantoms after a demo run: the studies that read it need phantoms of these findings, not these bytes
        if marker.get("arguments") == args:
            print(f"kept {root}: it already holds these phantoms ({_describe(args)})")
        else:
            print(f"kept {root}: it holds phantoms of the same kind with at least as many per finding "
                  f"({_describe(marker['arguments'])}) as asked for ({_describe(args)}); --overwrite writes exactly "
                  "what was asked")
    else:
        write_phantom_mimic(root, a.n_per_finding, a.size, a.seed, a.findings, overwrite=a.overwrite)
        info = _read_marker(root) or {}
        print(
            f"wrote {info.get('n_studies')} studies / {info.get('n_images')} images "
            f"({info.get('n_lateral')} lateral) of {', '.join(a.findings)} at {a.size}px to {root} "
            f"split {info.get('split_counts')}"
        )
    if a.preview:
        preview_grid(root, a.preview)
    return 0


# --------------------------------------------------------------------------
# Lightning data module
# --------------------------------------------------------------------------
from datamodules.mimic_cxr import MIMICCXRDataModule  # noqa: E402


class PhantomCXRDataModule(MIMICCXRDataModule):
    """``MIMICCXRDataModule`` on phantom data written to ``root`` on first use.

    The phantoms are written by :func:`write_phantom_mimic` (idempotent, so every run and every
    process reuses the same folder) with the findings ``No Finding``, ``Pleural Effusion`` and
    ``Cardiomegaly`` plus any other phantom-supported finding selected in ``findings``; the real
    MIMIC loader then reads them unchanged.

    Args:
        root: folder for the phantom dataset (created on first use).
        n_per_finding: frontal images (studies) per finding (the CLI's default too, so both write one data/phantoms).
        phantom_size: written image size in pixels (the loader resizes to ``resolution``).
        phantom_seed: seed of the phantom dataset.
        **kwargs: every other ``MIMICCXRDataModule`` argument (findings, resolution, batch_size,
            prior_preservation, ...).
    """

    def __init__(self, root: str = "data/phantoms", n_per_finding: int = DEMO_N_PER_FINDING, phantom_size: int = 256, phantom_seed: int = 0, **kwargs):
        super().__init__(root=root, **kwargs)
        unsupported = [f for f in self.findings if f not in SUPPORTED_FINDINGS]
        if unsupported:
            raise PhantomDataError(f"findings {unsupported} have no phantoms; phantom findings are {list(SUPPORTED_FINDINGS)}")
        self.phantom_findings = tuple(DEFAULT_FINDINGS) + tuple(f for f in self.findings if f not in DEFAULT_FINDINGS)
        self.n_per_finding = int(n_per_finding)
        self.phantom_size = int(phantom_size)
        if self.phantom_size < 32:  # write_phantom_mimic refuses it too, but at setup and naming its own "size"
            raise PhantomDataError(f"phantom_size: {phantom_size!r}; expected at least 32 pixels")
        self.phantom_seed = int(phantom_seed)

    def _ensure_data(self) -> None:
        write_phantom_mimic(self.root, n_per_finding=self.n_per_finding, size=self.phantom_size,
                            seed=self.phantom_seed, findings=self.phantom_findings)

    def manifest(self) -> dict:
        """MIMIC-CXR's ``data.json`` entry, marked as synthetic (model cards then carry no patient-data notice)."""
        return {**super().manifest(), "synthetic": "chest X-ray phantoms (synthetic.phantoms), no patient data"}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_main("python -m synthetic.phantoms", main))
