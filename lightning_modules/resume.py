"""What a checkpoint must agree on before a run resumes from it, checked before anything is written.

Every checkpoint records, beside the trained tensors:

* ``base_model``: the frozen base model's name (preset and seed, or folder/hub id and revision) and a fingerprint of its
  frozen weights (:func:`models.stable_diffusion.weights_fingerprint`). Another base model is refused, naming both; the
  same weights under another name (a moved folder) are accepted.
* ``data``: the batch size, the findings, the resolution, the data seed and shuffling, and a digest of the training and
  validation ids (the datamodule's ``manifest()`` without paths and class images). A resume must keep all of them:
  another batch size, order or selection would silently continue on other batches than the saved state belongs to.

``train.py`` reads the checkpoint with :func:`read_checkpoint` and calls :meth:`DiffusionModule.check_resumable` before it
writes the start's config, provenance or W&B files; ``on_load_checkpoint`` runs the same checks for any other caller.
* ``world_size``: the number of processes (devices × nodes) that trained. The position within the epoch is counted
  per process, and the batch size is per process: another number of processes would replay or skip part of the
  epoch and change the effective batch, so it is refused, naming both.

Checkpoints written before these records existed are resumed without these checks.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from core.errors import UserError
from datamodules.contract import TrainingData

# manifest entries that may change without changing what is trained on (paths, prior-preservation images made at fit)
# "prompts" (their source and the de-identification scrub) is descriptive, as the prompts themselves are not compared
NOT_IDENTITY = ("root", "files", "class_prompt", "num_class_images", "class_images", "train_subjects", "prompts")


class CheckpointReadError(UserError, RuntimeError):
    """A checkpoint file is truncated or corrupt, or holds what it may not."""


# what torch's weights-only unpickler says of a complete file whose pickle names a class or function
NON_TENSOR = re.compile(r"GLOBAL (\S+)|Can only (?:build|create)|unrecognized function")


def first_sentence(message: str, limit: int = 200) -> str:
    """The first sentence of an error message (torch's go on with advice), at most ``limit`` characters, cut at a word."""
    text = message.strip().splitlines()[0].strip() if message.strip() else ""
    text = re.split(r"(?<=[^.])\. ", text, maxsplit=1)[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def unpickler_detail(message: str) -> str:
    """The unpickler's own error inside torch's "Weights only load failed" message (which leads with how to load the
    file unsafely: advice a checkpoint written by train.py never needs)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return found.group(1) if found else message.replace("Weights only load failed.", "")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents (tensors and plain data only: ``weights_only``), or a clear error naming the file and,
    when there is one, the previous checkpoint beside it to fall back to. A complete file holding pickled objects is
    refused as such (loading it could run arbitrary code), not called corrupt."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    try:
        if not head:
            raise ValueError("the file is empty")
        if head[:2] != b"PK":
            raise ValueError("not a torch checkpoint: torch.save writes a zip archive, this file does not start like one")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, wrong magic, unpickling refused: all mean "not a usable checkpoint"
        if isinstance(err, UserError):
            raise
        message = str(err)
        if isinstance(err, pickle.UnpicklingError):
            found = NON_TENSOR.search(message)
            if found:
                what = f" ({found.group(1)})" if found.group(1) else ""
                raise CheckpointReadError(f"{path}: the checkpoint holds non-tensor objects{what}; refusing to unpickle it, "
                                          "which could run arbitrary code (checkpoints written by train.py hold only "
                                          "tensors and plain data)") from None
            message = unpickler_detail(message)
        reason = first_sentence(message) or type(err).__name__
        previous = path.with_name(path.stem + ".prev" + path.suffix)
        fallback = (f"; the checkpoint before it is {previous}: resume from it with --ckpt_path {previous}"
                    if previous.is_file() and previous != path else "")
        raise CheckpointReadError(f"{path}: unreadable checkpoint (truncated or corrupt: {reason}){fallback}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointReadError(f"{path}: not a checkpoint written by train.py (no state_dict)")
    return checkpoint


def data_identity(datamodule) -> Optional[dict]:
    """What a resumed run must train on exactly as before, or None for a datamodule outside the contract."""
    if not isinstance(datamodule, TrainingData):
        return None
    manifest = datamodule.manifest()
    selection = {k: v for k, v in manifest.items() if k not in NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(selection, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"batch_size": getattr(datamodule, "batch_size", None), "findings": list(datamodule.training_findings()),
            "resolution": manifest.get("resolution"), "seed": getattr(datamodule, "seed", None),
            "shuffle": getattr(datamodule, "shuffle", None), "selection_digest": digest}


def data_mismatch(saved: Optional[dict], current: Optional[dict]) -> Optional[str]:
    """Why a checkpoint's data record and this configuration's differ (None when they agree or one is unknown)."""
    if not saved or not current:
        return None
    # keys a checkpoint does not record (written before they were added) are not compared
    differ = [f"{key} {saved.get(key)!r} → {current.get(key)!r}" for key in ("batch_size", "findings", "resolution", "seed", "shuffle")
              if key in saved and saved.get(key) != current.get(key)]
    if not differ and saved.get("selection_digest") != current.get("selection_digest"):
        differ.append("the training/validation images (same findings, but another selection: seed, CSVs or limits changed)")
    if not differ:
        return None
    return ("the checkpoint was trained on other data than this configuration gives: " + "; ".join(differ) + ". "
            "A resumed run must keep its data and batch size (the batches after the checkpoint would differ); resume with "
            "the run's own settings (its configs/start-*.yaml) or start a new run")


def base_model_mismatch(saved: Optional[dict], current: dict) -> Optional[str]:
    """Why the checkpoint's base model and this configuration's differ (None when the frozen weights are the same)."""
    if not saved or saved.get("frozen_fingerprint") == current.get("frozen_fingerprint"):
        return None
    return (f"the checkpoint was trained on base model {saved.get('name')!r} (frozen weights {saved.get('frozen_fingerprint')}), "
            f"but this configuration loads {current.get('name')!r} (frozen weights {current.get('frozen_fingerprint')}). "
            f"Resume with --model.init_args.model.pretrained {saved.get('pretrained')}, or start a new run")


def world_size_mismatch(saved: Optional[int], current: Optional[int]) -> Optional[str]:
    """Why a checkpoint saved by ``saved`` processes cannot continue on ``current`` (None when they agree or one is
    unknown)."""
    if saved is None or current is None or int(saved) == int(current):
        return None
    return (f"the checkpoint was saved by a run on {saved} process(es) (devices × nodes) and this start runs on {current}. "
            "The position within the epoch is counted per process and the batch size is per process, so part of the "
            f"epoch would be replayed or skipped and the effective batch would change; resume on {saved} process(es) "
            "(trainer.devices × trainer.num_nodes), or start a new run")
