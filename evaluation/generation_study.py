"""The generation study (paper Table 4, Figure 4) and the finding-correctness metric it asks for:
``python evaluate.py generation``.

For the base Stable Diffusion and each trained run or export (any strategy), the same prompts are sampled with
the same seeds. Per (strategy, prompt):

* **FID** against real images of the matching finding, with its N and a grouped-jackknife interval over the
  generated images (:func:`metrics.scores.fid_with_ci`, docs/statistics.md). What the paper leaves open, fixed here:
  the reference set is frontal images of the chosen split (``test`` by default); prompts that name a
  pleural effusion are compared with effusion-positive images, every other prompt (the plain and the
  style prompt) with "No Finding" images. KID is added where N is small (``--kid``). Features (``--fid_features``):
  Inception-v3, the xrv classifier's ``features2``, or a Hugging Face image encoder's CLS embedding
  (``image_encoder``, e.g. RAD-DINO as CheXGenBench uses).
* **Precision, recall, density, coverage** (Naeem et al. 2020, k = 5) on the same features.
* **Diversity**: mean pairwise MS-SSIM of the prompt's samples (higher = less diverse), with its
  scale setting.

Per strategy, **finding correctness** (:mod:`metrics.finding_correctness`): a classifier (torchxrayvision's DenseNet,
or the shipped phantom classifier) scores P(effusion) for every image; the AUROC of separating the effusion
prompt's images from the plain prompt's images, with Newcombe's score interval, and the accuracy at the
classifier's 0.5 operating point. Textual-inversion models use their token in place of "lung xray".

The paper's Table 4 values (0.03–0.27) are not on the scale of standard Inception FID; ours are not
comparable with them. :func:`run_study` is the sequence of steps; each step is a function below it.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from core import provenance
from core.errors import UserError
from core.grids import labelled_grid
from datamodules.prompts import PAPER_PROMPTS, normal_and_effusion_prompts, prompt_finding
from datamodules.study_images import reference_images
from evaluation.reader_kit import SUMMARY_FILE, ReaderKitExistsError, check_kit_folder
from evaluation.report_prompts import ReportEvaluationError, run_report_study
from evaluation.sources import SourceError, Strategy, choose_samplers, load_strategies, steps_text, study_device
from metrics.classifiers import finding_probabilities, load_classifier
from metrics.features import ImageEncoderError, extract, feature_extractor
from metrics.finding_correctness import finding_correctness
from metrics.scores import PRDC_K, MetricInputError, fid_with_ci, kid, ms_ssim_diversity, prdc
from models.generator import seed_value

EFFUSION = "Pleural Effusion"
NORMAL = "No Finding"
# The paper's strategies (and its base model); any other strategy is marked "beyond the paper" in the tables.
PAPER_STRATEGIES = ("UNetFineTuning", "TextualInversion", "TextualProjection", "base model")
STUDY_PACKAGES = ("torch", "diffusers", "transformers", "torchmetrics", "torchxrayvision", "numpy", "pandas")
# the sampler of a Stable Diffusion model when no --scheduler is given (SD v1.4's own, as before other families existed);
# a model of another family samples with its own (Sana: euler)
SD_SAMPLER = "pndm"


class GenerationStudyError(UserError, ValueError):
    """Bad input to the generation study: the message names the option, file or value."""


@dataclass
class StudyConfig:
    mimic_root: str
    out: str
    runs: list[str] = field(default_factory=list)
    base: Optional[str] = "CompVis/stable-diffusion-v1-4"
    prompts: list[str] = field(default_factory=lambda: list(PAPER_PROMPTS))
    n_per_prompt: int = 100
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5  # one guidance for every model (comparable), Sana's included (SanaPipeline's own default: 4.5)
    scheduler: Optional[str] = None  # None: each model's own (SD_SAMPLER for Stable Diffusion; sources.study_sampler)
    resolution: Optional[int] = None  # default: the model's native size
    split: str = "test"
    n_real: Optional[int] = None
    fid_features: str = "inception"
    image_encoder: Optional[str] = None  # with fid_features image_encoder: a Hugging Face id or folder (RAD-DINO)
    inception_weights: Optional[str] = None
    classifier: str = "densenet121-res224-all"
    xrv_cache_dir: Optional[str] = None
    kid: bool = False
    n_boot: int = 100
    batch_size: int = 8
    device: str = "auto"
    grid_per_prompt: int = 4
    reader_kit: int = 0  # generated images per (strategy, prompt) in the blinded reader kit
    reader_real: int = 0  # real reference images per finding mixed into the kit
    figure1: Optional[str] = None  # a run name: Figure 1, the base beside it on the plain and effusion prompts
    overwrite: bool = False  # replace a reader kit already in out (its key and a filled sheet are kept aside)
    # --prompts reports (evaluation/report_prompts.py): impressions of test-split reports as prompts
    reports_root: Optional[str] = None  # default: mimic_root (files/pXX/pSUBJECT/sSTUDY.txt)
    report_labels: Optional[str] = None  # default: mimic_root's mimic-cxr-2.0.0-chexpert.csv.gz
    report_classes: Optional[list[str]] = None  # default: the classifier's findings and "No Finding"
    n_reports_per_class: int = 10
    images_per_report: int = 1
    deid_markers: str = "remove"  # MIMIC-CXR's ___ markers out of the impressions (datamodules.reports.scrub_deid_markers)

    def validate(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise GenerationStudyError("--prompts: give at least one non-empty prompt")
        if self.n_per_prompt < 2:
            raise GenerationStudyError(f"--n_per_prompt {self.n_per_prompt}: FID and diversity need at least 2 images per prompt")
        if not self.runs and not self.base:
            raise GenerationStudyError("nothing to evaluate: give --runs and/or --base")
        if self.fid_features not in ("inception", "xrv", "image_encoder"):
            raise GenerationStudyError(f"--fid_features: {self.fid_features!r}; expected inception, xrv or image_encoder")
        if self.fid_features == "image_encoder" and not self.image_encoder:
            raise GenerationStudyError("--fid_features image_encoder needs --image_encoder ID_OR_FOLDER (e.g. microsoft/rad-dino)")
        if self.figure1:
            if not self.base:
                raise GenerationStudyError(f"--figure1 {self.figure1}: Figure 1 compares the base model with a run; give --base")
            names = [Path(r).name for r in self.runs]
            if self.figure1 not in names:
                raise GenerationStudyError(f"--figure1 {self.figure1}: not one of the --runs ({names})")
            if not normal_and_effusion_prompts(self.prompts):
                raise GenerationStudyError("--figure1: the prompts need a plain one and one naming a pleural effusion")


@dataclass
class Tables:
    """What the steps collect: one row per (strategy, prompt) for FID and diversity, one per strategy for correctness."""

    fid: list = field(default_factory=list)
    diversity: list = field(default_factory=list)
    correctness: list = field(default_factory=list)
    cells: dict = field(default_factory=dict)  # (strategy, prompt) -> the first images, for the figures
    kit_items: list = field(default_factory=list)
    kit_ids: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> Path:
    cfg.validate()
    started = time.time()
    device = _device(cfg.device)
    out = Path(cfg.out)
    if cfg.reader_kit > 0 or cfg.reader_real > 0:
        check_kit_folder(out / "reader_kit", cfg.overwrite)  # before the generation, not after
    (out / "grids").mkdir(parents=True, exist_ok=True)
    classifier, extractor = load_networks(cfg, device)  # weights first: a missing file stops the study before any generation
    strategies = load_strategies(cfg.base, cfg.runs, cfg.prompts)
    choose_samplers(strategies, cfg.scheduler, SD_SAMPLER)  # a sampler a model cannot use: refused before any image
    resolution = cfg.resolution or strategies[0].generator.native_size
    real_features, real_n = encode_references(cfg, extractor, resolution, device, log)
    tables = Tables()
    add_real_images_to_kit(cfg, resolution, tables)
    for strategy in strategies:
        evaluate_strategy(cfg, strategy, classifier, extractor, real_features, resolution, device, tables, out)
    write_outputs(cfg, strategies, tables, real_n, resolution, out, log)
    write_provenance(cfg, strategies, real_n, resolution, out, started)
    return out


def load_networks(cfg: StudyConfig, device):
    """The finding classifier and the FID feature network (Inception, the classifier's features2 or an image encoder)."""
    try:
        classifier = load_classifier(cfg.classifier, cfg.xrv_cache_dir).to(device)
        name, options = {"inception": ("inception", {"inception_weights": cfg.inception_weights}),
                         "xrv": ("classifier", {"classifier": classifier}),
                         "image_encoder": ("image_encoder", {"model": cfg.image_encoder})}[cfg.fid_features]
        extractor = feature_extractor(name, **options).to(device)
    except (FileNotFoundError, ImageEncoderError) as err:
        raise GenerationStudyError(str(err)) from None
    return classifier, extractor


def _references(cfg: StudyConfig, finding: str, n: Optional[int], resolution: int, seed: int) -> np.ndarray:
    from datamodules.mimic_cxr import MIMICDataError
    from datamodules.study_images import ImageSelectionError

    try:
        return reference_images(cfg.mimic_root, finding, cfg.split, n, resolution, seed)[1]
    except (ImageSelectionError, MIMICDataError) as err:
        raise GenerationStudyError(str(err)) from None


def encode_references(cfg: StudyConfig, extractor, resolution: int, device, log) -> tuple[dict, dict]:
    """Features of the fixed reference set of every finding the prompts name."""
    features, counts = {}, {}
    for finding in sorted({prompt_finding(p) for p in cfg.prompts}):
        images = _references(cfg, finding, cfg.n_real, resolution, cfg.seed)
        features[finding] = extract(extractor, _u8_to_float(images), device)
        counts[finding] = len(images)
        log(f"reference {finding!r}: {len(images)} frontal {cfg.split!r} images at {resolution} px")
    return features, counts


def add_real_images_to_kit(cfg: StudyConfig, resolution: int, tables: Tables) -> None:
    for finding in sorted({prompt_finding(p) for p in cfg.prompts}) if cfg.reader_real > 0 else ():
        images = _references(cfg, finding, cfg.reader_real, resolution, cfg.seed + 1)
        tables.kit_items += list(images)
        tables.kit_ids += [f"real | {finding}"] * len(images)


def generate_prompt(cfg: StudyConfig, strategy: Strategy, asked: str, resolution: int) -> torch.Tensor:
    """``cfg.n_per_prompt`` images of one prompt, seeds ``cfg.seed + i``: ``[N, 3, H, W]`` in [0, 1]."""
    from tqdm.auto import tqdm

    seeds = [cfg.seed + i for i in range(cfg.n_per_prompt)]
    images = []
    for s in tqdm(range(0, len(seeds), cfg.batch_size), desc=f"{strategy.name}: {asked[:40]}", disable=len(seeds) <= cfg.batch_size):
        chunk = seeds[s:s + cfg.batch_size]
        images.append(strategy.generator.generate([asked] * len(chunk), seeds=chunk, steps=cfg.steps, guidance=cfg.guidance,
                                                  scheduler=strategy.sampler, height=resolution, width=resolution,
                                                  batch_size=cfg.batch_size).cpu())
    return torch.cat(images)


def evaluate_strategy(cfg: StudyConfig, strategy: Strategy, classifier, extractor, real_features: dict, resolution: int, device,
                      tables: Tables, out: Path) -> None:
    """Every prompt of one strategy: FID (and KID), diversity, P(effusion); then its grid and finding correctness."""
    strategy.generator.to(device)
    p_effusion = {}
    for prompt, asked in zip(cfg.prompts, strategy.prompts):
        images = generate_prompt(cfg, strategy, asked, resolution)
        gray = images.mean(1, keepdim=True)
        finding = prompt_finding(prompt)
        fake = extract(extractor, gray, device)  # encoded once, for FID and KID
        row = {"strategy": strategy.name, "prompt": prompt, "prompt_used": asked, "reference": finding, "features": cfg.fid_features,
               "sampler": strategy.sampler, "guidance": cfg.guidance, **fid_with_ci(real_features[finding], fake, cfg.n_boot, cfg.seed)}
        if cfg.kid:
            row.update({k: v for k, v in kid(real_features[finding], fake).items() if k in ("kid", "kid_std", "subset_size")})
        row.update(prdc_or_nan(real_features[finding], fake))
        tables.fid.append(row)
        tables.diversity.append({"strategy": strategy.name, "prompt": prompt,
                                 **ms_ssim_diversity(gray, max_pairs=2000, seed=cfg.seed, n_boot=cfg.n_boot)})
        p_effusion[prompt] = finding_probabilities(classifier, images.to(device), EFFUSION).numpy()
        tables.cells[(strategy.name, prompt)] = images[: cfg.grid_per_prompt]
        for img in gray[: cfg.reader_kit]:
            tables.kit_items.append((img[0].numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8))
            tables.kit_ids.append(f"{strategy.name} | {prompt}")
    k = min(cfg.grid_per_prompt, cfg.n_per_prompt)
    grid = labelled_grid(torch.cat([tables.cells[(strategy.name, p)] for p in cfg.prompts]),
                         [p for p in strategy.prompts for _ in range(k)], k, title=strategy.name)
    grid.save(out / "grids" / f"{_slug(strategy.name)}.png")
    pair = normal_and_effusion_prompts(cfg.prompts)
    if pair:
        normal, eff = pair
        score = finding_correctness(p_effusion[eff], p_effusion[normal], EFFUSION, cfg.n_boot, cfg.seed)
        tables.correctness.append({"strategy": strategy.name, "finding_prompt": eff, "normal_prompt": normal,
                                   "mean_p_effusion_finding_prompt": score["mean_prob_finding_prompt"],
                                   "mean_p_effusion_normal_prompt": score["mean_prob_normal_prompt"],
                                   **{k: v for k, v in score.items() if not k.startswith("mean_prob") and k != "finding"}})
    strategy.generator.to("cpu")


def prdc_or_nan(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """Precision, recall, density and coverage (k = 5), or NaN where a set has too few images for k."""
    if min(len(real), len(fake)) <= PRDC_K:
        return {"precision": float("nan"), "recall": float("nan"), "density": float("nan"), "coverage": float("nan"),
                "prdc_k": PRDC_K}
    return prdc(real, fake)


def write_outputs(cfg: StudyConfig, strategies: list[Strategy], tables: Tables, real_n: dict, resolution: int, out: Path, log) -> None:
    """table4.csv, fid.csv, diversity.csv, finding_correctness.csv, figure4.png (figure1.png), the reader kit, results.md."""
    fid_df, div_df, corr_df = pd.DataFrame(tables.fid), pd.DataFrame(tables.diversity), pd.DataFrame(tables.correctness)
    fid_df.to_csv(out / "fid.csv", index=False)
    div_df.to_csv(out / "diversity.csv", index=False)
    corr_df.to_csv(out / "finding_correctness.csv", index=False)
    names = [s.name for s in strategies]
    fid_df.pivot(index="strategy", columns="prompt", values="fid").reindex(index=names, columns=list(cfg.prompts)).to_csv(out / "table4.csv")
    figure4(tables.cells, names, list(cfg.prompts), out / "figure4.png")
    if cfg.figure1:  # the same images as Figure 4, two rows: what fine-tuning changed
        figure4(tables.cells, [names[0], cfg.figure1], normal_and_effusion_prompts(cfg.prompts), out / "figure1.png")
    if tables.kit_items:
        from evaluation.reader_kit import make_reader_kit

        make_reader_kit(tables.kit_items, out / "reader_kit", seed=cfg.seed, ids=tables.kit_ids, title="Generated chest X-rays",
                        questions={"finding_present": "Is a pleural effusion visible?"}, overwrite=cfg.overwrite, log=log)
        log(f"reader kit: {len(tables.kit_items)} blinded images in {out / 'reader_kit'} (keep key_PRIVATE.csv from the reader); "
            f"summarise the filled sheet with `python evaluate.py generation-scores {out / 'reader_kit' / 'scores.csv'}`")
    md = results_markdown(cfg, strategies, fid_df, div_df, corr_df, real_n, resolution)
    (out / "results.md").write_text(md)
    log(md)
    log(f"wrote {out}/results.md, table4.csv, fid.csv, diversity.csv, finding_correctness.csv, figure4.png"
        f"{', figure1.png' if cfg.figure1 else ''}, grids/, provenance.json")


def write_provenance(cfg: StudyConfig, strategies: list[Strategy], real_n: dict, resolution: int, out: Path, started: float) -> None:
    settings = {**asdict(cfg), "resolution": resolution, "seeds": [cfg.seed + i for i in range(cfg.n_per_prompt)],
                "seconds": round(time.time() - started, 1)}
    settings["samplers"] = {s.name: s.sampler for s in strategies}
    settings["guidance_policy"] = "one guidance for every model"
    inputs = {"reference_counts": real_n,
              "strategies": [{"name": s.name, "source": s.source, "prompts_used": s.prompts, "sampler": s.sampler,
                              "guidance": cfg.guidance, "family": s.generator.sd.family, **s.generator.info}
                             for s in strategies]}
    provenance.write(out / "provenance.json", provenance.record("study/generation", settings, inputs, packages=STUDY_PACKAGES))


def guidance_note(strategies: Sequence[Strategy]) -> str:
    """" (the same for every model)" when the models are of more than one family (Sana's pipeline default is 4.5)."""
    return " (the same for every model)" if len({s.generator.sd.family for s in strategies}) > 1 else ""


def _device(name: str) -> torch.device:
    return study_device(name)


def _u8_to_float(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).float().div(255.0).unsqueeze(1)  # [N, 1, H, W] in [0, 1]


def _fmt_ci(v: float, lo: float, hi: float, digits: int = 1) -> str:
    if not np.isfinite(v):
        return "n/a"
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else ""
    return f"{v:.{digits}f}{ci}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "strategy"


def _wrap_label(name: str, width: int = 18) -> str:
    """A row label on lines of at most ``width`` characters, broken after "_" or " " (run names stay as they are)."""
    import re

    lines, line = [], ""
    for part in re.split(r"(?<=[_ ])", name):
        if line and len(line) + len(part) > width:
            lines.append(line.rstrip())
            line = ""
        line += part
    return "\n".join(lines + [line.rstrip()])


def figure4(cells: dict, strategies: Sequence[str], prompts: Sequence[str], path: Path) -> None:
    """Rows: strategies; columns: prompts; each cell the first samples side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    per_cell = max(len(cells[(strategies[0], prompts[0])]), 1)
    fig, axes = plt.subplots(len(strategies), len(prompts), squeeze=False,
                             figsize=(3.2 * len(prompts), (3.2 / per_cell + 0.45) * len(strategies) + 0.5))
    for i, s in enumerate(strategies):
        for j, p in enumerate(prompts):
            ax = axes[i][j]
            ax.imshow(make_grid(cells[(s, p)], nrow=len(cells[(s, p)]), padding=1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(p, fontsize=8, wrap=True)
            if j == 0:
                ax.set_ylabel(_wrap_label(s), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prdc_markdown(cfg, names: Sequence[str], fid_df: pd.DataFrame) -> list[str]:
    """Precision / recall / density / coverage per strategy and prompt, on the FID features."""
    lines = [f"## Precision / recall / density / coverage ({cfg.fid_features} features, k = {PRDC_K}, Naeem et al. 2020)", "",
             "Fidelity (precision, density: are generated images where real ones are) and diversity (recall, coverage: "
             "do they reach all of the real images). n/a: fewer than k + 1 images on a side.", "",
             "| Strategy | " + " | ".join(cfg.prompts) + " |", "|---|" + "---:|" * len(cfg.prompts)]
    for name in names:
        cells = []
        for p in cfg.prompts:
            r = fid_df[(fid_df.strategy == name) & (fid_df.prompt == p)].iloc[0]
            cells.append("n/a" if pd.isna(r.precision) else
                         f"{r.precision:.2f} / {r.recall:.2f} / {r.density:.2f} / {r.coverage:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def results_markdown(cfg, strategies, fid_df, div_df, corr_df, real_n, resolution) -> str:
    names = [s.name for s in strategies]
    lines = ["# Generation study", "",
             f"{cfg.n_per_prompt} images per prompt and strategy (seeds {cfg.seed}..{cfg.seed + cfg.n_per_prompt - 1}), "
             f"{steps_text(cfg.steps, {s.name: s.sampler for s in strategies})}, guidance {cfg.guidance}{guidance_note(strategies)}, "
             f"{resolution} px. References: frontal {cfg.split!r} images, "
             + ", ".join(f"{k}: N = {v}" for k, v in real_n.items())
             + (f". Intervals (95 %, docs/statistics.md): FID ± t · jackknife SE over the generated images "
                f"({min(cfg.n_boot, cfg.n_per_prompt)} groups, the reference set fixed); AUROC: Newcombe's score interval; "
                f"MS-SSIM: percentile bootstrap over pairs ({cfg.n_boot} resamples)." if cfg.n_boot > 0 else
                ". No intervals (--n_boot 0)."), "",
             f"## Table 4: FID ({cfg.fid_features} features), N generated per cell = {cfg.n_per_prompt}", "",
             "| Strategy | " + " | ".join(cfg.prompts) + " |", "|---|" + "---:|" * len(cfg.prompts)]
    beyond = {s.name for s in strategies if s.generator.info.get("strategy", "base model") not in PAPER_STRATEGIES}
    for name in names:
        cells = []
        for p in cfg.prompts:
            r = fid_df[(fid_df.strategy == name) & (fid_df.prompt == p)].iloc[0]
            cells.append(_fmt_ci(r.fid, r.ci_low, r.ci_high) + (f", KID {r.kid:.3f}" if "kid" in r else ""))
        lines.append(f"| {name}{' †' if name in beyond else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Not comparable with the paper's Table 4 (0.03–0.27), which is not on the standard Inception-FID scale."
              + (" † beyond the paper: a later recipe (" + ", ".join(sorted({s.generator.info['strategy'] for s in strategies
                                                                              if s.name in beyond})) + ") for comparison."
                 if beyond else ""), ""]
    lines += prdc_markdown(cfg, names, fid_df)
    lines += ["## Finding correctness (P(effusion) from the classifier)", "",
              "| Strategy | AUROC effusion vs plain prompt | accuracy at 0.5 | mean P, effusion prompt | mean P, plain prompt |",
              "|---|---:|---:|---:|---:|"]
    for r in corr_df.itertuples():
        lines.append(f"| {r.strategy} | {_fmt_ci(r.auroc, r.ci_low, r.ci_high, 3)} | {r.accuracy:.3f} | "
                     f"{r.mean_p_effusion_finding_prompt:.3f} | {r.mean_p_effusion_normal_prompt:.3f} |")
    lines += ["", "## Diversity: mean pairwise MS-SSIM within a prompt (higher = less diverse)", "",
              "| Strategy | " + " | ".join(cfg.prompts) + " |", "|---|" + "---:|" * len(cfg.prompts)]
    for name in names:
        cells = []
        for p in cfg.prompts:
            r = div_df[(div_df.strategy == name) & (div_df.prompt == p)].iloc[0]
            cells.append(_fmt_ci(r.ms_ssim, r.ci_low, r.ci_high, 3))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    scales = div_df.iloc[0]
    lines += ["", f"MS-SSIM with {scales.scales} scales (weights {scales.betas}) at {scales.image_size} px.", "",
              "![Figure 4](figure4.png)", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py generation", description="Generation study (paper Table 4, Figure 4) and finding correctness.")
    p.add_argument("--mimic_root", required=True, help="MIMIC-CXR-JPG root (reference images of the matching finding)")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", nargs="*", default=[], help="run folders written by train.py or export folders written by export.py (any strategy)")
    p.add_argument("--base", default="CompVis/stable-diffusion-v1-4", help="base SD (hub id, folder or preset); 'none' to leave it out")
    p.add_argument("--prompts", nargs="+", default=list(PAPER_PROMPTS), help="prompts to sample (default: the paper's "
                   "three), or the single word 'reports': impressions of test-split reports, every finding scored")
    p.add_argument("--n_per_prompt", type=int, default=100)
    p.add_argument("--seed", type=seed_value, default=0, help="first seed, 0 to 2**64-1 (default 0)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance, the same for every model "
                   "(default 7.5, Stable Diffusion's; SanaPipeline's own is 4.5)")
    p.add_argument("--scheduler", default=None, choices=("pndm", "ddim", "euler", "dpm"), help="one sampler for every "
                   f"model (default: each model's own: {SD_SAMPLER} for Stable Diffusion, the base's for other families: "
                   "Sana euler; Sana refuses pndm and ddim)")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--split", default="test", choices=("train", "validate", "test", "all"))
    p.add_argument("--n_real", type=int, default=None, help="reference images per finding (default: all)")
    p.add_argument("--fid_features", default="inception", choices=("inception", "xrv", "image_encoder"),
                   help="FID/KID/PRDC features: Inception-v3, the xrv classifier's features2, or --image_encoder's CLS")
    p.add_argument("--image_encoder", default=None, help="with --fid_features image_encoder: a Hugging Face image encoder "
                   "id or folder, e.g. microsoft/rad-dino (CheXGenBench's FID features)")
    p.add_argument("--inception_weights", default=None)
    p.add_argument("--classifier", default="densenet121-res224-all", help="xrv weights name or tiny-phantom")
    p.add_argument("--xrv_cache_dir", default=None)
    p.add_argument("--kid", action="store_true", help="also KID (subset size capped at N)")
    p.add_argument("--n_boot", type=int, default=100, help="intervals: jackknife groups for FID (at most N), bootstrap "
                   "resamples for MS-SSIM; AUROC's is analytic (0: no intervals)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--reader_kit", type=int, default=0, help="generated images per strategy and prompt in a blinded reader kit (0: none)")
    p.add_argument("--reader_real", type=int, default=0, help="real reference images per finding mixed into the kit")
    p.add_argument("--figure1", default=None, metavar="RUN", help="write figure1.png: the base model beside this run (its folder "
                   "name) on the plain and the effusion prompt, as the paper's Figure 1")
    p.add_argument("--overwrite", action="store_true", help="replace a reader kit already in --out (its key and a filled "
                   "score sheet are kept under time-stamped names, never overwritten)")
    g = p.add_argument_group("report-conditioned evaluation (--prompts reports)")
    g.add_argument("--reports_root", default=None, help="folder holding files/pXX/pSUBJECT/sSTUDY.txt (default: --mimic_root)")
    g.add_argument("--report_labels", default=None, help="CheXpert label CSV (default: --mimic_root's)")
    g.add_argument("--report_classes", nargs="+", default=None, help="classes to draw reports for (default: every finding "
                   "the classifier knows, and No Finding)")
    g.add_argument("--n_reports_per_class", type=int, default=10)
    g.add_argument("--images_per_report", type=int, default=1)
    g.add_argument("--deid_markers", choices=("remove", "keep"), default="remove",
                   help="remove (default): MIMIC-CXR's de-identification markers (___) are dropped from the impressions, as "
                        "the training datamodule does; keep: the impressions as written")
    return p


def scores_main(argv: Optional[Sequence[str]] = None) -> int:
    """``evaluate.py generation-scores SHEET``: the filled reader sheet, per source (strategy | prompt, real | finding)."""
    from evaluation.reader_kit import ScoreSheetError, summarize_by_source

    p = argparse.ArgumentParser(prog="evaluate.py generation-scores", description=scores_main.__doc__.split("\n")[0])
    p.add_argument("sheet", help="the filled reader_kit/scores.csv")
    p.add_argument("--key", default=None, help="the kit's key_PRIVATE.csv (default: beside the sheet)")
    args = p.parse_args(argv)
    try:
        rows = summarize_by_source(args.sheet, args.key, questions=("finding_present",))
    except ScoreSheetError as err:
        print(f"evaluate.py generation-scores: error: {err}", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    path = Path(args.sheet).with_name(SUMMARY_FILE)
    table.to_csv(path, index=False)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = StudyConfig(**{k: v for k, v in vars(args).items()})
    if cfg.base and cfg.base.lower() == "none":
        cfg.base = None
    try:
        if cfg.prompts == ["reports"]:
            run_report_study(cfg)
        else:
            run_study(cfg)
    except (GenerationStudyError, SourceError, MetricInputError, ReaderKitExistsError, ReportEvaluationError) as err:
        print(f"evaluate.py generation: error: {err}", file=sys.stderr)
        return 2
    return 0
