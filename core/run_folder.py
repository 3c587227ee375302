"""The run folder: everything one training run leaves, behind one object.

::

    runs/<name>/
      checkpoints/last.ckpt    what was trained, the optimizer and the loop state (resume point)
      config.yaml              the resolved configuration
      provenance.json          one record per start (core.provenance)
      data.json                the ids the run trains and validates on
      wandb_run_id.txt, wandb/ the W&B run (one id for every start of the run)
      losses.csv, samples/, fid.csv

:class:`RunFolder` owns the name, checkpoint resolution (``last``), the W&B id, ``data.json`` and provenance;
``train.py``, ``export.py``, ``generate.py``, the studies and ``reproduce.py`` all go through it.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Optional

from core import provenance
from core.cache import atomic_write
from core.errors import UserError

DATA_SCHEMA = "cxr-diffusion/data/1"


class RunFolderError(UserError, FileNotFoundError):
    """A run folder, or a file it should hold, is missing or unreadable."""


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def named(cls, runs_dir: str | Path, name: str) -> "RunFolder":
        return cls(Path(runs_dir) / name)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ files
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def losses_file(self) -> Path:
        return self.path / "losses.csv"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def data_file(self) -> Path:
        return self.path / "data.json"

    @property
    def provenance_file(self) -> Path:
        return self.path / "provenance.json"

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))

    # ------------------------------------------------------------------ checkpoints
    def resume_checkpoint(self, ckpt: Optional[str]) -> Optional[Path]:
        """What ``--ckpt_path`` means for training: ``None`` (fresh), ``last`` (this run's last.ckpt, or None when the
        run has none yet, so a requeue script can always pass it) or a checkpoint file."""
        if ckpt is None:
            return None
        if ckpt == "last":
            return self.last_checkpoint if self.last_checkpoint.is_file() else None
        path = Path(ckpt)
        if not path.is_file():
            raise RunFolderError(f"--ckpt_path {ckpt}: no such checkpoint file")
        return path

    def checkpoint(self, ckpt: Optional[str] = "last") -> Path:
        """An existing checkpoint of this run, for loading its weights: ``last`` or a file name or path."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        if ckpt in (None, "last"):
            if not self.last_checkpoint.is_file():
                raise RunFolderError(f"{self.path}: no checkpoint ({self.last_checkpoint} is missing); train the run first")
            return self.last_checkpoint
        path = Path(ckpt)
        if not path.is_file():
            path = self.checkpoints / ckpt
        if not path.is_file():
            raise RunFolderError(f"{ckpt}: no such checkpoint (looked in {self.checkpoints})")
        return path

    def config(self) -> dict:
        """The run's resolved configuration (``config.yaml``)."""
        import yaml

        if not self.config_file.is_file():
            raise RunFolderError(f"{self.config_file}: missing; every run folder written by train.py has one")
        return yaml.safe_load(self.config_file.read_text())

    # ------------------------------------------------------------------ W&B
    def wandb_id(self) -> str:
        """The run's W&B id: read from ``wandb_run_id.txt``, or made and written there on first use."""
        id_file = self.path / "wandb_run_id.txt"
        if id_file.is_file():
            return id_file.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(id_file, (run_id + "\n").encode())
        return run_id

    # ------------------------------------------------------------------ data and provenance
    def write_data(self, manifest: dict) -> Path:
        """``data.json``: what the run trains and validates on (ids only: no pixels, no report text)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.data_file, (json.dumps({"schema": DATA_SCHEMA, **manifest}, indent=1, default=str) + "\n").encode())
        return self.data_file

    def data(self) -> dict:
        if not self.data_file.is_file():
            raise RunFolderError(f"{self.data_file}: missing; train.py writes it when a run starts")
        return json.loads(self.data_file.read_text())

    def record_start(self, settings: dict, inputs: dict, argv=None) -> Path:
        """Append this start's provenance record (``what: train``)."""
        return provenance.write(self.provenance_file, provenance.record("train", settings, inputs, argv), append=True)

    def starts(self) -> list[dict]:
        return provenance.read(self.provenance_file)
