"""Chest X-ray finding classifiers behind one interface: torchxrayvision models, or any registered classifier.

Every classifier here behaves like ``torchxrayvision.models.DenseNet`` with weights:

* input: 1 channel, square, values in [-1024, 1024] (``xrv.datasets.normalize(img, 255)``);
* ``forward(x)`` -> probabilities ``[B, len(targets)]`` in [0, 1], 0.5 being the operating point;
* ``features2(x)`` -> pooled latent features ``[B, F]``;
* ``targets``: the label of each output (xrv names, e.g. ``"Effusion"``; ``""`` for unused slots).

:func:`load_classifier` returns one by name: a torchxrayvision weights name (``densenet121-res224-all``, ...), or a
classifier registered in the ``cxr_diffusion.classifiers`` entry points (:mod:`core.plugins`; the shipped phantom
classifier, ``tiny-phantom``, is one). :func:`finding_probabilities` scores images in [0, 1] for CheXpert finding
names, converting to the classifier's range (feeding [-1, 1] to an xrv model makes every image look alike to it);
:func:`classifier_outputs` gives probabilities and pooled features in one pass. torchxrayvision's API is summarised in
docs/formats.md §3.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from core import plugins

# CheXpert (MIMIC) column -> torchxrayvision label (docs/formats.md §3; Pleural Other is a loose match, see TABLE1).
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


def _xrv_key(name: str) -> Optional[str]:
    import torchxrayvision as xrv

    urls = xrv.models.model_urls
    return name if name in urls else next((k for k in urls if k.endswith(f"-{name}")), None)


def classifier_weights_file(name: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """The file a classifier's weights come from (for provenance), or None when there is none."""
    if name == "none":
        return None
    if name in plugins.names(plugins.CLASSIFIERS):
        return getattr(plugins.load(plugins.CLASSIFIERS, name), "weights_file", None)
    import torchxrayvision as xrv

    key = _xrv_key(name)
    if key is None:
        return None
    folder = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".torchxrayvision" / "models_data"
    return str(folder / Path(xrv.models.model_urls[key]["weights_url"]).name)


def load_classifier(name: str = "densenet121-res224-all", cache_dir: Optional[str] = None) -> nn.Module:
    """A registered classifier (``tiny-phantom``, for phantoms) or a torchxrayvision weights name
    (``densenet121-res224-all``, ...), in eval mode.

    torchxrayvision weights are read from its cache (``~/.torchxrayvision/models_data`` or
    ``cache_dir``); a missing file is an error that names the file and where to put it, since
    nothing can be downloaded here. Note: xrv weight files are whole pickled modules, loaded by
    torchxrayvision with ``torch.load(weights_only=False)``; only use files from its official release.
    """
    if name in plugins.names(plugins.CLASSIFIERS):
        return plugins.load(plugins.CLASSIFIERS, name)().eval()
    import torchxrayvision as xrv

    urls = xrv.models.model_urls
    key = _xrv_key(name)
    if key is None:
        registered = ", ".join(repr(n) for n in plugins.names(plugins.CLASSIFIERS))
        raise ValueError(f"unknown classifier {name!r}; expected {registered + ' or ' if registered else ''}one of {sorted(urls)}")
    url = urls[key]["weights_url"]
    path = Path(classifier_weights_file(name, cache_dir))
    folder = path.parent
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
    targets = classifier_targets(classifier)
    if label not in targets:
        raise ValueError(f"classifier has no output for {finding!r} (looked for {label!r}); it predicts {[t for t in targets if t]}")
    index = targets.index(label)
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_classifier_input(images[start : start + batch_size]).to(device)
        out.append(classifier(x)[:, index].float().cpu())
    return torch.cat(out)


def classifier_targets(classifier: nn.Module) -> list[str]:
    """The label of each output (``""`` for unused slots)."""
    return list(getattr(classifier, "targets", None) or getattr(classifier, "pathologies", []))


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images_u8: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities ``[N, n_targets]``, pooled features ``[N, F]``) of uint8 gray images ``[N, H, W]``."""
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
