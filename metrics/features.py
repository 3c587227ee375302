"""The one features module: networks that turn images into feature vectors for FID, KID and nearest neighbours.

Every extractor takes gray images in [0, 1] ``[B, 1|3, H, W]`` and returns ``[B, d]`` (``num_features = d``):

* ``inception`` — torchmetrics' FID Inception-v3 (2048 pool features). Its weights file
  (``weights-inception-2015-12-05-6726825d.pth``) is never downloaded: it must be in torch.hub's cache or given
  (docs/formats.md §4).
* ``classifier`` — a finding classifier's pooled ``features2`` (torchxrayvision DenseNet: 1024-d; ``tiny-phantom``: the
  phantom classifier), for a domain-aware FID.
* ``image_encoder`` — any Hugging Face image encoder, by hub id or folder (``model=``): RAD-DINO
  (``microsoft/rad-dino``, a DINOv2), a ViT, a re-identification network saved in transformers' format. Its CLS
  embedding (``last_hidden_state[:, 0]``), after its own image processor's resize and normalisation. Nothing is
  downloaded at run time: a missing model is an error naming the id and how to provide a folder.

:func:`feature_extractor` builds one by name; :func:`register` adds more (a re-identification network, RAD-DINO, ...):
``@register("name")`` on a function ``(**options) -> nn.Module``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from core.errors import UserError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
EXTRACTORS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: make ``feature_extractor(name, **options)`` call the decorated builder."""

    def wrap(builder):
        EXTRACTORS[name] = builder
        return builder

    return wrap


def feature_extractor(name: str, **options) -> nn.Module:
    """An extractor by name (``inception``, ``classifier``, or a registered one), in eval mode, with ``num_features``."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; expected one of {', '.join(sorted(EXTRACTORS))}")
    extractor = EXTRACTORS[name](**options).eval()
    if not hasattr(extractor, "num_features"):
        device = next(extractor.parameters()).device
        with torch.no_grad():
            extractor.num_features = int(extractor(torch.rand(1, 1, 64, 64, device=device)).shape[-1])
    return extractor


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, device=None, batch: int = 32) -> torch.Tensor:
    """Features ``[N, d]`` (float64, CPU) of images in [0, 1], ``batch`` at a time."""
    device = device or next(extractor.parameters()).device
    return torch.cat([extractor(images[s : s + batch].to(device)).double().cpu() for s in range(0, len(images), batch)])


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
    """A classifier's pooled ``features2`` (xrv DenseNet: 1024-d) as features; input gray [0, 1]."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from metrics.classifiers import to_classifier_input

        return self.classifier.features2(to_classifier_input(x)).flatten(1)


@register("inception")
def _inception(inception_weights: Optional[str] = None, **_) -> nn.Module:
    return InceptionFeatures(inception_weights)


@register("classifier")
def _classifier(classifier="densenet121-res224-all", xrv_cache_dir: Optional[str] = None, **_) -> nn.Module:
    """``classifier``: a name for :func:`metrics.classifiers.load_classifier`, or a loaded classifier."""
    from metrics.classifiers import load_classifier

    return ClassifierFeatures(load_classifier(classifier, xrv_cache_dir) if isinstance(classifier, str) else classifier)


class ImageEncoderError(UserError, ValueError):
    """An image encoder that cannot be loaded (missing offline, not an image model): the message names it."""


class ImageEncoderFeatures(nn.Module):
    """A transformers image encoder's CLS embedding; input gray [0, 1] ``[B, 1|3, H, W]``.

    The image is resized to the processor's crop size (or size; 224 when it has no processor), normalised with its mean
    and standard deviation, and given as three equal channels."""

    def __init__(self, model: str, cache_dir: Optional[str] = None):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.model_name = str(model)
        try:
            config = AutoConfig.from_pretrained(self.model_name, cache_dir=cache_dir)
            self.encoder = AutoModel.from_pretrained(self.model_name, cache_dir=cache_dir).eval()
        except (OSError, ValueError) as err:
            where = (f"the folder {model} has no loadable model ({str(err).splitlines()[0][:200]})" if Path(model).is_dir()
                     else f"{model!r} is neither a folder nor in the Hugging Face cache, and nothing is downloaded at run time")
            raise ImageEncoderError(
                f"image encoder {model}: {where}. On a machine with internet access run `huggingface-cli download {model} "
                "--local-dir FOLDER` (or save the model with save_pretrained) and give FOLDER instead of the id, or copy "
                "the Hugging Face cache ($HF_HOME/hub) here") from None
        size, mean, std = 224, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        try:
            processor = AutoImageProcessor.from_pretrained(self.model_name, cache_dir=cache_dir)
            crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
            given = crop or getattr(processor, "size", None) or {}
            size = int(given.get("height") or given.get("shortest_edge") or size) if isinstance(given, dict) else int(given)
            mean, std = list(processor.image_mean), list(processor.image_std)
        except (OSError, ValueError, TypeError, AttributeError):
            size = int(getattr(config, "image_size", size) or size)
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if getattr(config, "hidden_size", None):
            self.num_features = int(config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x.float().clamp(0, 1), size=(self.size, self.size), mode="bilinear",
                                            align_corners=False, antialias=True)
        out = self.encoder(pixel_values=(x - self.mean) / self.std)
        return out.last_hidden_state[:, 0]


@register("image_encoder")
def _image_encoder(model: Optional[str] = None, cache_dir: Optional[str] = None, **_) -> nn.Module:
    if not model:
        raise ImageEncoderError("the image_encoder features need a model: a Hugging Face id or folder, e.g. "
                                "microsoft/rad-dino")
    return ImageEncoderFeatures(model, cache_dir)
