"""The VAE reconstruction study (paper section 2.3 / 3.2, Table 1, Figure 3): ``python evaluate.py vae``.

N random frontal MIMIC-CXR images (paper: 700, 512 px) or every image of a plain folder are encoded
and decoded by Stable Diffusion's VAE (posterior mean, no sampling) and compared:

* per-image RMSE / PSNR / SSIM (scikit-image, explicit data range) on the 8-bit scale and on
  torchxrayvision's [-1024, 1024] scale (see :mod:`evaluation.image_metrics`), optionally with the
  corners (burnt-in annotations) masked out;
* a torchxrayvision classifier on originals and reconstructions: Table 1 (prevalence, accuracy, F1,
  % change) plus AUROC, and the cosine similarity of its pooled ``features2``;
* FID originals vs reconstructions on minibatches of 32 (as the paper) and on the whole set,
  with Inception-v3 (2048) or the classifier's features (a domain FID).

Everything, including real images (Figure 3a panels, the reader kit), goes only to the local
output folder ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from evaluation.classifiers import CHEXPERT_TO_XRV
from evaluation.provenance import git_commit, package_versions
from evaluation.image_metrics import (SCALES, SSIM_KWARGS, corner_mask, format_summary, pair_metrics, pooled_psnr,
                                      summarize)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Table 1's 12 rows: the 11 exact CheXpert<->xrv matches plus the paper's loose "Pleural Other" (REFERENCE §3).

TABLE1_MAPPING = {**CHEXPERT_TO_XRV, "Pleural Other": "Pleural_Thickening"}
TABLE1_MAPPING = {k: TABLE1_MAPPING[k] for k in sorted(TABLE1_MAPPING)}
LOOSE_MATCHES = {"Pleural Other"}
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
TABLE1_COLUMNS = [
    "label", "xrv_label", "n", "prevalence_pct",
    "acc_original_pct", "acc_recon_pct", "acc_change_pct",
    "f1_original_pct", "f1_recon_pct", "f1_change_pct",
    "auroc_original", "auroc_recon", "acc_always_negative_pct", "threshold",
]


class VAEStudyError(ValueError):
    """Bad input for the VAE study (no images, unreadable image, bad option)."""


# ---------------------------------------------------------------------------------------------- input
def select_mimic(root, n: Optional[int], seed: int, split: str = "all") -> pd.DataFrame:
    """Random ``n`` frontal (PA/AP) images of a MIMIC-CXR-JPG root, with their CheXpert values.

    Uses the datamodule's readers and checks. Images of studies without a CheXpert row keep NaN
    labels (treated as negative, like every missing value). The sample is ``DataFrame.sample(n,
    random_state=seed)`` of the frontal images sorted by dicom_id, so it is reproducible.
    """
    from datamodules.mimic_cxr import (CHEXPERT_CLASSES, CHEXPERT_CSV, FRONTAL_VIEWS, METADATA_CSV, SPLIT_CSV, SPLITS,
                                       MIMICDataError, image_path, read_csv_checked)

    root = Path(root).expanduser()
    if not root.is_dir():
        raise MIMICDataError(f"{root}: MIMIC-CXR-JPG root not found")
    meta = read_csv_checked(root, METADATA_CSV)
    labels = read_csv_checked(root, CHEXPERT_CSV)
    df = meta[meta["ViewPosition"].isin(FRONTAL_VIEWS)][["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    df = df.merge(labels[["subject_id", "study_id", *CHEXPERT_CLASSES]], on=["subject_id", "study_id"], how="left")
    if split != "all":
        if split not in SPLITS:
            raise VAEStudyError(f"split {split!r} is not one of {('all',) + SPLITS}")
        splits = read_csv_checked(root, SPLIT_CSV)
        df = df.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left")
        df = df[df["split"] == split]
    df = df.sort_values("dicom_id").reset_index(drop=True)
    if len(df) == 0:
        raise VAEStudyError(f"{root}: no frontal (PA/AP) images" + (f" in split {split!r}" if split != "all" else ""))
    if n is not None and n < len(df):
        df = df.sample(n=n, random_state=seed).reset_index(drop=True)
    elif n is not None and n > len(df):
        warnings.warn(f"--n {n} but only {len(df)} frontal images are available: using all of them")
    df["image_id"] = df["dicom_id"]
    df["path"] = [str(image_path(root, r.subject_id, r.study_id, r.dicom_id)) for r in df.itertuples()]
    return df


def select_folder(folder, n: Optional[int] = None, seed: int = 0) -> pd.DataFrame:
    """Every image under ``folder`` (recursive, sorted), or a seeded random ``n`` of them. No labels."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise VAEStudyError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise VAEStudyError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    df = pd.DataFrame({"image_id": [str(p.relative_to(folder)) for p in paths], "path": [str(p) for p in paths]})
    if n is not None and n < len(df):
        df = df.sample(n=n, random_state=seed).reset_index(drop=True)
    return df


def load_images(records: pd.DataFrame, resolution: int, on_bad_image: str = "fail") -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """Decode, resize (shorter side) and centre-crop every record; returns (kept records, uint8 [N,H,W], skipped)."""
    from tqdm.auto import tqdm

    from datamodules.mimic_cxr import load_grayscale

    if on_bad_image not in ("fail", "skip"):
        raise VAEStudyError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    images, keep, skipped = [], [], []
    for i, row in enumerate(tqdm(records.itertuples(), total=len(records), desc="loading images", disable=len(records) < 20)):
        try:
            images.append(load_grayscale(Path(row.path), resolution))
            keep.append(i)
        except OSError as err:
            if on_bad_image == "fail":
                raise VAEStudyError(f"{err}. Pass --on_bad_image skip to leave such images out (they are then listed in the summary).") from None
            skipped.append({"image_id": row.image_id, "path": row.path, "error": str(err)})
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {[s['path'] for s in skipped[:5]]}")
    if not images:
        raise VAEStudyError(f"all {len(records)} selected images were unreadable, e.g. {skipped[0]['error'] if skipped else ''}")
    return records.iloc[keep].reset_index(drop=True), np.stack(images), skipped


# ---------------------------------------------------------------------------------------------- VAE
def load_vae(pretrained: str):
    """The VAE of a Stable Diffusion spec (hub id, pipeline folder or preset); returns (vae, weights key)."""
    from lightning_modules.stable_diffusion import StableDiffusionSpec, load_vae as load_sd_vae

    spec = StableDiffusionSpec(pretrained=pretrained)
    return load_sd_vae(spec), spec.cache_key()


@torch.no_grad()
def reconstruct(vae, images_u8: np.ndarray, device) -> np.ndarray:
    """uint8 ``[B, H, W]`` -> VAE reconstructions (posterior mean, decoded), gray uint8 ``[B, H, W]``."""
    param = next(vae.parameters())
    x = torch.from_numpy(images_u8).to(device).float().div(127.5).sub(1.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).to(param.dtype)
    latents = vae.encode(x).latent_dist.mean
    out = vae.decode(latents).sample.float().mean(dim=1).clamp(-1, 1)
    return out.add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()


# ---------------------------------------------------------------------------------------------- features
def inception_weights_path(path: Optional[str] = None) -> Path:
    """The Inception-v3 FID weights: ``path`` or torch.hub's cache; a clear error when absent (no download)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--inception_weights {p}: file not found (expected torch-fidelity's {INCEPTION_WEIGHTS_FILE})")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cache.is_file():
        raise FileNotFoundError(
            f"Inception-v3 FID weights not found at {cache}. Download {INCEPTION_URL} (~95 MB) on a machine with internet "
            f"access and put it there (torch.hub cache, $TORCH_HOME/hub/checkpoints), or pass --inception_weights FILE, "
            "or use --fid_features xrv|none."
        )
    return cache


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 (2048 pool features); input gray [0, 1] ``[B, 1|3, H, W]``."""

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights_path = str(inception_weights_path(weights_path))
        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=self.weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception((x.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(x.shape[0], -1)


class ClassifierFeatures(nn.Module):
    """A classifier's pooled ``features2`` (xrv DenseNet: 1024-d) as FID features; input gray [0, 1]."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from evaluation.classifiers import to_classifier_input

        return self.classifier.features2(to_classifier_input(x)).flatten(1)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID on precomputed feature vectors ``[N, d]``, float64: torchmetrics' formula (unbiased covariances,
    ``|mu1 - mu2|² + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2))``).

    torchmetrics takes a general (non-symmetric) ``eigvals(S1 @ S2)``; that is slow and its convergence
    data-dependent for rank-deficient d x d covariances (12 s for d = 1024 seen on CPU). The eigenvalues
    of ``S1 S2`` equal those of the symmetric PSD ``sqrt(S1) S2 sqrt(S1)``, so symmetric ``eigh`` is used;
    tests check the value against ``torchmetrics.image.fid.FrechetInceptionDistance``.
    """
    real, fake = real.double(), fake.double()
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise VAEStudyError("FID needs at least 2 samples on each side")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = torch.cov(real.T).reshape(real.shape[1], -1), torch.cov(fake.T).reshape(fake.shape[1], -1)
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root @ s2 @ root
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * ev.sqrt().sum())


def fid_report(real: torch.Tensor, fake: torch.Tensor, batch: int = 32) -> dict:
    """FID on consecutive minibatches of ``batch`` pairs (a last incomplete one is dropped unless it is the only one) and on the whole set."""
    n = real.shape[0]
    if n < 2:
        raise VAEStudyError(f"FID needs at least 2 images, got {n}")
    starts = list(range(0, n - batch + 1, batch)) or [0]
    size = batch if n >= batch else n
    per_batch = [frechet_distance(real[s : s + size], fake[s : s + size]) for s in starts]
    return {
        "minibatch": {"batch_size": size, "n_batches": len(per_batch), "n_images_used": size * len(per_batch),
                      "values": per_batch, **summarize(per_batch)},
        "whole_set": {"n": n, "fid": frechet_distance(real, fake)},
        "feature_dim": int(real.shape[1]),
    }


# ---------------------------------------------------------------------------------------------- classifier
def binary_labels(values: pd.Series) -> np.ndarray:
    """The paper's convention: uncertain (-1) counts as positive, missing (NaN) and 0 as negative."""
    v = pd.to_numeric(values, errors="coerce")
    return v.isin([1.0, -1.0]).to_numpy().astype(np.int64)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties averaged); NaN if only one class is present."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def accuracy_f1(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp, fn = int((y & pred).sum()), int((~y & pred).sum()), int((y & ~pred).sum())
    acc = float((y == pred).mean())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0
    return acc, float(f1)


def pct_change(new: float, old: float) -> float:
    return float((new - old) / old * 100) if old and np.isfinite(old) and np.isfinite(new) else float("nan")


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images_u8: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities ``[N, n_targets]``, pooled features ``[N, F]``) of uint8 gray images."""
    from evaluation.classifiers import to_classifier_input

    # xrv's DenseNet and the phantom classifier both feed exactly features2(x) into their final Linear
    # ``classifier``: catch its input during forward instead of running the network twice.
    head = getattr(classifier, "classifier", None)
    caught: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: caught.append(inp[0])) if isinstance(head, nn.Linear) else None
    probs, feats = [], []
    try:
        for s in range(0, len(images_u8), batch_size):
            x = torch.from_numpy(images_u8[s : s + batch_size]).float().div(255.0).unsqueeze(1).to(device)
            xin = to_classifier_input(x)
            caught.clear()
            probs.append(classifier(xin).float().cpu())
            f = caught[0] if len(caught) == 1 else classifier.features2(xin)
            feats.append(f.float().flatten(1).cpu())
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def table1(labels: pd.DataFrame, targets: Sequence[str], p_orig: np.ndarray, p_recon: np.ndarray, threshold: float = 0.5) -> tuple[pd.DataFrame, list[str]]:
    """Table 1 rows for every mapped label the classifier predicts; also returns notes on labels left out."""
    rows, notes = [], []
    targets = list(targets)
    for label, xrv_label in TABLE1_MAPPING.items():
        if xrv_label not in targets:
            notes.append(f"{label} -> {xrv_label}: the classifier has no such output; row left out")
            continue
        j = targets.index(xrv_label)
        y = binary_labels(labels[label])
        a_o, f_o = accuracy_f1(y, p_orig[:, j] >= threshold)
        a_r, f_r = accuracy_f1(y, p_recon[:, j] >= threshold)
        rows.append({
            "label": label, "xrv_label": xrv_label, "n": len(y), "prevalence_pct": 100 * y.mean(),
            "acc_original_pct": 100 * a_o, "acc_recon_pct": 100 * a_r, "acc_change_pct": pct_change(a_r, a_o),
            "f1_original_pct": 100 * f_o, "f1_recon_pct": 100 * f_r, "f1_change_pct": pct_change(f_r, f_o),
            "auroc_original": auroc(y, p_orig[:, j]), "auroc_recon": auroc(y, p_recon[:, j]),
            "acc_always_negative_pct": 100 * (1 - y.mean()), "threshold": threshold,
        })
    return pd.DataFrame(rows, columns=TABLE1_COLUMNS), notes


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), np.nan)


# ---------------------------------------------------------------------------------------------- breakdown
def metrics_by_finding(per_image: pd.DataFrame, labels: pd.DataFrame, metrics=("rmse_xrv", "psnr_8bit", "ssim_8bit")) -> pd.DataFrame:
    """Per CheXpert class: metric mean ± sd for positive and negative images, and a Mann–Whitney p (uncorrected)."""
    from scipy.stats import mannwhitneyu

    from datamodules.mimic_cxr import CHEXPERT_CLASSES

    rows = []
    for finding in CHEXPERT_CLASSES:
        y = binary_labels(labels[finding]).astype(bool)
        row = {"finding": finding, "n_positive": int(y.sum()), "n_negative": int((~y).sum())}
        for m in metrics:
            v = per_image[m].to_numpy(dtype=np.float64)
            pos, neg = v[y & np.isfinite(v)], v[~y & np.isfinite(v)]
            row[f"{m}_pos_mean"] = float(pos.mean()) if pos.size else float("nan")
            row[f"{m}_pos_sd"] = float(pos.std(ddof=1)) if pos.size > 1 else float("nan")
            row[f"{m}_neg_mean"] = float(neg.mean()) if neg.size else float("nan")
            row[f"{m}_neg_sd"] = float(neg.std(ddof=1)) if neg.size > 1 else float("nan")
            row[f"{m}_mwu_p"] = float(mannwhitneyu(pos, neg).pvalue) if pos.size and neg.size else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- figures
def plot_distributions(per_image: pd.DataFrame, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [("rmse_xrv", "RMSE (xrv scale, [-1024, 1024])"), ("rmse_8bit", "RMSE (8-bit gray levels)"),
             ("psnr_8bit", "PSNR per image (dB)"), ("ssim_8bit", "SSIM (0–255, data_range 255)")]
    fig, axes = plt.subplots(1, len(specs), figsize=(4 * len(specs), 3.2))
    for ax, (col, name) in zip(axes, specs):
        v = per_image[col].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=min(30, max(5, v.size // 3)), color="0.4", edgecolor="white")
            ax.axvline(np.median(v), color="C3", lw=1, label=f"median {np.median(v):.3g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("images")
    fig.suptitle(title or f"Reconstruction metrics per image (n={len(per_image)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(originals: np.ndarray, recons: np.ndarray, ids: Sequence[str], path: Path, n: int = 4, seed: int = 0) -> None:
    """Figure 3a: original (top), reconstruction (middle), |difference| (bottom) for ``n`` random images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(originals))
    idx = sorted(np.random.default_rng(seed).choice(len(originals), size=n, replace=False))
    fig, axes = plt.subplots(3, n, figsize=(3 * n, 9), squeeze=False)
    for c, i in enumerate(idx):
        diff = np.abs(originals[i].astype(np.int16) - recons[i].astype(np.int16))
        axes[0, c].imshow(originals[i], cmap="gray", vmin=0, vmax=255)
        axes[1, c].imshow(recons[i], cmap="gray", vmin=0, vmax=255)
        im = axes[2, c].imshow(diff, cmap="magma", vmin=0, vmax=max(1, int(np.percentile(diff, 99.5))))
        axes[0, c].set_title(str(ids[i])[-24:], fontsize=8)
        fig.colorbar(im, ax=axes[2, c], fraction=0.046, label="|diff| (8-bit)")
    for r, name in enumerate(("original", "reconstruction", "|difference|")):
        axes[r, 0].set_ylabel(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- provenance
VAE_STUDY_PACKAGES = ("torch", "diffusers", "torchxrayvision", "torchmetrics", "torch-fidelity", "scikit-image", "numpy", "pandas", "matplotlib", "scipy")


def _sha256(path: Path) -> Optional[str]:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def classifier_weights_file(name: str, cache_dir: Optional[str]) -> Optional[str]:
    if name in ("none", "tiny-phantom"):
        from evaluation.classifiers import CLASSIFIER_FILE, TINY_PHANTOM_DIR

        return str(TINY_PHANTOM_DIR / CLASSIFIER_FILE) if name == "tiny-phantom" else None
    import torchxrayvision as xrv

    urls = xrv.models.model_urls
    key = name if name in urls else next((k for k in urls if k.endswith(f"-{name}")), None)
    if key is None:
        return None
    folder = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".torchxrayvision" / "models_data"
    return str(folder / Path(urls[key]["weights_url"]).name)


# ---------------------------------------------------------------------------------------------- study
@dataclass
class StudyConfig:
    out: str
    mimic_root: Optional[str] = None
    image_folder: Optional[str] = None
    n: Optional[int] = None
    seed: int = 0
    split: str = "all"
    resolution: int = 512
    pretrained: str = "CompVis/stable-diffusion-v1-4"
    batch_size: int = 8
    device: str = "auto"
    classifier: str = "densenet121-res224-all"
    xrv_cache_dir: Optional[str] = None
    threshold: float = 0.5
    fid_features: str = "inception"
    inception_weights: Optional[str] = None
    fid_batch: int = 32
    mask_corners: float = 0.0
    on_bad_image: str = "fail"
    n_examples: int = 4
    reader_pairs: int = 100

    def validate(self) -> None:
        if (self.mimic_root is None) == (self.image_folder is None):
            raise VAEStudyError("give exactly one of --mimic_root or --image_folder")
        if self.n is not None and self.n < 1:
            raise VAEStudyError(f"--n must be >= 1, got {self.n}")
        if self.resolution < 8 or self.resolution % 8:
            raise VAEStudyError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        if self.fid_features not in ("inception", "xrv", "none"):
            raise VAEStudyError(f"--fid_features must be inception, xrv or none, got {self.fid_features!r}")
        if self.fid_features == "xrv" and self.classifier == "none":
            raise VAEStudyError("--fid_features xrv needs a classifier (--classifier is 'none')")
        if not 0 <= self.mask_corners < 0.5:
            raise VAEStudyError(f"--mask_corners must be in [0, 0.5), got {self.mask_corners}")
        if self.on_bad_image not in ("fail", "skip"):
            raise VAEStudyError(f"--on_bad_image must be fail or skip, got {self.on_bad_image!r}")
        if self.batch_size < 1 or self.fid_batch < 2:
            raise VAEStudyError("--batch_size must be >= 1 and --fid_batch >= 2")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def run_study(cfg: StudyConfig, fid_extractor: Optional[nn.Module] = None, log: Callable[[str], None] = print) -> Path:
    """Run the whole study; write everything into ``cfg.out``; return it. ``fid_extractor`` overrides ``fid_features``."""
    from tqdm.auto import tqdm

    cfg.validate()
    started = time.time()
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    # fail fast on missing weights, before any long computation
    if fid_extractor is None and cfg.fid_features == "inception":
        inception_weights_path(cfg.inception_weights)
    classifier = None
    if cfg.classifier != "none":
        from evaluation.classifiers import load_classifier

        classifier = load_classifier(cfg.classifier, cfg.xrv_cache_dir).eval()

    # --- input
    if cfg.mimic_root:
        n = 700 if cfg.n is None else cfg.n
        records = select_mimic(cfg.mimic_root, n, cfg.seed, cfg.split)
        source = f"MIMIC-CXR-JPG at {cfg.mimic_root}: {len(records)} random frontal images (seed {cfg.seed}, split {cfg.split})"
    else:
        records = select_folder(cfg.image_folder, cfg.n, cfg.seed)
        source = f"image folder {cfg.image_folder}: {len(records)} images"
    records, originals, skipped = load_images(records, cfg.resolution, cfg.on_bad_image)
    has_labels = "Atelectasis" in records.columns
    log(f"{source}; {len(records)} loaded, {len(skipped)} skipped")

    # --- reconstruction
    vae, vae_key = load_vae(cfg.pretrained)
    vae.to(device)
    recons = np.empty_like(originals)
    for s in tqdm(range(0, len(originals), cfg.batch_size), desc="VAE encode/decode"):
        recons[s : s + cfg.batch_size] = reconstruct(vae, originals[s : s + cfg.batch_size], device)
    vae.to("cpu")
    del vae

    # --- image metrics
    mask = corner_mask(originals.shape[1:], cfg.mask_corners)
    rows = []
    for i in tqdm(range(len(originals)), desc="RMSE/PSNR/SSIM", disable=len(originals) < 20):
        rows.append(pair_metrics(originals[i], recons[i], mask))
    per_image = pd.concat([records[["image_id"]].reset_index(drop=True), pd.DataFrame(rows)], axis=1)

    # --- classifier
    table, table_notes, cos, clf_targets = None, [], None, None
    if classifier is not None:
        classifier = classifier.to(device)
        clf_targets = list(getattr(classifier, "targets", getattr(classifier, "pathologies", [])))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*resolution.*")
            p_orig, f_orig = classifier_outputs(classifier, originals, cfg.batch_size, device)
            p_recon, f_recon = classifier_outputs(classifier, recons, cfg.batch_size, device)
        cos = cosine_similarities(f_orig, f_recon)
        per_image["feature_cosine_similarity"] = cos
        probs = {"image_id": per_image["image_id"]}
        for j, t in enumerate(clf_targets):
            if t:
                probs[f"p_original_{t}"] = p_orig[:, j]
                probs[f"p_recon_{t}"] = p_recon[:, j]
        pd.DataFrame(probs).to_csv(out / "classifier_probabilities.csv", index=False)
        if has_labels:
            table, table_notes = table1(records, clf_targets, p_orig, p_recon, cfg.threshold)
            table.to_csv(out / "classifier_table.csv", index=False)

    # --- FID
    fid, fid_name = None, None
    if fid_extractor is not None or cfg.fid_features != "none":
        if fid_extractor is None:
            if cfg.fid_features == "inception":
                fid_extractor, fid_name = InceptionFeatures(cfg.inception_weights), "Inception-v3 pool3 (2048)"
            else:
                fid_extractor, fid_name = ClassifierFeatures(classifier), f"{cfg.classifier} features2 (domain FID)"
        else:
            fid_name = f"custom extractor {type(fid_extractor).__name__}"
        if isinstance(fid_extractor, ClassifierFeatures):  # the classifier's features2: computed above already
            real, fake = torch.from_numpy(f_orig).double(), torch.from_numpy(f_recon).double()
        else:
            fid_extractor = fid_extractor.to(device).eval()
            feats = {"original": [], "reconstruction": []}
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*resolution.*")
                for s in tqdm(range(0, len(originals), cfg.batch_size), desc="FID features"):
                    for key, arr in (("original", originals), ("reconstruction", recons)):
                        x = torch.from_numpy(arr[s : s + cfg.batch_size]).float().div(255.0).unsqueeze(1).to(device)
                        feats[key].append(fid_extractor(x).double().cpu())
            real, fake = torch.cat(feats["original"]), torch.cat(feats["reconstruction"])
        fid = fid_report(real, fake, cfg.fid_batch)
        fid["features"] = fid_name
        rows_fid = [{"kind": f"minibatch (batch {fid['minibatch']['batch_size']})", "n_per_side": fid["minibatch"]["batch_size"],
                     "n_batches": fid["minibatch"]["n_batches"], "mean": fid["minibatch"]["mean"], "sd": fid["minibatch"]["sd"],
                     "median": fid["minibatch"]["median"], "min": fid["minibatch"]["min"], "max": fid["minibatch"]["max"], "features": fid_name},
                    {"kind": "whole set", "n_per_side": fid["whole_set"]["n"], "n_batches": 1, "mean": fid["whole_set"]["fid"],
                     "sd": float("nan"), "median": fid["whole_set"]["fid"], "min": fid["whole_set"]["fid"], "max": fid["whole_set"]["fid"],
                     "features": fid_name}]
        pd.DataFrame(rows_fid).to_csv(out / "fid.csv", index=False)

    # --- tables
    per_image.to_csv(out / "per_image_metrics.csv", index=False)
    summary_rows = []
    for col, desc in [("rmse_8bit", "RMSE, 8-bit (0–255), data_range 255"), ("rmse_xrv", "RMSE, xrv scale ([-1024, 1024]), data_range 2048"),
                      ("psnr_8bit", "PSNR per image (dB), data_range 255"), ("psnr_xrv", "PSNR per image (dB), data_range 2048 on xrv scale"),
                      ("ssim_8bit", "SSIM, data_range 255"), ("ssim_xrv", "SSIM, data_range 2048 on xrv scale")] + \
            ([("feature_cosine_similarity", f"cosine similarity of {cfg.classifier} features2")] if cos is not None else []):
        s = summarize(per_image[col])
        summary_rows.append({"metric": col, "description": desc, **s, "n_infinite": int(np.isinf(per_image[col].to_numpy(np.float64)).sum())})
    summary_df = pd.DataFrame(summary_rows)
    summary_df.to_csv(out / "image_metrics_summary.csv", index=False)
    pooled = {scale: pooled_psnr(per_image[f"mse_{scale}"], scale) for scale in SCALES}
    by_finding = None
    if has_labels:
        by_finding = metrics_by_finding(per_image, records)
        by_finding.to_csv(out / "metrics_by_finding.csv", index=False)

    # --- figures, reader kit
    plot_distributions(per_image, out / "metrics_distribution.png")
    plot_examples(originals, recons, list(records["image_id"]), out / "examples.png", cfg.n_examples, cfg.seed)
    kit_dir = None
    if cfg.reader_pairs > 0:
        from evaluation.reader_kit import make_reader_kit

        kit_dir = make_reader_kit(list(zip(originals, recons)), out / "reader_kit", n=cfg.reader_pairs, seed=cfg.seed,
                                  ids=list(records["image_id"]), title="VAE reconstruction reader study")

    # --- provenance
    provenance = {
        "study": "vae-reconstruction",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": cfg.__dict__,
        "source": source,
        "dicom_ids" if cfg.mimic_root else "image_ids": list(records["image_id"]),
        "skipped": skipped,
        "seed": cfg.seed,
        "vae_weights": vae_key,
        "classifier": cfg.classifier,
        "classifier_weights_file": classifier_weights_file(cfg.classifier, cfg.xrv_cache_dir),
        "fid_features": fid_name,
        "inception_weights_file": getattr(fid_extractor, "weights_path", None),
        "table1_mapping": TABLE1_MAPPING,
        "ssim_settings": SSIM_KWARGS,
        "reconstruction": "VAE posterior mean, decoded, channel mean, rounded to uint8",
        "mask_corners": cfg.mask_corners,
        "device": str(device),
        "git_commit": git_commit()["commit"],
        "packages": package_versions(VAE_STUDY_PACKAGES),
        "seconds": round(time.time() - started, 1),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str), encoding="utf-8")

    # --- summary.md
    md = write_summary(out, cfg, source, len(records), skipped, summary_df, pooled, table, table_notes, clf_targets, cos, fid, by_finding, kit_dir)
    log(md)
    return out


def write_summary(out, cfg, source, n, skipped, summary_df, pooled, table, table_notes, clf_targets, cos, fid, by_finding, kit_dir) -> str:
    s = {r["metric"]: r for r in summary_df.to_dict("records")}
    L = [f"# VAE reconstruction study", "",
         f"- Images: {source}; **N = {n}** used, {len(skipped)} skipped (unreadable)." + (f" Skipped: {[k['path'] for k in skipped]}" if skipped else ""),
         f"- Resolution: {cfg.resolution} px (shorter side resized, centre crop), VAE: `{cfg.pretrained}` (posterior mean, no sampling).",
         f"- Reconstructions are rounded to 8 bits (as a saved image would be); metrics use scikit-image with an explicit data_range.",
         f"- SSIM: Wang et al. settings (Gaussian window, sigma 1.5, population covariance)." ,
         f"- Corners masked for the image metrics: {'no' if not cfg.mask_corners else f'yes, four squares of side {cfg.mask_corners:g} x image size (burnt-in annotations)'}"
         " (classifier and FID always see whole images).", "",
         "## Image quality (per image)", "",
         "PSNR is computed **per image** and then summarised; the pooled PSNR (from the mean MSE over all images) is given separately.",
         "RMSE depends on the scale: 8-bit gray levels (0–255) or torchxrayvision's [-1024, 1024] (× 2048/255). PSNR does not, "
         "because data_range follows the scale. SSIM does (its luminance term is not invariant to the offset of the scale), so it is given on both. The paper's \"RMSE 41.0, PSNR 33.6 dB\" fits only on the xrv scale (REFERENCE §5).", "",
         "| metric | mean ± sd; median; range (n) |", "|---|---|"]
    for key in ("rmse_xrv", "rmse_8bit", "psnr_8bit", "ssim_8bit", "ssim_xrv") + (("feature_cosine_similarity",) if cos is not None else ()):
        digits = 3 if key.startswith(("ssim", "feature")) else 2
        r = s[key]
        extra = f" ({r['n_infinite']} identical pair(s) with infinite PSNR left out)" if r["n_infinite"] else ""
        L.append(f"| {r['description']} | {format_summary(r, digits)}{extra} |")
    L += ["", f"Pooled PSNR (from the mean MSE over all N = {n} images): {_fmt(pooled['8bit'], 2)} dB (identical on both scales).",
          "", "Paper (700 images, 512 px): RMSE 41.0 ± 8, median 41.4, range 20.4–76.3; PSNR 33.6 ± 1.8, median 33.3, range 28.1–39.5; "
          "SSIM 0.92 ± 0.02, median 0.93, range 0.8–0.96.", ""]
    if table is not None or clf_targets is not None:
        L += ["## Classifier", "", f"Classifier: `{cfg.classifier}`; input 1 channel in xrv's [-1024, 1024] range. "
              f"Threshold for accuracy and F1: **{cfg.threshold}** on the classifier's outputs (xrv weights calibrate 0.5 as the operating point). "
              "AUROC does not depend on it. Labels: uncertain (-1) counts as positive, missing as negative (paper's convention).", "",
              "Label mapping (MIMIC CheXpert -> classifier output):", ""]
        for k, v in TABLE1_MAPPING.items():
            L.append(f"- {k} -> {v}" + (" (loose match, presumed for the paper's 12th label)" if k in LOOSE_MATCHES else ""))
        L += [f"- {note}" for note in table_notes]
        if table is not None and len(table):
            L += ["", f"Table 1 (N = {n}; acc./F1 in %, % change = relative change recon vs original):", "",
                  "| Label | Prevalence | Acc. original | Acc. recon. | Acc. %change | F1 original | F1 recon. | F1 %change | AUROC original | AUROC recon. | Acc. always-negative |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in table.to_dict("records"):
                L.append(f"| {r['label']} | {_fmt(r['prevalence_pct'])} | {_fmt(r['acc_original_pct'])} | {_fmt(r['acc_recon_pct'])} | {_fmt(r['acc_change_pct'])} | "
                         f"{_fmt(r['f1_original_pct'])} | {_fmt(r['f1_recon_pct'])} | {_fmt(r['f1_change_pct'])} | {_fmt(r['auroc_original'], 3)} | "
                         f"{_fmt(r['auroc_recon'], 3)} | {_fmt(r['acc_always_negative_pct'])} |")
            L += ["", "An accuracy below 'Acc. always-negative' means the classifier does worse than always answering 'absent' at this threshold "
                  "(the paper's Fracture row: 2.4 % prevalence, 15.7 % accuracy, suggests its threshold was not the calibrated 0.5)."]
        elif table is None:
            L += ["", "No labels for these images (plain folder): no Table 1; probabilities are in classifier_probabilities.csv."]
        L.append("")
    if fid is not None:
        mb, ws = fid["minibatch"], fid["whole_set"]
        L += ["## FID (originals vs reconstructions)", "", f"Features: {fid['features']} ({fid['feature_dim']}-d); torchmetrics' FID formula (unbiased covariances), evaluated with symmetric eigendecompositions.", "",
              f"- **Minibatch FID** (paper's protocol): {mb['n_batches']} consecutive batches of {mb['batch_size']} originals vs their "
              f"{mb['batch_size']} reconstructions: {format_summary(mb, 2)} — per batch N = {mb['batch_size']} per side.",
              f"- **Whole-set FID**: N = {ws['n']} per side: {_fmt(ws['fid'], 2)}.", "",
              "With N far below the feature dimension the covariances are rank-deficient: FID on 32 samples is dominated by sample-size bias, "
              "and is comparable neither to standard FID (>= 10k samples) nor across different N (REFERENCE §4).", ""]
    if by_finding is not None:
        L += ["## Image quality by finding", "", "Mean ± sd for images positive / negative for each CheXpert class (uncertain = positive); "
              "p: Mann–Whitney U, uncorrected for multiple testing. Full table: metrics_by_finding.csv.", "",
              "| finding | n pos | RMSE xrv pos | RMSE xrv neg | p | SSIM pos | SSIM neg | p |", "|---|---|---|---|---|---|---|---|"]
        for r in by_finding.to_dict("records"):
            L.append(f"| {r['finding']} | {r['n_positive']} | {_fmt(r['rmse_xrv_pos_mean'])} ± {_fmt(r['rmse_xrv_pos_sd'])} | "
                     f"{_fmt(r['rmse_xrv_neg_mean'])} ± {_fmt(r['rmse_xrv_neg_sd'])} | {_fmt(r['rmse_xrv_mwu_p'], 3)} | "
                     f"{_fmt(r['ssim_8bit_pos_mean'], 3)} | {_fmt(r['ssim_8bit_neg_mean'], 3)} | {_fmt(r['ssim_8bit_mwu_p'], 3)} |")
        L.append("")
    L += ["## Files", "", "- per_image_metrics.csv, image_metrics_summary.csv" + (", metrics_by_finding.csv" if by_finding is not None else "")
          + (", classifier_table.csv" if table is not None else "") + (", classifier_probabilities.csv" if clf_targets is not None else "")
          + (", fid.csv" if fid is not None else ""),
          "- metrics_distribution.png (Figure 3b), examples.png (Figure 3a: original / reconstruction / |difference|)",
          "- provenance.json (image ids, seed, weights, package versions)"]
    if kit_dir is not None:
        L.append(f"- reader_kit/: blinded pairs, index.html, scores.csv to fill in, key_PRIVATE.csv (keep from the reader); "
                 f"summarise with `python evaluate.py vae-scores {Path(kit_dir) / 'scores.csv'}`")
    L += ["", "These files contain real images when run on MIMIC: keep them local (PhysioNet data use agreement)."]
    text = "\n".join(L) + "\n"
    (Path(out) / "summary.md").write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py vae", description="VAE reconstruction study (paper Table 1, Figure 3).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mimic_root", help="MIMIC-CXR-JPG v2.0.0 root: N random frontal images")
    src.add_argument("--image_folder", help="a plain folder of images (all, or a random --n)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: 700 from MIMIC, all of a folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="all", help="MIMIC split to sample from: all, train, validate, test (default all)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--pretrained", default="CompVis/stable-diffusion-v1-4", help="SD hub id, pipeline folder, or preset (tiny-phantom, tiny-random)")
    p.add_argument("--out", required=True, help="output folder (local only: it holds real images)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--classifier", default="densenet121-res224-all", help="xrv weights name, tiny-phantom, or none")
    p.add_argument("--xrv_cache_dir", default=None, help="folder holding the xrv weights file (default ~/.torchxrayvision/models_data)")
    p.add_argument("--threshold", type=float, default=0.5, help="threshold on classifier outputs for accuracy/F1 (default 0.5)")
    p.add_argument("--fid_features", default="inception", choices=("inception", "xrv", "none"))
    p.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_WEIGHTS_FILE} (default: torch.hub cache)")
    p.add_argument("--fid_batch", type=int, default=32, help="minibatch size for the paper's minibatch FID (default 32)")
    p.add_argument("--mask_corners", type=float, default=0.0, help="mask four corner squares of this fraction of the image side before the image metrics")
    p.add_argument("--on_bad_image", default="fail", choices=("fail", "skip"))
    p.add_argument("--n_examples", type=int, default=4, help="images in examples.png")
    p.add_argument("--reader_pairs", type=int, default=100, help="pairs in the blinded reader kit (0: no kit)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = StudyConfig(**vars(args))
    try:
        run_study(cfg)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"evaluate.py vae: error: {err}", file=sys.stderr)
        return 2
    return 0


def scores_main(argv=None) -> int:
    from evaluation.reader_kit import ScoreSheetError, format_scores, summarize_scores

    p = argparse.ArgumentParser(prog="evaluate.py vae-scores", description="Summarise a filled reader-study scoring sheet.")
    p.add_argument("sheet", help="the filled scores.csv")
    p.add_argument("--key", default=None, help="the kit's key_PRIVATE.csv (default: beside the sheet, if present) to check for missing rows")
    p.add_argument("--min_score", type=int, default=1)
    p.add_argument("--max_score", type=int, default=5)
    args = p.parse_args(argv)
    try:
        s = summarize_scores(args.sheet, args.min_score, args.max_score, args.key)
    except ScoreSheetError as err:
        print(f"evaluate.py vae-scores: error: {err}", file=sys.stderr)
        return 2
    print(format_scores(s))
    print(json.dumps(s))
    return 0
