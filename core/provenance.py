"""Provenance in one schema, for run folders, studies and the reproduction driver.

A ``provenance.json`` file is ``{"schema": SCHEMA, "records": [record, ...]}``: one record per start of a training run
(resumes append), one record for a study or a reproduction. Every record has the same keys:

``what``      what ran: ``train``, ``study/vae``, ``study/generation``, ``reproduce``, ...
``started``   UTC time, ISO 8601
``argv``      the command line
``host``, ``python``, ``git`` (``{"commit", "dirty"}``), ``packages`` (name -> version)
``settings``  what the user chose (the resolved configuration, seeds)
``inputs``    what was read (data, weights, ids, checkpoints)
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

SCHEMA = "cxr-diffusion/provenance/1"
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "lightning", "diffusers", "transformers", "accelerate", "torchmetrics", "torchxrayvision", "datasets",
            "scikit-image", "jsonargparse", "numpy", "pandas", "safetensors", "wandb")


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout this code runs from."""

    def git(*args):
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names: Sequence[str] = PACKAGES) -> dict:
    """Each named distribution's version (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record(what: str, settings: Optional[dict] = None, inputs: Optional[dict] = None, argv: Optional[Sequence[str]] = None,
           packages: Sequence[str] = PACKAGES) -> dict:
    """One provenance record (see the module docstring)."""
    return {
        "what": what,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
        "host": platform.node(),
        "python": platform.python_version(),
        "git": git_commit(),
        "packages": package_versions(packages),
        "settings": settings or {},
        "inputs": inputs or {},
    }


def read(path: Path) -> list[dict]:
    """The records of a ``provenance.json`` (an empty list when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a provenance file of schema {SCHEMA!r}")
    return list(data["records"])


def write(path: Path, rec: dict, append: bool = False) -> Path:
    """Write ``rec`` to ``path`` (after the records already there with ``append``), atomically."""
    from core.cache import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = (read(path) if append else []) + [rec]
    atomic_write(path, (json.dumps({"schema": SCHEMA, "records": records}, indent=1, default=str) + "\n").encode())
    return path
