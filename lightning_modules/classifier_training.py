"""A finding classifier trained with Lightning (the utility study's arms).

The architecture is a registered classifier's (``tiny-phantom``: the phantom classifier, for the demo) or
torchxrayvision's DenseNet-121 (an xrv weights name), either re-initialised (``init: scratch``, seeded) or starting
from its weights (``init: pretrained``). It is trained on the outputs of the chosen findings with a binary
cross-entropy on their logits (the network's ``classifier`` head on its ``features2``: the same for both
architectures, and free of xrv's output calibration).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from metrics.classifiers import CHEXPERT_TO_XRV, classifier_targets, load_classifier, to_classifier_input


def output_index(classifier, findings: Sequence[str], name: str) -> list[int]:
    """The classifier's output of each finding; an unknown finding is an error listing what it knows."""
    targets = classifier_targets(classifier)
    missing = [f for f in findings if CHEXPERT_TO_XRV.get(f, f) not in targets]
    if missing:
        raise ValueError(f"the classifier {name} does not know {missing}; it predicts {[t for t in targets if t]}")
    return [targets.index(CHEXPERT_TO_XRV.get(f, f)) for f in findings]


class ClassifierTraining(LightningModule):
    def __init__(self, classifier: str = "tiny-phantom", findings: Sequence[str] = ("Pleural Effusion",),
                 init: str = "scratch", learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 xrv_cache_dir: Optional[str] = None, seed: int = 0):
        super().__init__()
        if init not in ("scratch", "pretrained"):
            raise ValueError(f"init {init!r}: expected 'scratch' or 'pretrained'")
        self.save_hyperparameters()
        self.net = load_classifier(classifier, xrv_cache_dir)
        self.index = output_index(self.net, list(findings), classifier)
        if init == "scratch":
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            for module in self.net.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            torch.random.set_rng_state(generator_state)
        self.net.requires_grad_(True)

    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = to_classifier_input(images_u8.float().div(255).unsqueeze(1))
        return self.net.classifier(self.net.features2(x).flatten(1))[:, self.index]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.binary_cross_entropy_with_logits(self.logits(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def probabilities(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``[N, F]`` probabilities of the findings for uint8 gray images ``[N, H, W]``."""
        was = self.training
        self.eval()
        out = [torch.sigmoid(self.logits(torch.from_numpy(images_u8[s:s + batch_size]).to(self.device))).cpu()
               for s in range(0, len(images_u8), batch_size)]
        self.train(was)
        return torch.cat(out).numpy()
