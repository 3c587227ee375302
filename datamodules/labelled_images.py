"""In-memory labelled images for classifier training (the utility study): uint8 gray images ``[N, H, W]`` with
multi-label targets ``[N, F]`` in {0, 1}.

Each epoch is exactly ``steps`` batches drawn with replacement by a generator seeded with ``seed``, so two arms given
the same images, labels and seed see the same batches in the same order: a training budget is a number of steps and
images, identical across arms.
"""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from core.errors import UserError


class LabelledImagesError(UserError, ValueError):
    """Images and labels that do not fit together, or an empty budget."""


class LabelledImages(LightningDataModule):
    def __init__(self, images: np.ndarray, labels: np.ndarray, steps: int, batch_size: int = 16, seed: int = 0):
        super().__init__()
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.float32)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise LabelledImagesError(f"images: expected uint8 [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 2 or len(labels) != len(images):
            raise LabelledImagesError(f"labels: expected [{len(images)}, F], got {labels.shape}")
        if steps < 1 or batch_size < 1 or not len(images):
            raise LabelledImagesError(f"a training budget of {steps} steps × {batch_size} images on {len(images)} images: "
                                      "each must be at least 1")
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.steps, self.batch_size, self.seed = int(steps), int(batch_size), int(seed)

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.images, self.labels)
        sampler = RandomSampler(dataset, replacement=True, num_samples=self.steps * self.batch_size,
                                generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
