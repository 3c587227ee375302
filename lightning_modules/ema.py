"""Exponential moving average of whatever a strategy trains (full U-Net, text encoder, LoRA adapters, token rows).

diffusers' :class:`~diffusers.training_utils.EMAModel` keeps the averaged copy. It is updated right after every
optimizer step (not on skipped batches, and before any callback saves a checkpoint of that step), lives on the module's
device, and its state is part of every checkpoint, so a resumed run continues the same average: bit-identical on one CPU
process, and the same on every DDP rank (each rank averages the same all-reduced weights). With ``use_for_sampling`` the sample grids, the FID callback, ``generate`` and the export
use the averaged weights (swapped in and back out) and say so.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from core.errors import UserError


class EMAConfigError(UserError, ValueError):
    """An EMA setting that cannot be used as given."""


@dataclass
class EMASettings:
    """Args:
        decay: the largest decay of the average (diffusers' ``decay``).
        warmup: grow the decay as ``1 - (1 + step / inv_gamma) ** -power`` up to ``decay`` (diffusers'
            ``use_ema_warmup``); without it the decay is ``(1 + step) / (10 + step)`` up to ``decay``.
        inv_gamma, power: the shape of that warm-up (diffusers' defaults: 1 and 2/3).
        update_after_step: copy the weights until this optimizer step, average from there.
        use_for_sampling: sample grids, FID during training, ``generate`` and ``export.py`` use the averaged weights.
    """

    decay: float = 0.9999
    warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_after_step: int = 0
    use_for_sampling: bool = True


class ParameterEMA:
    """The average of ``parameters`` (which must stay the same tensors in the same order)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], settings: EMASettings):
        from diffusers.training_utils import EMAModel

        if not 0.0 < settings.decay <= 1.0:
            raise EMAConfigError(f"ema.decay: {settings.decay!r}; expected a value in (0, 1]")
        self.settings = settings
        self.parameters = list(parameters)
        self.model = EMAModel(self.parameters, decay=settings.decay, use_ema_warmup=settings.warmup,
                              inv_gamma=settings.inv_gamma, power=settings.power, update_after_step=settings.update_after_step,
                              foreach=True)

    def to(self, device) -> None:
        self.model.to(device=device)

    def update(self) -> None:
        """Average in the current weights (after an optimizer step)."""
        self.model.step(self.parameters)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones, and the trained ones back afterwards."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow_params") or []
        if len(shadow) != len(self.parameters) or any(s.shape != p.shape for s, p in zip(shadow, self.parameters)):
            raise ValueError(f"the checkpoint's EMA holds {len(shadow)} tensors that do not fit the {len(self.parameters)} this "
                             "configuration trains; resume with the configuration the run was started with")
        device = self.parameters[0].device
        self.model.load_state_dict(state)
        self.model.to(device=device)
