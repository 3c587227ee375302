"""FID during training: at every validation, generate N images per prompt and compare them with real
validation images of the matching finding.

* One :class:`metrics.scores.FeatureFID` (a torchmetrics ``Metric``) per prompt, keeping its real side across
  resets: the real images are encoded once (at the first validation), each rank its share, and only the generated
  half is reset afterwards.
* Generation is sharded over ranks in equal counts (image ``i`` of a prompt, seed ``seed + i``, goes to
  rank ``i % world_size``); torchmetrics sums the feature statistics over ranks in ``compute()``, which
  every rank calls: no collective runs in rank-zero-only code, so DDP cannot hang here.
* Features (:mod:`metrics.features`): Inception-2048 (torchmetrics' FID network; its weights file must be in the
  torch hub cache or given) or a classifier's pooled ``features2`` (torchxrayvision DenseNet: 1024-d;
  ``tiny-phantom``: the shipped phantom classifier) for a domain FID, or any Hugging Face image encoder's CLS embedding
  (``image_encoder``: RAD-DINO, as CheXGenBench uses).
* The feature network lives in this callback, never in the LightningModule: checkpoints do not hold it.
* Logged as ``val/fid/<prompt>`` to every logger (W&B included) and appended to ``<run>/fid.csv``
  with the step and both N. FID on a few images is strongly biased upwards: compare runs only at equal N.

Prompts name their reference finding as in the generation study (:func:`datamodules.prompts.prompt_finding`): a
prompt mentioning a pleural effusion is compared with effusion-positive validation images, every other prompt with
"No Finding" images. The datamodule provides them through :class:`~datamodules.contract.RealImages`.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from core.errors import UserError
from datamodules.contract import RealImages, require
from datamodules.prompts import PAPER_PROMPTS, prompt_finding
from metrics.features import feature_extractor
from metrics.scores import FeatureFID


class FIDCallbackError(UserError, ValueError):
    """A setting the FID callback cannot work with: the message names it."""


def _key(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"


class FIDCallback(Callback):
    """FID of generated images against real validation images, per prompt, at each validation.

    Args:
        prompts: prompts to sample (default: the paper's three).
        n_per_prompt: generated images per prompt (a multiple of the number of ranks).
        n_real: real validation images per finding (at most; all there are if fewer).
        features: ``inception``, ``classifier`` or ``image_encoder`` (with ``image_encoder``: a Hugging Face id or folder,
            e.g. microsoft/rad-dino, CheXGenBench's FID features).
        classifier: with ``features: classifier``: ``tiny-phantom`` or a torchxrayvision weights name.
        inception_weights / xrv_cache_dir: where the weights files are (nothing is downloaded).
        steps, guidance, seed: sampling settings (seeds ``seed .. seed + n_per_prompt - 1``).
    """

    def __init__(self, prompts: Sequence[str] = PAPER_PROMPTS, n_per_prompt: int = 16, n_real: int = 64,
                 features: str = "inception", classifier: str = "tiny-phantom", inception_weights: Optional[str] = None,
                 xrv_cache_dir: Optional[str] = None, steps: int = 25, guidance: float = 7.5, seed: int = 0,
                 image_encoder: Optional[str] = None):
        super().__init__()
        if not prompts or any(not str(p).strip() for p in prompts):
            raise FIDCallbackError("FIDCallback: prompts must be a non-empty list of non-empty prompts")
        if n_per_prompt < 2 or n_real < 2:
            raise FIDCallbackError(f"FIDCallback: FID needs at least 2 images on each side (n_per_prompt={n_per_prompt}, n_real={n_real})")
        if features not in ("inception", "classifier", "image_encoder"):
            raise FIDCallbackError(f"FIDCallback: features {features!r}; expected 'inception', 'classifier' or 'image_encoder'")
        if features == "image_encoder" and not image_encoder:
            raise FIDCallbackError("FIDCallback: features image_encoder needs image_encoder: a Hugging Face id or folder, e.g. "
                             "microsoft/rad-dino")
        self.prompts = list(prompts)
        self.n_per_prompt, self.n_real = int(n_per_prompt), int(n_real)
        self.features, self.classifier = features, classifier
        self.inception_weights, self.xrv_cache_dir, self.image_encoder = inception_weights, xrv_cache_dir, image_encoder
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self._metrics: dict = {}
        self._real_counts: dict[str, int] = {}
        self._skipped: set[str] = set()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._metrics:
            return
        if self.n_per_prompt % trainer.world_size:
            raise FIDCallbackError(f"FIDCallback: n_per_prompt={self.n_per_prompt} must be a multiple of the {trainer.world_size} ranks "
                             "(each rank generates an equal share)")
        options = {"inception": {"inception_weights": self.inception_weights}, "image_encoder": {"model": self.image_encoder},
                   "classifier": {"classifier": self.classifier, "xrv_cache_dir": self.xrv_cache_dir}}[self.features]
        # one extractor shared by the metrics: it is not a trained part and never enters a checkpoint
        self._extractor = feature_extractor(self.features, **options)
        for prompt in self.prompts:
            self._metrics[prompt] = FeatureFID(self._extractor.num_features, reset_real=False)

    # ------------------------------------------------------------------ images
    def _add_real_images(self, trainer: Trainer, metric: FeatureFID, finding: str, device) -> bool:
        """Encode this rank's share of the validation images of ``finding`` once; False when there are fewer than 2."""
        data = require(trainer.datamodule, RealImages, "FIDCallback (real validation images with findings)")
        ids = data.validation_images(finding, self.n_real)
        self._real_counts[finding] = len(ids)
        if len(ids) < 2:
            return False
        mine = ids[trainer.global_rank::trainer.world_size]
        if mine:
            images = torch.from_numpy(data.read_images(mine)).float().div(255).unsqueeze(1)
            metric.update(self._features(images, device), real=True)
        return True

    @torch.no_grad()
    def _features(self, images: torch.Tensor, device) -> torch.Tensor:
        return self._extractor.to(device)(images.to(device))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._metrics:
            return
        device = pl_module.device
        rows = []
        generator = pl_module.generator()
        for prompt, metric in self._metrics.items():
            metric.to(device)
            finding = prompt_finding(prompt)
            if not metric.real_count and not self._add_real_images(trainer, metric, finding, device):
                if prompt not in self._skipped:  # the same on every rank: the validation records are
                    self._skipped.add(prompt)
                    rank_zero_warn(f"FIDCallback: {self._real_counts[finding]} validation image(s) of {finding!r}, FID needs "
                                   f"at least 2: no FID for {prompt!r} (raise max_val_images or the validation split)")
                continue
            seeds = [self.seed + i for i in range(trainer.global_rank, self.n_per_prompt, trainer.world_size)]
            was_training = pl_module.training
            images = pl_module.generate([generator.paper_prompt(prompt)] * len(seeds), seeds=seeds, steps=self.steps,
                                        guidance=self.guidance)
            pl_module.train(was_training)
            metric.update(self._features(images.mean(1, keepdim=True), device), real=False)
            value = float(metric.compute())  # syncs the feature sums over ranks (every rank calls it)
            metric.reset()  # generated half only
            pl_module.log(f"val/fid/{_key(prompt)}", value, rank_zero_only=True)
            rows.append({"step": trainer.global_step, "prompt": prompt, "reference": finding, "fid": value,
                         "n_generated": self.n_per_prompt, "n_real": self._real_counts.get(finding, 0),
                         "features": self.features, "weights": pl_module.weights_in_use})
        if trainer.is_global_zero and rows:
            self._append_csv(Path(trainer.default_root_dir) / "fid.csv", rows)

    @staticmethod
    def _append_csv(path: Path, rows: list[dict]) -> None:
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def state_dict(self) -> dict:
        return {}  # nothing to resume: real statistics are recomputed, the feature network is never saved
