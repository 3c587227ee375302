"""A resumable, rank-aware sampler.

Lightning restarts a mid-epoch run with a fresh dataloader that would replay the epoch from its
first batch. :class:`ResumableSampler` instead derives the epoch and the position inside it from
the trainer's restored progress (the number of training batches processed so far), so that a
resumed run sees exactly the batches an uninterrupted run would have seen: none replayed, none
skipped. It also shards by rank itself (like ``DistributedSampler``: the shuffled order is padded
to a multiple of the world size and rank ``r`` takes every ``world``-th index), which is why
``train.py`` sets ``Trainer(use_distributed_sampler=False)``.

Indices are yielded as ``epoch * n + i`` so that a dataset can derive per-sample randomness from
the epoch without any state of its own (``i = index % n``, ``epoch = index // n``).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs at least one sample")
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0  # samples to skip at the next __iter__ (one shot)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip_samples: int) -> None:
        """Start the next iteration at ``epoch``, after its first ``skip_samples`` samples of this rank."""
        self.epoch = int(epoch)
        self._skip = int(skip_samples)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices (into the dataset, ``0..n-1``) for ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = len(self) * self.world_size
        perm = (perm * math.ceil(total / self.n))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        for i in self.order(epoch)[skip:]:
            yield epoch * self.n + i


def batches_per_epoch(num_samples_per_rank: int, batch_size: int) -> int:
    return math.ceil(num_samples_per_rank / batch_size)


def resume_position(trainer, loader_lengths: list[int]) -> Optional[tuple[int, int]]:
    """``(epoch, batch position in epoch)`` to resume at, from a trainer whose progress was restored.

    ``loader_lengths`` are the per-epoch batch counts of the loaders combined in max-size-cycle
    mode. Returns None when nothing was processed yet (a fresh run).
    """
    if trainer is None:
        return None
    try:
        processed = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
    except AttributeError:
        return None
    if processed == 0:
        return None
    length = max(loader_lengths)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        length = min(length, limit)
    elif isinstance(limit, float) and limit < 1.0:
        length = max(1, int(length * limit))
    return processed // length, processed % length
