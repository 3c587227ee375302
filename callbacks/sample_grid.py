"""Sample grids during training: fixed prompts and seeds, every N steps, rank zero only.

Each grid is a PNG in ``<run>/samples/step_XXXXXX.png`` (one row per prompt, labelled) and is
logged to W&B as an image. Only generated images are ever logged: real MIMIC-CXR images stay on
the machine (the MIMIC data-use agreement).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from core.errors import UserError
from core.grids import labelled_grid
from datamodules.contract import RealImages
from datamodules.prompts import PAPER_PROMPTS


class SampleGridError(UserError, ValueError):
    """A SampleGrid setting that cannot be used as given."""


class SampleGrid(Callback):
    """Generate a labelled grid for fixed prompts and seeds every ``every_n_steps`` steps.

    Args:
        prompts: the prompts, one grid row each (defaults: the paper's three prompts).
        n_per_prompt: images per prompt (seeds ``seed .. seed+n-1``, the same every time).
        every_n_steps: cadence in optimizer steps; a grid is also made when training ends.
        steps, guidance: sampling settings.
        seed: first seed.
        dirpath: where PNGs go (default ``<run>/samples``, set by train.py).
        log_real_images: also log a few real training images to the loggers (once), for comparison.
            Off by default: MIMIC-CXR's data use agreement forbids sharing its images, and a W&B
            project may be visible to others. Generated images are always logged.
    """

    def __init__(
        self,
        prompts: Sequence[str] = PAPER_PROMPTS,
        n_per_prompt: int = 4,
        every_n_steps: int = 100,
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        dirpath: Optional[str] = None,
        on_train_end: bool = True,
        log_real_images: bool = False,
    ):
        super().__init__()
        if not prompts:
            raise SampleGridError("prompts: SampleGrid needs at least one prompt")
        self.prompts = list(prompts)
        self.n_per_prompt = n_per_prompt
        self.every_n_steps = every_n_steps
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.dirpath = Path(dirpath) if dirpath else None
        self.make_on_train_end = on_train_end
        self.log_real_images = log_real_images
        self._last_step = -1
        self._real_logged = False

    def _dir(self, trainer: Trainer) -> Path:
        return self.dirpath or Path(trainer.default_root_dir) / "samples"

    @rank_zero_only
    def make_grid(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Path]:
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        prompts = [p for p in self.prompts for _ in range(self.n_per_prompt)]
        seeds = [self.seed + i for _ in self.prompts for i in range(self.n_per_prompt)]
        images = pl_module.generate(prompts, seeds=seeds, steps=self.steps, guidance=self.guidance)
        weights = " (EMA weights)" if pl_module.weights_in_use == "EMA" else ""
        grid = labelled_grid(images, prompts, self.n_per_prompt, title=f"step {step}{weights}")
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:06d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=step, caption=[" | ".join(self.prompts)])
        if self.log_real_images and not self._real_logged:
            self._log_real_images(trainer, step)
        return path

    def _log_real_images(self, trainer: Trainer, step: int) -> None:
        """Only with ``log_real_images: true``: up to ``n_per_prompt`` real training images, logged once."""
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, RealImages):
            return
        images, captions = datamodule.real_image_examples(self.n_per_prompt)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image") and images:
                logger.log_image(key="real_images", images=images, step=step, caption=captions)
        self._real_logged = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.make_on_train_end:
            self.make_grid(trainer, pl_module)
