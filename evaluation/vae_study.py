"""The VAE reconstruction study (paper section 2.3 / 3.2, Table 1, Figure 3): ``python evaluate.py vae``.

N random frontal MIMIC-CXR images (paper: 700, 512 px) or every image of a plain folder are encoded
and decoded by Stable Diffusion's VAE (posterior mean, no sampling) and compared:

* per-image RMSE / PSNR / SSIM (scikit-image, explicit data range) on the 8-bit scale and on
  torchxrayvision's [-1024, 1024] scale (see :mod:`metrics.image_quality`), optionally with the
  corners (burnt-in annotations) masked out;
* a torchxrayvision classifier on originals and reconstructions: Table 1 (prevalence, accuracy, F1,
  % change) plus AUROC, and the cosine similarity of its pooled ``features2``;
* FID originals vs reconstructions on minibatches of 32 (as the paper) and on the whole set,
  with Inception-v3 (2048) or the classifier's features (a domain FID).

Everything, including real images (Figure 3a panels, the reader kit), goes only to the local
output folder ``--out``. :func:`run_study` is the sequence of steps; each step is a function below it.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from core import provenance
from core.errors import UserError
from datamodules.mimic_cxr import CHEXPERT_CLASSES
from datamodules.study_images import load_images, select_folder, select_mimic
from evaluation.reader_kit import check_kit_folder, scores_main  # noqa: F401 (``evaluate.py vae-scores``, kept here too)
from metrics.classifiers import CHEXPERT_TO_XRV, classifier_outputs, classifier_targets, classifier_weights_file, load_classifier
from metrics.features import INCEPTION_WEIGHTS_FILE, ClassifierFeatures, extract, feature_extractor, inception_weights_path
from metrics.image_quality import SCALES, SSIM_KWARGS, corner_mask, pair_metrics, pooled_psnr
from metrics.scores import accuracy_f1, auroc, cosine_similarities, fid_minibatches, format_summary, summarize
from models.stable_diffusion import StableDiffusionSpec, load_vae

# Table 1's 12 rows: the 11 exact CheXpert<->xrv matches plus the paper's loose "Pleural Other" (docs/formats.md §3).
TABLE1_MAPPING = {**CHEXPERT_TO_XRV, "Pleural Other": "Pleural_Thickening"}
TABLE1_MAPPING = {k: TABLE1_MAPPING[k] for k in sorted(TABLE1_MAPPING)}
LOOSE_MATCHES = {"Pleural Other"}
TABLE1_COLUMNS = [
    "label", "xrv_label", "n", "prevalence_pct",
    "acc_original_pct", "acc_recon_pct", "acc_change_pct",
    "f1_original_pct", "f1_recon_pct", "f1_change_pct",
    "auroc_original", "auroc_recon", "acc_always_negative_pct", "threshold",
]
VAE_STUDY_PACKAGES = ("torch", "diffusers", "torchxrayvision", "torchmetrics", "torch-fidelity", "scikit-image", "numpy", "pandas",
                      "matplotlib", "scipy")


class VAEStudyError(UserError, ValueError):
    """Bad input for the VAE study (no images, unreadable image, bad option)."""


# ---------------------------------------------------------------------------------------------- configuration
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
    overwrite: bool = False  # replace a reader kit already in out (its key and a filled sheet are kept aside)

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


@dataclass
class Results:
    """What the steps of the study compute, in order."""

    source: str = ""
    records: Optional[pd.DataFrame] = None
    originals: Optional[np.ndarray] = None  # uint8 [N, H, W]
    skipped: list = field(default_factory=list)
    vae_key: str = ""
    reconstruction: str = "VAE posterior mean, decoded, channel mean, rounded to uint8"
    recons: Optional[np.ndarray] = None
    per_image: Optional[pd.DataFrame] = None
    summary: Optional[pd.DataFrame] = None
    pooled: dict = field(default_factory=dict)
    targets: Optional[list[str]] = None
    features: Optional[tuple[np.ndarray, np.ndarray]] = None  # classifier features2 of originals and reconstructions
    table: Optional[pd.DataFrame] = None
    table_notes: list = field(default_factory=list)
    cos: Optional[np.ndarray] = None
    fid: Optional[dict] = None
    by_finding: Optional[pd.DataFrame] = None
    kit_dir: Optional[Path] = None

    @property
    def has_labels(self) -> bool:
        return "Atelectasis" in self.records.columns


# ---------------------------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig, fid_extractor: Optional[nn.Module] = None, log: Callable[[str], None] = print) -> Path:
    """Run the whole study; write everything into ``cfg.out``; return it. ``fid_extractor`` overrides ``fid_features``."""
    cfg.validate()
    started = time.time()
    out = Path(cfg.out).expanduser()
    if cfg.reader_pairs > 0:
        check_kit_folder(out / "reader_kit", cfg.overwrite)  # before hours of work, not after
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    classifier, fid_extractor = load_networks(cfg, fid_extractor)  # fail fast on missing weights
    r = load_inputs(cfg, log)
    r.recons, r.vae_key, r.reconstruction = reconstruct_all(cfg, r.originals, device)
    image_quality(cfg, r)
    if classifier is not None:
        classify(cfg, classifier.to(device), r, out, device)
    if fid_extractor is not None:
        fid_originals_vs_reconstructions(cfg, fid_extractor, r, device)
    write_tables(cfg, r, out)
    write_figures(cfg, r, out)
    write_provenance(cfg, r, out, fid_extractor, device, started)
    log(write_summary(out, cfg, r))
    return out


def load_networks(cfg: StudyConfig, fid_extractor: Optional[nn.Module]) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The classifier and the FID feature network, before any long computation (a missing weights file stops here)."""
    if fid_extractor is None and cfg.fid_features == "inception":
        inception_weights_path(cfg.inception_weights)
    classifier = load_classifier(cfg.classifier, cfg.xrv_cache_dir) if cfg.classifier != "none" else None
    if fid_extractor is None and cfg.fid_features == "inception":
        fid_extractor = feature_extractor("inception", inception_weights=cfg.inception_weights)
        fid_extractor.description = "Inception-v3 pool3 (2048)"
    elif fid_extractor is None and cfg.fid_features == "xrv":
        fid_extractor = ClassifierFeatures(classifier)
        fid_extractor.description = f"{cfg.classifier} features2 (domain FID)"
    elif fid_extractor is not None:
        fid_extractor.description = f"custom extractor {type(fid_extractor).__name__}"
    return classifier, fid_extractor


def load_inputs(cfg: StudyConfig, log: Callable[[str], None]) -> Results:
    """N random frontal MIMIC images (700 by default) or the images of a folder, decoded at ``cfg.resolution``."""
    if cfg.mimic_root:
        records = select_mimic(cfg.mimic_root, 700 if cfg.n is None else cfg.n, cfg.seed, cfg.split)
        source = f"MIMIC-CXR-JPG at {cfg.mimic_root}: {len(records)} random frontal images (seed {cfg.seed}, split {cfg.split})"
    else:
        records = select_folder(cfg.image_folder, cfg.n, cfg.seed)
        source = f"image folder {cfg.image_folder}: {len(records)} images"
    records, originals, skipped = load_images(records, cfg.resolution, cfg.on_bad_image)
    log(f"{source}; {len(records)} loaded, {len(skipped)} skipped")
    return Results(source=source, records=records, originals=originals, skipped=skipped)


@torch.no_grad()
def reconstruct(vae, images_u8: np.ndarray, device) -> np.ndarray:
    """uint8 ``[B, H, W]`` -> VAE reconstructions (posterior mean, decoded), gray uint8 ``[B, H, W]``."""
    param = next(vae.parameters())
    x = torch.from_numpy(images_u8).to(device).float().div(127.5).sub(1.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).to(param.dtype)
    latents = vae.encode(x).latent_dist.mean
    out = vae.decode(latents).sample.float().mean(dim=1).clamp(-1, 1)
    return out.add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()


# Families whose autoencoder is deterministic (no posterior to sample): the study encodes and decodes through the base's
# interface (encode_images, decode_latents). Sana's DC autoencoder: latent * scaling_factor, decoded / scaling_factor.
DETERMINISTIC_AUTOENCODERS = ("sana",)


def reconstruct_all(cfg: StudyConfig, originals: np.ndarray, device) -> tuple[np.ndarray, str, str]:
    """Every image through the autoencoder (``cfg.batch_size`` at a time); returns the reconstructions, the weights'
    key and how they were made (Stable Diffusion: the KL posterior's mean; Sana: its deterministic DC autoencoder)."""
    from tqdm.auto import tqdm

    spec = StableDiffusionSpec(pretrained=cfg.pretrained, local_files_only=Path(cfg.pretrained).expanduser().is_dir())
    family = spec.family_name()
    if family == "stable-diffusion":
        vae = load_vae(StableDiffusionSpec(pretrained=cfg.pretrained)).to(device)
        one, how = (lambda batch: reconstruct(vae, batch, device)), "VAE posterior mean, decoded, channel mean, rounded to uint8"
    else:
        one, how = base_reconstruction(cfg, spec, family, device)
    recons = np.empty_like(originals)
    for s in tqdm(range(0, len(originals), cfg.batch_size), desc="VAE encode/decode"):
        recons[s : s + cfg.batch_size] = one(originals[s : s + cfg.batch_size])
    return recons, spec.cache_key(), how


def base_reconstruction(cfg: StudyConfig, spec: StableDiffusionSpec, family: str, device) -> tuple[Callable, str]:
    """A base of another family, reconstructed through its interface (its autoencoder must be deterministic: the
    study compares one reconstruction per image, never a sample). The whole base is loaded (its text encoder too)."""
    from models.stable_diffusion import load_stable_diffusion

    if family not in DETERMINISTIC_AUTOENCODERS:
        raise VAEStudyError(f"--pretrained {cfg.pretrained}: a {family} base; the VAE study on its autoencoder is not "
                            "implemented (it reconstructs Stable Diffusion's posterior mean or a deterministic autoencoder)")
    base = load_stable_diffusion(spec)
    factor = int(base.vae_scale_factor)
    if cfg.resolution % factor:
        raise VAEStudyError(f"--resolution {cfg.resolution}: a {family} base's autoencoder downsamples by {factor}; give a "
                            f"multiple of {factor}")
    base.vae.to(device)

    @torch.no_grad()
    def one(images_u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images_u8).to(device).float().div(127.5).sub(1.0).unsqueeze(1).expand(-1, 3, -1, -1)
        out = base.decode_latents(base.encode_images(x)).float().mean(dim=1).clamp(-1, 1)
        return out.add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()

    return one, f"{family} autoencoder ({type(base.vae).__name__}, deterministic: no posterior), decoded, channel mean, rounded to uint8"


def image_quality(cfg: StudyConfig, r: Results) -> None:
    """Per-image RMSE/PSNR/SSIM on both scales, their summaries, and the pooled PSNR."""
    from tqdm.auto import tqdm

    mask = corner_mask(r.originals.shape[1:], cfg.mask_corners)
    rows = [pair_metrics(r.originals[i], r.recons[i], mask)
            for i in tqdm(range(len(r.originals)), desc="RMSE/PSNR/SSIM", disable=len(r.originals) < 20)]
    r.per_image = pd.concat([r.records[["image_id"]].reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    r.pooled = {scale: pooled_psnr(r.per_image[f"mse_{scale}"], scale) for scale in SCALES}


def classify(cfg: StudyConfig, classifier: nn.Module, r: Results, out: Path, device) -> None:
    """The classifier on originals and reconstructions: probabilities, Table 1 (with labels), feature cosine similarity."""
    r.targets = classifier_targets(classifier)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resolution.*")
        p_orig, f_orig = classifier_outputs(classifier, r.originals, cfg.batch_size, device)
        p_recon, f_recon = classifier_outputs(classifier, r.recons, cfg.batch_size, device)
    r.features = (f_orig, f_recon)
    r.cos = cosine_similarities(f_orig, f_recon)
    r.per_image["feature_cosine_similarity"] = r.cos
    probs = {"image_id": r.per_image["image_id"]}
    for j, t in enumerate(r.targets):
        if t:
            probs[f"p_original_{t}"], probs[f"p_recon_{t}"] = p_orig[:, j], p_recon[:, j]
    pd.DataFrame(probs).to_csv(out / "classifier_probabilities.csv", index=False)
    if r.has_labels:
        r.table, r.table_notes = table1(r.records, r.targets, p_orig, p_recon, cfg.threshold)


def fid_originals_vs_reconstructions(cfg: StudyConfig, extractor: nn.Module, r: Results, device) -> None:
    """FID on minibatches of ``cfg.fid_batch`` (the paper's protocol) and on the whole set."""
    if isinstance(extractor, ClassifierFeatures) and r.features is not None:  # features2 were computed by classify()
        real, fake = (torch.from_numpy(f).double() for f in r.features)
    else:
        extractor = extractor.to(device).eval()
        as_float = lambda arr: torch.from_numpy(arr).float().div(255.0).unsqueeze(1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*resolution.*")
            real = extract(extractor, as_float(r.originals), device, cfg.batch_size)
            fake = extract(extractor, as_float(r.recons), device, cfg.batch_size)
    r.fid = {**fid_minibatches(real, fake, cfg.fid_batch), "features": extractor.description}


def binary_labels(values: pd.Series) -> np.ndarray:
    """The paper's convention: uncertain (-1) counts as positive, missing (NaN) and 0 as negative."""
    v = pd.to_numeric(values, errors="coerce")
    return v.isin([1.0, -1.0]).to_numpy().astype(np.int64)


def pct_change(new: float, old: float) -> float:
    return float((new - old) / old * 100) if old and np.isfinite(old) and np.isfinite(new) else float("nan")


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


def metrics_by_finding(per_image: pd.DataFrame, labels: pd.DataFrame, metrics=("rmse_xrv", "psnr_8bit", "ssim_8bit")) -> pd.DataFrame:
    """Per CheXpert class: metric mean ± sd for positive and negative images, and a Mann–Whitney p (uncorrected)."""
    from scipy.stats import mannwhitneyu

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



# ---------------------------------------------------------------------------------------------- outputs
SUMMARY_METRICS = [("rmse_8bit", "RMSE, 8-bit (0–255), data_range 255"), ("rmse_xrv", "RMSE, xrv scale ([-1024, 1024]), data_range 2048"),
                   ("psnr_8bit", "PSNR per image (dB), data_range 255"), ("psnr_xrv", "PSNR per image (dB), data_range 2048 on xrv scale"),
                   ("ssim_8bit", "SSIM, data_range 255"), ("ssim_xrv", "SSIM, data_range 2048 on xrv scale")]


def write_tables(cfg: StudyConfig, r: Results, out: Path) -> None:
    """per_image_metrics.csv, image_metrics_summary.csv, classifier_table.csv, fid.csv, metrics_by_finding.csv."""
    r.per_image.to_csv(out / "per_image_metrics.csv", index=False)
    specs = SUMMARY_METRICS + ([("feature_cosine_similarity", f"cosine similarity of {cfg.classifier} features2")] if r.cos is not None else [])
    rows = [{"metric": col, "description": desc, **summarize(r.per_image[col]),
             "n_infinite": int(np.isinf(r.per_image[col].to_numpy(np.float64)).sum())} for col, desc in specs]
    r.summary = pd.DataFrame(rows)
    r.summary.to_csv(out / "image_metrics_summary.csv", index=False)
    if r.table is not None:
        r.table.to_csv(out / "classifier_table.csv", index=False)
    if r.fid is not None:
        mb, ws, name = r.fid["minibatch"], r.fid["whole_set"], r.fid["features"]
        pd.DataFrame([
            {"kind": f"minibatch (batch {mb['batch_size']})", "n_per_side": mb["batch_size"], "n_batches": mb["n_batches"],
             "mean": mb["mean"], "sd": mb["sd"], "median": mb["median"], "min": mb["min"], "max": mb["max"], "features": name},
            {"kind": "whole set", "n_per_side": ws["n"], "n_batches": 1, "mean": ws["fid"], "sd": float("nan"),
             "median": ws["fid"], "min": ws["fid"], "max": ws["fid"], "features": name},
        ]).to_csv(out / "fid.csv", index=False)
    if r.has_labels:
        r.by_finding = metrics_by_finding(r.per_image, r.records)
        r.by_finding.to_csv(out / "metrics_by_finding.csv", index=False)


def write_figures(cfg: StudyConfig, r: Results, out: Path) -> None:
    """Figure 3b (metric distributions), Figure 3a (examples) and the blinded reader kit."""
    plot_distributions(r.per_image, out / "metrics_distribution.png")
    plot_examples(r.originals, r.recons, list(r.records["image_id"]), out / "examples.png", cfg.n_examples, cfg.seed)
    if cfg.reader_pairs > 0:
        from evaluation.reader_kit import make_reader_kit

        r.kit_dir = make_reader_kit(list(zip(r.originals, r.recons)), out / "reader_kit", n=cfg.reader_pairs, seed=cfg.seed,
                                    ids=list(r.records["image_id"]), title="VAE reconstruction reader study",
                                    overwrite=cfg.overwrite)


def write_provenance(cfg: StudyConfig, r: Results, out: Path, fid_extractor: Optional[nn.Module], device, started: float) -> None:
    """provenance.json (core.provenance): settings, the image ids, weights and package versions."""
    ids_key = "dicom_ids" if cfg.mimic_root else "image_ids"
    inputs = {"source": r.source, ids_key: list(r.records["image_id"]), "skipped": r.skipped, "vae_weights": r.vae_key,
              "classifier": cfg.classifier, "classifier_weights_file": classifier_weights_file(cfg.classifier, cfg.xrv_cache_dir),
              "fid_features": r.fid["features"] if r.fid else None,
              "inception_weights_file": getattr(fid_extractor, "weights_path", None)}
    settings = {**asdict(cfg), "table1_mapping": TABLE1_MAPPING, "ssim_settings": SSIM_KWARGS, "device": str(device),
                "reconstruction": r.reconstruction,
                "seconds": round(time.time() - started, 1)}
    provenance.write(out / "provenance.json", provenance.record("study/vae", settings, inputs, packages=VAE_STUDY_PACKAGES))



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


def vae_words(res: Results) -> str:
    """How the reconstructions were made, in the summary's words."""
    if res.reconstruction.startswith("VAE posterior mean"):
        return "posterior mean, no sampling"
    return res.reconstruction.split(", decoded")[0]


def write_summary(out, cfg: StudyConfig, res: Results) -> str:
    """summary.md: every table, with N, scales and conventions spelt out."""
    source, n, skipped, pooled = res.source, len(res.records), res.skipped, res.pooled
    table, table_notes, clf_targets, cos, fid, by_finding, kit_dir = (res.table, res.table_notes, res.targets, res.cos, res.fid,
                                                                      res.by_finding, res.kit_dir)
    s = {r["metric"]: r for r in res.summary.to_dict("records")}
    L = [f"# VAE reconstruction study", "",
         f"- Images: {source}; **N = {n}** used, {len(skipped)} skipped (unreadable)." + (f" Skipped: {[k['path'] for k in skipped]}" if skipped else ""),
         f"- Resolution: {cfg.resolution} px (shorter side resized, centre crop), VAE: `{cfg.pretrained}` ({vae_words(res)}).",
         f"- Reconstructions are rounded to 8 bits (as a saved image would be); metrics use scikit-image with an explicit data_range.",
         f"- SSIM: Wang et al. settings (Gaussian window, sigma 1.5, population covariance)." ,
         f"- Corners masked for the image metrics: {'no' if not cfg.mask_corners else f'yes, four squares of side {cfg.mask_corners:g} x image size (burnt-in annotations)'}"
         " (classifier and FID always see whole images).", "",
         "## Image quality (per image)", "",
         "PSNR is computed **per image** and then summarised; the pooled PSNR (from the mean MSE over all images) is given separately.",
         "RMSE depends on the scale: 8-bit gray levels (0–255) or torchxrayvision's [-1024, 1024] (× 2048/255). PSNR does not, "
         "because data_range follows the scale. SSIM does (its luminance term is not invariant to the offset of the scale), so it is given on both. The paper's \"RMSE 41.0, PSNR 33.6 dB\" fits only on the xrv scale (docs/formats.md §5).", "",
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
              "and is comparable neither to standard FID (>= 10k samples) nor across different N (docs/formats.md §4).", ""]
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



def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fmt(x, digits=1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


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
    p.add_argument("--overwrite", action="store_true", help="replace a reader kit already in --out (its key and a filled "
                   "score sheet are kept under time-stamped names, never overwritten)")
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
