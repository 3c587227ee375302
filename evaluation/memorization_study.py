"""The memorization audit: ``python evaluate.py memorization --runs runs/demo --out results/memorization``.

Does a model copy its training patients? For each model (the base model as a control, then each run or export) the
audit generates ``--n_per_prompt`` images per training finding with fixed seeds (or reads ``--generated FOLDER``),
and compares them in one feature space (``--features``: a classifier's ``features2``, default torchxrayvision's
DenseNet, ``--classifier tiny-phantom`` for the demo; or ``pixel``: gray pixels, best correlation over shifts of a few
pixels) with

* the run's **training images**, read from its ``data.json`` (exactly what the run saw), and
* **held-out images**: the test split's frontal images positive for the same findings, from **other patients** (a
  test image of a training patient is an error naming the patients).

A generated image is a **copy** when it is closer to a training image than the ``--quantile`` (default 0.99) of
held-out images come (:mod:`metrics.memorization`); the false-positive rate of that threshold on held-out images is
measured and reported. Outputs in ``--out``: ``memorization.md`` and ``memorization.csv`` (one row per generated image),
``closest_pairs.png`` (the closest generated/training pairs side by side), ``similarities.png`` (histograms of
nearest-training similarity for generated, held-out and training images, the latter self-excluded) and
``provenance.json``.

**Local only.** Training images are real patient images: the figures stay in ``--out`` and nothing is logged to W&B.
A feature-space criterion is evidence of copying, not proof of privacy either way.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from core import provenance
from core.errors import UserError
from core.run_folder import RunFolder, RunFolderError
from datamodules.mimic_cxr import check_patient_disjoint
from datamodules.prompts import FINDING_PROMPTS
from datamodules.study_images import load_images, select_folder, select_mimic
from evaluation.sources import SourceError, Strategy, load_strategies
from metrics.memorization import aligned_pixel_similarity, audit, calibrate, cosine_similarity, nearest
from metrics.scores import MetricInputError, frechet_distance
from models.generator import seed_value

STUDY_PACKAGES = ("torch", "diffusers", "transformers", "torchxrayvision", "numpy")


class MemorizationAuditError(UserError, ValueError):
    """Bad input to the audit: the message names the option, run or file."""


@dataclass
class AuditConfig:
    runs: list[str]
    out: str
    base: Optional[str] = "auto"
    generated: Optional[str] = None
    n_per_prompt: int = 16
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    features: str = "classifier"
    classifier: str = "densenet121-res224-all"
    xrv_cache_dir: Optional[str] = None
    quantile: float = 0.99
    max_heldout: Optional[int] = None
    heldout_root: Optional[str] = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class RealSets:
    train: pd.DataFrame
    train_images: np.ndarray  # uint8 [N, H, W]
    heldout: pd.DataFrame
    heldout_images: np.ndarray
    findings: list[str]
    resolution: int


def read_training_data(run: str) -> dict:
    try:
        data = RunFolder(run).data()
    except RunFolderError as err:
        raise MemorizationAuditError(f"--runs {run}: {err}; the audit checks exactly the images a run trained on") from None
    if data.get("dataset") != "MIMIC-CXR-JPG" or not data.get("train"):
        raise MemorizationAuditError(f"--runs {run}: its data.json lists no training images ({data.get('dataset')!r}); the "
                                     "audit applies to runs trained on MIMIC-CXR-JPG images")
    return data


def real_sets(cfg: AuditConfig) -> RealSets:
    """The first run's training images (from its data.json) and the held-out test-split images of other patients."""
    data = read_training_data(cfg.runs[0])
    root, findings, resolution = data["root"], list(data["findings"]), int(data["resolution"])
    everything = select_mimic(root, None, cfg.seed, "all")
    wanted = [r["dicom_id"] for r in data["train"]]
    train = everything[everything["dicom_id"].isin(wanted)].set_index("dicom_id").loc[
        [d for d in dict.fromkeys(wanted) if d in set(everything["dicom_id"])]].reset_index()
    missing = sorted(set(wanted) - set(train["dicom_id"]))
    if missing:
        raise MemorizationAuditError(f"{root}: {len(missing)} training image(s) of {cfg.runs[0]} are not in its metadata, "
                                     f"e.g. {missing[:3]}; the audit needs the data the run trained on")
    heldout_root = cfg.heldout_root or root
    heldout = select_mimic(heldout_root, None, cfg.seed, "test")
    heldout = heldout[(heldout[findings] == 1.0).any(axis=1)].reset_index(drop=True)
    check_patient_disjoint(train, heldout, f"the training images of {cfg.runs[0]} and the held-out images (test split of {heldout_root})")
    if cfg.max_heldout is not None and len(heldout) > cfg.max_heldout:
        heldout = heldout.sample(n=cfg.max_heldout, random_state=cfg.seed).reset_index(drop=True)
    train, train_images, _ = load_images(train, resolution)
    heldout, heldout_images, _ = load_images(heldout, resolution)
    return RealSets(train, train_images, heldout, heldout_images, findings, resolution)


class FeatureSpace:
    """Similarities in the chosen space: ``pixel`` (aligned pixels) or a classifier's ``features2`` (cosine)."""

    def __init__(self, cfg: AuditConfig):
        self.name = cfg.features
        self.extractor = None
        if cfg.features == "classifier":
            from metrics.features import feature_extractor

            self.extractor = feature_extractor("classifier", classifier=cfg.classifier, xrv_cache_dir=cfg.xrv_cache_dir)
            self.name = f"classifier features ({cfg.classifier})"
        elif cfg.features != "pixel":
            raise MemorizationAuditError(f"--features {cfg.features!r}: expected 'classifier' or 'pixel'")

    def embed(self, images_u8: np.ndarray) -> Optional[torch.Tensor]:
        if self.extractor is None:
            return None
        from metrics.features import extract

        return extract(self.extractor, torch.from_numpy(images_u8).float().div(255).unsqueeze(1))

    def similarity(self, a_u8: np.ndarray, b_u8: np.ndarray, a_feats=None, b_feats=None) -> np.ndarray:
        if self.extractor is None:
            return aligned_pixel_similarity(a_u8.astype(np.float32) / 255, b_u8.astype(np.float32) / 255)
        return cosine_similarity(a_feats if a_feats is not None else self.embed(a_u8),
                                 b_feats if b_feats is not None else self.embed(b_u8))


def generated_sets(cfg: AuditConfig, real: RealSets) -> list[tuple[str, pd.DataFrame, np.ndarray]]:
    """``(model name, one row per image: prompt and seed, uint8 images)`` for the base model and every run."""
    if cfg.generated:
        records = select_folder(cfg.generated)
        kept, images, _ = load_images(records, real.resolution)
        return [(Path(cfg.generated).name, kept.assign(prompt="", seed=-1), images)]
    prompts = [FINDING_PROMPTS[f] for f in real.findings if f in FINDING_PROMPTS]
    base = cfg.base
    if base == "auto":
        base = RunFolder(cfg.runs[0]).config()["model"]["init_args"]["model"]["pretrained"]
    sets = []
    for strategy in load_strategies(None if base in (None, "none") else base, cfg.runs, prompts):
        sets.append(generate_set(cfg, strategy, prompts, real.resolution))
    return sets


def generate_set(cfg: AuditConfig, strategy: Strategy, prompts: Sequence[str], resolution: int):
    seeds = [cfg.seed + j for j in range(cfg.n_per_prompt)]
    rows, images = [], []
    for asked, prompt in zip(prompts, strategy.prompts):
        out = strategy.generator.generate([prompt] * len(seeds), seeds=seeds, steps=cfg.steps, guidance=cfg.guidance,
                                          height=resolution, width=resolution)
        images.append((out.mean(1) * 255).round().clamp(0, 255).to(torch.uint8).numpy())
        rows += [{"prompt": asked, "seed": s} for s in seeds]
    return strategy.name, pd.DataFrame(rows), np.concatenate(images)


def audit_model(cfg: AuditConfig, space: FeatureSpace, real: RealSets, feats: dict, name: str, rows: pd.DataFrame,
                images: np.ndarray) -> tuple[pd.DataFrame, dict]:
    gen_feats = space.embed(images)
    g2t = space.similarity(images, real.train_images, gen_feats, feats["train"])
    g2h = space.similarity(images, real.heldout_images, gen_feats, feats["heldout"])
    result = audit(g2t, feats["h2t"], real.train["subject_id"].tolist(), cfg.quantile, seed=cfg.seed)
    held_index, held_sim = nearest(g2h)
    table = rows.reset_index(drop=True).assign(
        model=name, nearest_train=real.train["dicom_id"].to_numpy()[result["nearest_train"]],
        train_similarity=result["similarity"], nearest_heldout=real.heldout["dicom_id"].to_numpy()[held_index],
        heldout_similarity=held_sim, copy=result["is_copy"])
    summary = {"model": name, "n": len(images), **{f"copy_{k}": v for k, v in result["copy_rate"].items()},
               "mean_train_similarity": float(result["similarity"].mean()),
               "train_images_copied": int((result["copies_per_train_image"] > 0).sum()),
               "subjects_copied": result["subjects_copied"]["copied"], "subjects": result["subjects_copied"]["of"]}
    if gen_feats is not None:
        summary.update(fid_and_mifid(gen_feats, feats["train"]))
    return table, summary


def fid_and_mifid(generated: torch.Tensor, train: torch.Tensor, epsilon: float = 0.1) -> dict:
    """FID of generated against training features, and MiFID: FID divided by the memorization distance ``d`` (mean over
    generated images of 1 − the largest cosine similarity to a training image) when ``d < epsilon`` (Bai et al. 2021;
    torchmetrics' ``MemorizationInformedFrechetInceptionDistance`` does the same on Inception features only)."""
    if len(generated) < 2 or len(train) < 2:
        return {"fid": float("nan"), "mifid": float("nan"), "memorization_distance": float("nan")}
    fid = frechet_distance(train.double(), generated.double())
    distance = float(1 - nearest(cosine_similarity(generated, train))[1].mean())
    return {"fid": fid, "mifid": fid / (distance + 1e-15) if distance < epsilon else fid, "memorization_distance": distance}


def run_audit(cfg: AuditConfig, log=print) -> Path:
    started = time.time()
    out = Path(cfg.out)
    if (out / "memorization.csv").exists() and not cfg.overwrite:
        raise MemorizationAuditError(f"--out {out}: holds an earlier audit; pass --overwrite or give another folder")
    real = real_sets(cfg)
    space = FeatureSpace(cfg)
    feats = {"train": space.embed(real.train_images), "heldout": space.embed(real.heldout_images)}
    feats["h2t"] = space.similarity(real.heldout_images, real.train_images, feats["heldout"], feats["train"])
    calibration = calibrate(nearest(feats["h2t"])[1], cfg.quantile, cfg.seed)  # too few held-out images: refused before generating
    log(f"training images: {len(real.train)}; held-out images (test split, other patients): {len(real.heldout)}; "
        f"features: {space.name}; copy threshold {calibration.threshold:.4f}")
    tables, summaries, pools = [], [], {}
    for name, rows, images in generated_sets(cfg, real):
        table, summary = audit_model(cfg, space, real, feats, name, rows, images)
        tables.append(table), summaries.append(summary)
        pools[name] = images
        log(f"{name}: {summary['copy_copies']}/{summary['n']} copies ({100 * summary['copy_rate']:.1f}%)")
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "memorization.csv", index=False)
    from evaluation.memorization_report import pairs_figure, report_markdown, similarity_histogram

    t2t = space.similarity(real.train_images, real.train_images, feats["train"], feats["train"])
    similarity_histogram(table, nearest(feats["h2t"])[1], nearest(t2t, exclude_self=True)[1], calibration.threshold,
                         out / "similarities.png")
    pairs_figure(table, pools, real, out / "closest_pairs.png")
    (out / "memorization.md").write_text(report_markdown(cfg, space.name, real, calibration, summaries))
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("extra",)}
    inputs = {"runs": cfg.runs, "training_images": len(real.train), "heldout_images": len(real.heldout),
              "calibration": calibration.as_dict(), "seconds": round(time.time() - started, 1)}
    provenance.write(out / "provenance.json", provenance.record("study/memorization", settings, inputs, packages=STUDY_PACKAGES))
    log(f"wrote {out / 'memorization.md'}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py memorization", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folders (their data.json names the training images) or exports")
    p.add_argument("--out", required=True, help="output folder (stays local: it shows training images)")
    p.add_argument("--base", default="auto", help="base model as a control: 'auto' (the first run's), a preset/folder/id, or 'none'")
    p.add_argument("--generated", default=None, help="a folder of generated images to audit instead of generating")
    p.add_argument("--n_per_prompt", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--features", default="classifier", choices=["classifier", "pixel"])
    p.add_argument("--classifier", default="densenet121-res224-all", help="xrv weights name, or tiny-phantom (demo)")
    p.add_argument("--xrv_cache_dir", default=None)
    p.add_argument("--quantile", type=float, default=0.99, help="copy threshold: this quantile of held-out similarities")
    p.add_argument("--max_heldout", type=int, default=None, help="at most this many held-out images (default: all)")
    p.add_argument("--heldout_root", default=None, help="a MIMIC-CXR-JPG root whose test split gives the held-out images "
                   "(default: the run's own root); its patients must not be training patients")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = AuditConfig(**vars(build_parser().parse_args(argv)))
    if cfg.n_per_prompt < 1:
        print(f"evaluate.py memorization: error: --n_per_prompt {cfg.n_per_prompt}: at least 1", file=sys.stderr)
        return 2
    try:
        run_audit(cfg)
    except (MemorizationAuditError, SourceError, MetricInputError) as err:
        print(f"evaluate.py memorization: error: {err}", file=sys.stderr)
        return 2
    return 0
