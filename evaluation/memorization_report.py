"""The memorization audit's report: the markdown summary, the closest-pairs figure and the similarity histograms
(local files only: they show training images)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from core.grids import labelled_grid


def report_markdown(cfg, space: str, real, calibration, summaries: list[dict]) -> str:
    lines = [
        "# Memorization audit", "",
        f"Runs: {', '.join(cfg.runs)}. Feature space: {space}. Training images: {len(real.train)} "
        f"({real.train['subject_id'].nunique()} patients), from the run's data.json. Held-out images: {len(real.heldout)} "
        f"(test split, findings {', '.join(real.findings)}, other patients).", "",
        *([f"**Left out**: {len(real.skipped)} unreadable image(s) (--on_bad_image skip; listed in provenance.json): a "
           "copy of a training image left out cannot be found.", ""] if real.skipped else []),
        f"**Copy threshold**: similarity to the nearest training image above {calibration.threshold:.4f}, the "
        f"{calibration.quantile:g} quantile of the held-out images' nearest-training similarities (N = {calibration.n_heldout}). "
        f"Measured false-positive rate on held-out images (threshold from one half, counted on the other): "
        f"{100 * calibration.false_positive_rate:.1f}%.", "",
        "| model | generated | copies | copy rate [95% CI] | mean nearest-training similarity | training images copied | "
        "patients copied | FID (train) | MiFID | memorization distance |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        fid = lambda k: f"{s[k]:.2f}" if k in s and np.isfinite(s[k]) else "n/a"
        lines.append(f"| {s['model']} | {s['n']} | {s['copy_copies']} | {100 * s['copy_rate']:.1f}% "
                     f"[{100 * s['copy_ci_low']:.1f}, {100 * s['copy_ci_high']:.1f}] | {s['mean_train_similarity']:.4f} | "
                     f"{s['train_images_copied']} of {len(real.train)} | {s['subjects_copied']} of {s['subjects']} | "
                     f"{fid('fid')} | {fid('mifid')} | {fid('memorization_distance')} |")
    lines += ["", "What this means: a copy is a generated image closer to a training image than real images of other "
              "patients come, in this feature space. It is evidence of copying, not proof of privacy either way: a model "
              "can leak a patient in ways this space does not see, and a flagged image may be a near-duplicate anatomy. "
              "FID and MiFID here compare generated with training features (few images: compare models at equal N only).",
              "", "Files: memorization.csv (one row per generated image), closest_pairs.png, similarities.png. They show "
              "training images: keep them local."]
    return "\n".join(lines) + "\n"


def pairs_figure(table: pd.DataFrame, pools: dict, read_train: Callable[[list], np.ndarray], path: Path, n: int = 8) -> None:
    """The ``n`` closest generated/training pairs, each row: generated | nearest training image, labelled
    (``read_train(dicom_ids)``: those training images, uint8, read for the figure only)."""
    top = table.assign(row=table.groupby("model").cumcount()).nlargest(n, "train_similarity")
    train = read_train(top["nearest_train"].tolist())
    images, labels = [], []
    for k, r in enumerate(top.itertuples()):
        generated = pools[r.model][r.row]
        images += [generated, train[k]]
        label = (f"{r.model} seed {r.seed} | train {r.nearest_train[:8]}: {r.train_similarity:.3f}"
                 f"{' COPY' if r.copy else ''}")
        labels += [label, label]  # labelled_grid takes one label per image and writes each row's first
    tensor = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    labelled_grid(tensor, labels, per_prompt=2, title="closest generated | training pairs").save(path)


def similarity_histogram(table: pd.DataFrame, heldout: np.ndarray, train_self: np.ndarray, threshold: float, path: Path,
                         train_of: Optional[int] = None) -> None:
    """Nearest-training similarity per model, of the held-out images and of training images (self excluded; a sample
    of ``train_of`` training images when ``len(train_self)`` is fewer: the label says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [table[table["model"] == m]["train_similarity"].to_numpy() for m in table["model"].unique()]
    sampled = f", a random {len(train_self)} of {train_of}" if train_of and train_of > len(train_self) else ""
    groups = [*zip(table["model"].unique(), values), ("held-out (other patients)", heldout),
              (f"training (self excluded{sampled})", train_self)]
    lo = min(float(np.min(v)) for _, v in groups)
    bins = np.linspace(lo, 1.0, 40)
    for name, v in groups:
        ax.hist(v, bins=bins, alpha=0.5, density=True, label=f"{name} (N={len(v)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"copy threshold {threshold:.3f}")
    ax.set_xlabel("similarity to the nearest training image")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
