"""``<run>/data.json``: the ids a run trains and validates on (provenance; no pixels, no report text).

Written once per start by global rank 0 after the datamodule's ``setup``, from the datamodule's
``manifest()`` (MIMIC-CXR: dicom ids per finding and how they were chosen; LAION: files, counts and
the caption-set key). Datamodules without ``manifest()`` write nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class DataManifest(Callback):
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or not trainer.is_global_zero or not hasattr(datamodule, "manifest"):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(datamodule.manifest(), indent=1, default=str) + "\n")
        tmp.replace(self.path)
