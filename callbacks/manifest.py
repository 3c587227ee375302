"""``<run>/data.json``: the ids a run trains and validates on (provenance; no pixels, no report text).

Written once per start by global rank 0 when training starts (after the fit-time preparation, so the class images are
known), from the datamodule's ``manifest()`` (MIMIC-CXR: dicom ids per finding and how they were chosen; LAION: files,
counts and the caption-set key), through :meth:`core.run_folder.RunFolder.write_data`. A datamodule that is not
:class:`~datamodules.contract.TrainingData` writes nothing.
"""
from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from core.run_folder import RunFolder
from datamodules.contract import TrainingData


class DataManifest(Callback):
    def __init__(self, run: RunFolder):
        self.run = run

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and isinstance(trainer.datamodule, TrainingData):
            self.run.write_data(trainer.datamodule.manifest())
