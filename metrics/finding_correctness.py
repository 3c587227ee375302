"""Finding correctness: does the finding named in a prompt appear in the generated image?

A classifier with the torchxrayvision interface (:mod:`metrics.classifiers`) scores each generated image for the
finding; a strategy is judged by how well the scores separate images made from the finding's prompt from images made
from the "no finding" prompt (AUROC, threshold-free, with Newcombe's score interval), and by the accuracy at the
classifier's operating point (0.5).
"""
from __future__ import annotations

import numpy as np
import torch

from metrics.classifiers import finding_probabilities
from metrics.scores import auroc_with_ci

THRESHOLD = 0.5


def finding_correctness(p_finding, p_normal, finding: str, n_boot: int = 0, seed: int = 0) -> dict:
    """From the classifier's probabilities of ``finding`` on images of the finding prompt and of the normal prompt:
    ``{finding, n_per_prompt, mean_prob_finding_prompt, mean_prob_normal_prompt, threshold, accuracy, auroc, ci_low,
    ci_high, n_positive, n_negative}``."""
    pos, neg = np.asarray(p_finding, dtype=np.float64), np.asarray(p_normal, dtype=np.float64)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError("finding correctness needs at least 2 images per prompt")
    accuracy = float(((pos > THRESHOLD).sum() + (neg <= THRESHOLD).sum()) / (len(pos) + len(neg)))
    return {"finding": finding, "n_per_prompt": len(pos), "mean_prob_finding_prompt": float(pos.mean()),
            "mean_prob_normal_prompt": float(neg.mean()), "threshold": THRESHOLD, "accuracy": accuracy,
            **auroc_with_ci(pos, neg, n_boot, seed)}


def finding_correctness_of_images(classifier, finding_images: torch.Tensor, normal_images: torch.Tensor, finding: str,
                                  n_boot: int = 0, seed: int = 0) -> dict:
    """Score images generated from the finding prompt against images from the no-finding prompt (both in [0, 1])."""
    return finding_correctness(finding_probabilities(classifier, finding_images, finding).numpy(),
                               finding_probabilities(classifier, normal_images, finding).numpy(), finding, n_boot, seed)
