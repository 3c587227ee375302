"""Is the model starting to copy its training images? A memorization check every N training steps.

:class:`MemorizationMonitor` generates ``n_per_prompt`` images per training prompt every ``every_n_steps`` optimizer
steps and compares each with the run's training images in one similarity space (:mod:`metrics.memorization`:
``pixel``, aligned gray pixels, the default; or a classifier's features). A generated image is a **copy** when its
nearest training image is more similar than ``threshold``:

* given explicitly (for instance the one ``python evaluate.py memorization --calibrate_only`` states for the run's
  training images), or
* calibrated at the start of fit as the ``quantile`` of how close the run's *validation* images (other patients:
  the datamodule refuses shared patients when ``val_split`` differs from ``train_split``) come to the training images.

Logged to every logger (W&B included) as ``memorization/copy_rate``, ``memorization/mean_train_similarity`` and
``memorization/threshold``, and appended to ``<run>/memorization_monitor.csv``. Numbers only: training images are
real patient images and are never logged. With ``stop_above`` the run stops once the copy rate passes it: the trainer
stops at the end of that batch, ``last.ckpt`` is saved as at any end of training, and the reason is printed and kept
in the CSV's ``stopped`` column. The checkpoint also keeps the stop (the monitor's state, :func:`monitor_stop`):
``train.py`` then exits with its own status and refuses to resume past it unless told to (``--ignore_monitor_stop``).

Prompts are asked as :class:`callbacks.fid.FIDCallback` asks them, through the module's own generator
(``paper_prompt``): a textual-inversion run is sampled with its token, not as the base model.

Training features are computed once, at the start of fit, and sharded: rank ``r`` of ``world_size`` reads and embeds
training images ``r, r + world_size, ...`` a chunk at a time (:meth:`metrics.memorization.SimilaritySpace.embed_stream`)
and keeps only their features. Generation is sharded too (image ``i`` of a prompt, seed ``seed + i``, goes to rank ``i %
world_size``); at each check the ranks gather the generated images' features, each finds their nearest image in its
shard, and the maxima are combined over ranks (all-reduce max), so every rank holds the same nearest-training
similarities, the same copy rate, and takes the same decision to stop.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from core.errors import UserError
from datamodules.contract import RealImages, TrainingData, require
from metrics.memorization import SimilaritySpace, calibrate, min_heldout
from metrics.scores import MetricInputError

CSV_NAME = "memorization_monitor.csv"


class MemorizationMonitorError(UserError, ValueError):
    """A setting or a data set the monitor cannot work with: the message says which and what to change."""


class MemorizationMonitor(Callback):
    """Copy rate of freshly generated images against the training images, every ``every_n_steps`` steps.

    Args:
        every_n_steps: check after every this many optimizer steps.
        n_per_prompt: images per prompt at each check (a multiple of the number of ranks).
        prompts: prompts to sample (default: the distinct training prompts, at most ``max_prompts``).
        features: ``pixel`` (default), ``classifier`` (with ``classifier``: ``tiny-phantom`` or an xrv weights name) or
            ``image_encoder`` (with ``image_encoder``: a Hugging Face id or folder, e.g. microsoft/rad-dino).
        threshold: the copy threshold; None: calibrate it on validation images at ``quantile``.
        quantile: calibration quantile (needs ``2 / (1 - quantile)`` validation images: 40 at 0.95, 200 at 0.99).
        max_heldout: at most this many validation images per finding for the calibration.
        stop_above: stop training when the copy rate exceeds this share (None: never stop).
        steps, guidance, seed: sampling settings (seeds ``seed .. seed + n_per_prompt - 1``, the same at every check).
    """

    def __init__(self, every_n_steps: int = 100, n_per_prompt: int = 8, prompts: Optional[Sequence[str]] = None,
                 max_prompts: int = 4, features: str = "pixel", classifier: str = "tiny-phantom",
                 xrv_cache_dir: Optional[str] = None, image_encoder: Optional[str] = None,
                 threshold: Optional[float] = None, quantile: float = 0.95, max_heldout: int = 100,
                 stop_above: Optional[float] = None, steps: int = 25, guidance: float = 7.5, seed: int = 0):
        super().__init__()
        if every_n_steps < 1 or n_per_prompt < 1 or max_prompts < 1:
            raise MemorizationMonitorError(f"MemorizationMonitor: every_n_steps ({every_n_steps}), n_per_prompt ({n_per_prompt}) and "
                             f"max_prompts ({max_prompts}) must be at least 1")
        if prompts is not None and (not prompts or any(not str(p).strip() for p in prompts)):
            raise MemorizationMonitorError("MemorizationMonitor: prompts must be a non-empty list of non-empty prompts (or null: the "
                             "training prompts)")
        if features not in ("pixel", "classifier", "image_encoder"):
            raise MemorizationMonitorError(f"MemorizationMonitor: features {features!r}; expected 'pixel', 'classifier' or 'image_encoder'")
        if features == "image_encoder" and not image_encoder:
            raise MemorizationMonitorError("MemorizationMonitor: features image_encoder needs image_encoder: a Hugging Face id or folder")
        # every similarity space is a correlation or a cosine: a threshold outside [-1, 1] (or NaN) flags every image or none
        if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise MemorizationMonitorError(f"MemorizationMonitor: threshold {threshold}; expected a similarity in [-1, 1] (or "
                                           "null: calibrate it on validation images)")
        if threshold is None and not 0.5 <= quantile < 1:
            raise MemorizationMonitorError(f"MemorizationMonitor: quantile {quantile}; expected at least 0.5 and below 1 (e.g. 0.95)")
        if stop_above is not None and not 0 <= stop_above < 1:
            raise MemorizationMonitorError(f"MemorizationMonitor: stop_above {stop_above}; expected a share in [0, 1), e.g. 0.1")
        self.every_n_steps, self.n_per_prompt, self.max_prompts = int(every_n_steps), int(n_per_prompt), int(max_prompts)
        self.prompts = list(prompts) if prompts is not None else None
        self.features, self.classifier, self.xrv_cache_dir = features, classifier, xrv_cache_dir
        self.image_encoder = image_encoder
        self.threshold, self.quantile, self.max_heldout = threshold, float(quantile), int(max_heldout)
        self.stop_above = stop_above
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.threshold_source = "given" if threshold is not None else None
        self.stopped_at: Optional[int] = None
        self.stop_rate: Optional[float] = None
        self.reason: Optional[str] = None
        self._space: Optional[SimilaritySpace] = None
        self._train: Optional[torch.Tensor] = None
        self._last_step = -1
        self.last_check: Optional[dict] = None  # the latest check: step, copy_rate, copies, n

    # ------------------------------------------------------------------ setup: training features, calibration
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._train is not None:
            return
        if self.n_per_prompt % trainer.world_size:
            raise MemorizationMonitorError(f"MemorizationMonitor: n_per_prompt={self.n_per_prompt} must be a multiple of the "
                             f"{trainer.world_size} ranks (each rank generates an equal share)")
        data = require(trainer.datamodule, TrainingData, "MemorizationMonitor (the run's training images)")
        real = require(trainer.datamodule, RealImages, "MemorizationMonitor (training and validation images)")
        train_ids = [r["dicom_id"] for r in data.manifest().get("train") or []]
        if not train_ids:
            raise MemorizationMonitorError(f"MemorizationMonitor: {type(trainer.datamodule).__name__} lists no training images; the "
                             "monitor compares generated images with training images (MIMIC-CXR-JPG data)")
        if self.prompts is None:
            self.prompts = list(dict.fromkeys(data.training_prompts()))[: self.max_prompts]
        options = {"pixel": {}, "image_encoder": {"model": self.image_encoder},
                   "classifier": {"classifier": self.classifier, "xrv_cache_dir": self.xrv_cache_dir}}[self.features]
        self._space = SimilaritySpace(self.features, **options)
        mine = train_ids[trainer.global_rank::trainer.world_size]  # this rank's shard
        self._train = self._space.embed_stream(lambda start, stop: real.read_images(mine[start:stop]), len(mine))
        if self.threshold is None:
            self._calibrate(trainer, data, real, set(train_ids))
        shards = f" (a share on each of {trainer.world_size} ranks)" if trainer.world_size > 1 else ""
        rank_zero_info(f"MemorizationMonitor: {len(train_ids)} training images{shards}, {self._space.name}, copy threshold "
                       f"{self.threshold:.4f} ({self.threshold_source}); {self.n_per_prompt} images × {len(self.prompts)} "
                       f"prompt(s) every {self.every_n_steps} steps")

    def _calibrate(self, trainer: Trainer, data: TrainingData, real: RealImages, train_ids: set) -> None:
        heldout = [i for f in data.training_findings() for i in real.validation_images(f, self.max_heldout)]
        shared = sorted(train_ids.intersection(heldout))
        if shared:
            raise MemorizationMonitorError(f"MemorizationMonitor: {len(shared)} validation image(s) are training images (e.g. "
                             f"{shared[:3]}): calibrating needs validation images of other patients; validate on another "
                             "split (data val_split) or give the monitor a threshold")
        need = min_heldout(self.quantile)
        if len(heldout) < need:
            raise MemorizationMonitorError(f"MemorizationMonitor: {len(heldout)} validation image(s) of the training findings; "
                             f"calibrating the copy threshold at quantile {self.quantile:g} needs at least {need}. Give "
                             "more validation images (data max_val_images, a larger validation split), a lower quantile, "
                             "or a threshold (python evaluate.py memorization --calibrate_only states one for this run)")
        queries = self._space.embed_stream(lambda start, stop: real.read_images(heldout[start:stop]), len(heldout))
        try:
            calibration = calibrate(self._nearest_similarity(trainer, queries), self.quantile)
        except MetricInputError as err:
            raise MemorizationMonitorError(f"MemorizationMonitor: {err}") from None
        self.threshold = calibration.threshold
        self.threshold_source = (f"quantile {self.quantile:g} of {len(heldout)} validation images, false-positive rate "
                                 f"{100 * calibration.false_positive_rate:.1f}%")

    # ------------------------------------------------------------------ every N steps
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._train is None or step in (0, self._last_step) or step % self.every_n_steps or trainer.sanity_checking:
            return
        self._last_step = step
        copies, count, total = self._check(trainer, pl_module)
        rate, mean = copies / max(count, 1), total / max(count, 1)
        self.last_check = {"step": step, "copy_rate": rate, "copies": copies, "n": count}  # read by BestCheckpoint
        metrics = {"memorization/copy_rate": rate, "memorization/mean_train_similarity": mean,
                   "memorization/threshold": float(self.threshold)}
        stop = self.stop_above is not None and rate > self.stop_above
        if stop:
            self.stopped_at, self.stop_rate = step, rate
            self.reason = (f"MemorizationMonitor: copy rate {rate:.3f} ({copies}/{count} generated images closer to a "
                           f"training image than {self.threshold:.4f}) passed stop_above={self.stop_above:g} at step "
                           f"{step}: training stops at the end of this batch (train.py then saves last.ckpt)")
            trainer.should_stop = True  # the same on every rank: each holds the same similarities
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._append_csv(Path(trainer.default_root_dir) / CSV_NAME,
                             {"step": step, "n": count, "copies": copies, "copy_rate": rate, "mean_train_similarity": mean,
                              "threshold": self.threshold, "threshold_source": self.threshold_source,
                              "features": self._space.name, "weights": pl_module.weights_in_use, "stopped": stop})
            if stop:
                print(self.reason, flush=True)

    def _nearest_similarity(self, trainer: Trainer, queries: torch.Tensor) -> np.ndarray:
        """Each query's similarity to its nearest training image over every rank's shard: the nearest in this rank's
        shard, then the maximum over ranks (every rank must call this with the same queries)."""
        best = torch.from_numpy(self._space.nearest(queries, self._train)[1])
        if trainer.world_size > 1:
            best = trainer.strategy.reduce(best.to(trainer.strategy.root_device), reduce_op="max").cpu()
        return best.numpy()

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> tuple[int, int, float]:
        seeds = [self.seed + i for i in range(trainer.global_rank, self.n_per_prompt, trainer.world_size)]
        was_training = pl_module.training
        generator = pl_module.generator()  # the prompts as the module is asked them (FIDCallback does the same)
        images = torch.cat([pl_module.generate([generator.paper_prompt(prompt)] * len(seeds), seeds=seeds, steps=self.steps,
                                               guidance=self.guidance) for prompt in self.prompts])
        pl_module.train(was_training)
        gray = (images.mean(1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        queries = self._space.embed(gray)
        if trainer.world_size > 1:  # every rank's images against every rank's shard (equal shares: n_per_prompt checked)
            gathered = trainer.strategy.all_gather(queries.to(trainer.strategy.root_device))
            queries = gathered.reshape(-1, *queries.shape[1:]).cpu()
        similarity = self._nearest_similarity(trainer, queries)
        return int((similarity > self.threshold).sum()), len(similarity), float(similarity.sum())

    @staticmethod
    def _append_csv(path: Path, row: dict) -> None:
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def state_dict(self) -> dict:
        """Only the stop, once this fit stopped (what :func:`monitor_stop` reads). Training features and the calibration
        are recomputed at the start of every fit: a checkpoint holds no patient data; a resumed fit starts unstopped."""
        if self.stopped_at is None:
            return {}
        return {"stopped_at": self.stopped_at, "copy_rate": self.stop_rate, "stop_above": self.stop_above}


def monitor_stop(checkpoint: dict) -> Optional[dict]:
    """The stop a :class:`MemorizationMonitor` recorded in a checkpoint (``stopped_at``, ``copy_rate``, ``stop_above``),
    or None when no monitor stopped the fit that saved it."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith(MemorizationMonitor.__qualname__) and isinstance(state, dict) and state.get("stopped_at") is not None:
            return state
    return None
