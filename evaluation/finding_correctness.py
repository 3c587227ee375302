"""Finding correctness: does the finding named in a prompt appear in the generated image?

A classifier with the torchxrayvision interface (``evaluation/classifiers.py``) scores each
generated image for the finding; a strategy is judged by how well the scores separate images made
from the finding's prompt from images made from the "no finding" prompt (AUROC, threshold-free), and
by the accuracy at the classifier's operating point (0.5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchmetrics.functional.classification import binary_auroc

from evaluation.classifiers import finding_probabilities


@dataclass
class FindingCorrectness:
    finding: str
    n_per_prompt: int
    mean_prob_finding_prompt: float
    mean_prob_normal_prompt: float
    auroc: float
    accuracy: float

    def as_dict(self) -> dict:
        return asdict(self)


def finding_correctness(classifier, finding_images: torch.Tensor, normal_images: torch.Tensor, finding: str) -> FindingCorrectness:
    """Score images generated from the finding prompt against images from the no-finding prompt (both in [0, 1])."""
    if len(finding_images) < 2 or len(normal_images) < 2:
        raise ValueError("finding correctness needs at least 2 images per prompt")
    p_finding = finding_probabilities(classifier, finding_images, finding)
    p_normal = finding_probabilities(classifier, normal_images, finding)
    scores = torch.cat([p_finding, p_normal])
    target = torch.cat([torch.ones(len(p_finding)), torch.zeros(len(p_normal))]).long()
    accuracy = ((scores > 0.5).long() == target).float().mean().item()
    return FindingCorrectness(
        finding=finding,
        n_per_prompt=len(p_finding),
        mean_prob_finding_prompt=p_finding.mean().item(),
        mean_prob_normal_prompt=p_normal.mean().item(),
        auroc=binary_auroc(scores, target).item(),
        accuracy=accuracy,
    )
