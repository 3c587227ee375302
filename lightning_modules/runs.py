"""A trained run folder (``runs/<name>/``, :class:`core.run_folder.RunFolder`) back as its LightningModule, for export,
generation and the studies."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


from core.run_folder import RunFolder, RunFolderError

RunLoadError = RunFolderError  # the name callers catch


def load_checkpoint_file(path: Path) -> dict:
    """Checkpoints hold tensors and plain data only, so they load with ``weights_only=True``; a truncated or corrupt one is
    one error naming the file and the checkpoint before it (:func:`lightning_modules.resume.read_checkpoint`)."""
    from lightning_modules.resume import read_checkpoint

    return read_checkpoint(path)


def load_run(run_dir: str | Path | RunFolder, ckpt: Optional[str] = "last", trained: bool = True):
    """``(module, checkpoint_path)``: the run's model built from its saved config, with the trained weights, in eval mode.

    ``trained=False`` returns the same model before training (the base weights), for before/after comparisons. The
    module's ``generate`` and ``export`` use the weights sampling uses (the EMA's when the run keeps one for sampling).
    """
    from jsonargparse import ArgumentParser

    from lightning_modules.base import DiffusionModule

    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    path = run.checkpoint(ckpt)
    config = run.config()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionModule, "model", required=True)
    module = parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model
    if trained:
        checkpoint = load_checkpoint_file(path)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval(), path


def load_run_generator(run_dir: str | Path | RunFolder, ckpt: Optional[str] = "last", trained: bool = True):
    """``(generator, checkpoint_path)``: the run as a plain :class:`~models.generator.Generator` (see :func:`load_run`)."""
    module, path = load_run(run_dir, ckpt, trained)
    if module.weights_in_use == "EMA":
        module.ema.model.copy_to(module.ema.parameters)  # the generator samples with the averaged weights
    generator = module.generator()
    generator.info.update({"kind": "run", "run": str(Path(run_dir)), "checkpoint": str(path), "weights": module.weights_in_use})
    return generator, path
