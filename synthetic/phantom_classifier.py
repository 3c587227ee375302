"""The phantom finding classifier: a small CNN behind torchxrayvision's interface (``metrics/classifiers.py``).

Trained by ``python -m synthetic.build_tiny_phantom`` on synthetic phantoms only, and shipped as
``synthetic/assets/tiny_phantom/classifier.safetensors``: it means nothing on real radiographs. Registered as the
classifier ``tiny-phantom`` (``cxr_diffusion.classifiers`` entry point), so ``--classifier tiny-phantom`` works in
every study and in the FID callback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthetic.presets import TINY_PHANTOM_DIR

CLASSIFIER_FILE = "classifier.safetensors"


class PhantomClassifier(nn.Module):
    """Detects phantom findings (Effusion, Cardiomegaly): input 1 channel in [-1024, 1024], output probabilities."""

    def __init__(self, targets: Sequence[str] = ("Effusion", "Cardiomegaly"), resolution: int = 64, width: int = 16):
        super().__init__()
        self.targets = list(targets)
        self.resolution = resolution
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 1), nn.GroupNorm(4, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GroupNorm(4, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.GroupNorm(4, 4 * w), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.GroupNorm(4, 4 * w), nn.SiLU(),
        )
        self.classifier = nn.Linear(4 * w, len(self.targets))

    @property
    def pathologies(self) -> list[str]:
        return self.targets

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
            raise ValueError(f"expected square 1-channel images [B, 1, H, H] in [-1024, 1024], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False)
        return x / 1024.0

    def features2(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self._prepare(x)).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / CLASSIFIER_FILE),
                  metadata={"config": json.dumps({"targets": self.targets, "resolution": self.resolution})})

    @classmethod
    def load(cls, folder: Path) -> "PhantomClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(folder) / CLASSIFIER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: phantom classifier weights not found (build them with python -m synthetic.build_tiny_phantom)")
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        model = cls(**config)
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def load() -> PhantomClassifier:
    """The shipped phantom classifier (the ``tiny-phantom`` classifier entry point)."""
    return PhantomClassifier.load(TINY_PHANTOM_DIR)


load.weights_file = str(TINY_PHANTOM_DIR / CLASSIFIER_FILE)
