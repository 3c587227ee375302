"""Chest X-ray finding classifiers behind one interface: torchxrayvision models or the shipped phantom model.

Every classifier here behaves like ``torchxrayvision.models.DenseNet`` with weights:

* input: 1 channel, square, values in [-1024, 1024] (``xrv.datasets.normalize(img, 255)``);
* ``forward(x)`` -> probabilities ``[B, len(targets)]`` in [0, 1], 0.5 being the operating point;
* ``features2(x)`` -> pooled latent features ``[B, F]``;
* ``targets``: the label of each output (xrv names, e.g. ``"Effusion"``; ``""`` for unused slots).

:func:`load_classifier` returns one by name; :func:`finding_probabilities` scores images in [0, 1]
for CheXpert finding names, converting to the classifier's range (feeding [-1, 1] to an xrv model
makes every image look alike to it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "lightning_modules" / "assets"
TINY_PHANTOM_DIR = ASSETS / "tiny_phantom"
CLASSIFIER_FILE = "classifier.safetensors"

# CheXpert (MIMIC) column -> torchxrayvision label (REFERENCE §3; Pleural Other is a loose match).
CHEXPERT_TO_XRV = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Fracture": "Fracture",
    "Lung Lesion": "Lung Lesion",
    "Lung Opacity": "Lung Opacity",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}


class PhantomClassifier(nn.Module):
    """A small CNN that detects phantom findings; the torchxrayvision interface, phantom-sized.

    It is trained by ``tools/build_tiny_phantom.py`` on synthetic phantoms only: it means nothing
    on real radiographs.
    """

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
            raise FileNotFoundError(f"{path}: phantom classifier weights not found (build them with tools/build_tiny_phantom.py)")
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        model = cls(**config)
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def load_classifier(name: str = "tiny-phantom", cache_dir: Optional[str] = None) -> nn.Module:
    """``tiny-phantom`` (shipped, for phantoms) or a torchxrayvision weights name (``densenet121-res224-all``, ...).

    torchxrayvision weights are read from its cache (``~/.torchxrayvision/models_data`` or
    ``cache_dir``); a missing file is an error that names the file and where to put it, since
    nothing can be downloaded here. Note: xrv weight files are whole pickled modules, loaded by
    torchxrayvision with ``torch.load(weights_only=False)``; only use files from its official release.
    """
    if name == "tiny-phantom":
        return PhantomClassifier.load(TINY_PHANTOM_DIR)
    import torchxrayvision as xrv

    urls = xrv.models.model_urls
    key = name if name in urls else next((k for k in urls if k.endswith(f"-{name}")), None)
    if key is None:
        raise ValueError(f"unknown classifier {name!r}; expected 'tiny-phantom' or one of {sorted(urls)}")
    url = urls[key]["weights_url"]
    folder = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".torchxrayvision" / "models_data"
    path = folder / Path(url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"torchxrayvision weights {key!r} not found at {path}. Download {url} on a machine with internet access "
            f"and put it there (or pass a cache_dir holding it)."
        )
    import warnings

    warnings.warn(
        f"{path}: torchxrayvision weights are a pickled module; torchxrayvision loads them with torch.load(weights_only=False), "
        f"which can run code from the file. Use only the file published at {url}.",
        UserWarning, stacklevel=2,
    )
    return xrv.models.get_model(key, cache_dir=str(folder)).eval()


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ``[B, C, H, W]`` (C = 1 or 3) -> 1 channel in [-1024, 1024] (xrv's range)."""
    if images.min() < -1e-4 or images.max() > 1 + 1e-4:
        raise ValueError(f"expected images in [0, 1], got values in [{images.min():.3f}, {images.max():.3f}]")
    gray = images.float().mean(dim=1, keepdim=True)
    return (2 * gray - 1) * 1024.0


@torch.no_grad()
def finding_probabilities(classifier: nn.Module, images: torch.Tensor, finding: str, batch_size: int = 64) -> torch.Tensor:
    """Probability of a CheXpert ``finding`` (e.g. ``"Pleural Effusion"``) for each image in [0, 1]."""
    label = CHEXPERT_TO_XRV.get(finding, finding)
    targets = list(getattr(classifier, "targets", getattr(classifier, "pathologies", [])))
    if label not in targets:
        raise ValueError(f"classifier has no output for {finding!r} (looked for {label!r}); it predicts {[t for t in targets if t]}")
    index = targets.index(label)
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_classifier_input(images[start : start + batch_size]).to(device)
        out.append(classifier(x)[:, index].float().cpu())
    return torch.cat(out)
