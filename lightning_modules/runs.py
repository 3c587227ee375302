"""Load a trained run (``runs/<name>/``) back into its LightningModule, for export and generation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml


class RunLoadError(FileNotFoundError):
    """A run folder is incomplete or its checkpoint cannot be read."""


def find_checkpoint(run_dir: Path, ckpt: Optional[str] = "last") -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunLoadError(f"{run_dir}: no such run folder")
    if ckpt in (None, "last"):
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise RunLoadError(f"{run_dir}: no checkpoint ({path} is missing); train the run first")
        return path
    path = Path(ckpt)
    if not path.is_file():
        path = run_dir / "checkpoints" / ckpt
    if not path.is_file():
        raise RunLoadError(f"{ckpt}: no such checkpoint (looked in {run_dir / 'checkpoints'})")
    return path


def load_checkpoint_file(path: Path) -> dict:
    """Checkpoints hold tensors and plain data only, so they load with ``weights_only=True``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunLoadError(f"{path}: cannot be read as a checkpoint ({err})") from None


def load_run(run_dir: str | Path, ckpt: Optional[str] = "last", trained: bool = True):
    """``(module, checkpoint_path)``: the run's model built from its saved config, with the trained weights.

    ``trained=False`` returns the same model before training (the base weights), for before/after comparisons.
    """
    from jsonargparse import ArgumentParser

    from lightning_modules.base import DiffusionModule

    run_dir = Path(run_dir)
    path = find_checkpoint(run_dir, ckpt)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunLoadError(f"{config_file}: missing; every run folder written by train.py has one")
    config = yaml.safe_load(config_file.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionModule, "model", required=True)
    namespace = parser.parse_object({"model": config["model"]})
    module = parser.instantiate_classes(namespace).model
    if not trained:
        return module.eval(), path
    checkpoint = load_checkpoint_file(path)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.eval()
    return module, path
