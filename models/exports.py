"""Exports: what ``export.py`` writes and :func:`load_export` reads back, for every strategy.

An export folder holds the trained parts in formats plain diffusers loads, plus ``export.json``, which names its
*kind* (how to load it), the strategy that trained it and the base model::

    {"format": "cxr-diffusion export", "version": 1, "kind": "pipeline", "strategy": "UNetFineTuning",
     "base_model": {"pretrained": "CompVis/stable-diffusion-v1-4", ...}}

Kinds are looked up by name in the ``cxr_diffusion.exports`` entry points (pyproject.toml), each a function
``load(folder, manifest, base) -> Generator``; a new strategy with a new kind of export adds one line there:

* ``pipeline`` — a diffusers ``StableDiffusionPipeline`` folder (U-Net fine-tuning; also any plain diffusers pipeline);
* ``textual_inversion`` — ``learned_embeds*.safetensors`` and ``textual_inversion.json`` on a base model;
* ``projection`` — ``projection.safetensors`` and ``projection.json`` (domain encoder + MLP) on a base model;
* ``lora`` — diffusers' LoRA weights on a base model (``lightning_modules/lora.py``).

A folder without ``export.json`` (written by plain diffusers, or before ``export.json`` existed) is read by its files:
``model_index.json`` is a pipeline, ``projection.json`` a projection, ``textual_inversion.json`` or
``learned_embeds*.safetensors`` textual inversion. A folder whose files belong to two kinds (two exports written into
one folder) is refused naming both, with or without ``export.json``: no kind is picked silently.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from core import plugins
from core.errors import UserError
from models.generator import Generator

MANIFEST = "export.json"
FORMAT = "cxr-diffusion export"
EXPORTS = "cxr_diffusion.exports"


class ExportError(UserError, ValueError):
    """A folder is not an export, or its files do not fit together."""


def write_manifest(folder: Path, kind: str, strategy: str, base_model: dict, **extra) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": 1, "kind": kind, "strategy": strategy, "base_model": base_model, **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return folder / MANIFEST


def update_manifest(folder: Path, **fields) -> Path:
    """Add ``fields`` to ``export.json`` (e.g. which weights were exported: the trained ones or their EMA)."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return path


# The files that show each built-in kind (glob patterns in the export folder).
KIND_FILES = {
    "pipeline": ("model_index.json",),
    "projection": ("projection.json", "projection.safetensors"),
    "textual_inversion": ("textual_inversion.json", "learned_embeds*.safetensors"),
    "lora": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"),
}
STRATEGY_OF_FILES = {"pipeline": "a diffusers pipeline", "projection": "TextualProjection", "textual_inversion": "TextualInversion",
                     "lora": "LoRAFineTuning"}


def kinds_in(folder: Path) -> dict[str, list[str]]:
    """Kind -> the files of ``folder`` that show it (:data:`KIND_FILES`), for every built-in kind found there."""
    folder = Path(folder)
    found = {kind: sorted({p.name for pattern in patterns for p in folder.glob(pattern)}) for kind, patterns in KIND_FILES.items()}
    return {kind: names for kind, names in found.items() if names}


def _check_one_kind(folder: Path, declared: Optional[str]) -> None:
    """Refuse a folder holding the files of two kinds of export (or files of another kind than ``export.json`` names)."""
    found = kinds_in(folder)
    if declared is not None and declared not in KIND_FILES:
        return  # a kind from another package: its files are its own business
    kinds = sorted(set(found) | ({declared} if declared else set()))
    if len(kinds) > 1:
        shown = "; ".join(f"{kind} ({', '.join(found.get(kind, []) or [MANIFEST])})" for kind in kinds)
        raise ExportError(f"{folder}: holds the files of {len(kinds)} kinds of export: {shown}; two exports were written into "
                          "one folder, so which one to load is unclear. Export each run into its own (empty) folder")


def read_manifest(folder: Path) -> dict:
    """``export.json``, or for a folder without one the kind its files show (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder")
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or "kind" not in manifest:
            raise ExportError(f"{folder / MANIFEST}: not a {FORMAT} manifest (no 'kind')")
        _check_one_kind(folder, manifest["kind"])
        return manifest
    _check_one_kind(folder, None)
    found = kinds_in(folder)
    if found and "lora" not in found:  # plain diffusers LoRA weights name no base model: export.json is needed
        kind = next(iter(found))
        return {"kind": kind, "strategy": STRATEGY_OF_FILES[kind]}
    hint = (" (it looks like a run folder written by train.py: use --run, or export it with export.py)"
            if (folder / "config.yaml").is_file() else "")
    raise ExportError(
        f"{folder}: not an export folder{hint}; expected {MANIFEST} as written by export.py, or a diffusers pipeline "
        "(model_index.json), projection.json, or textual-inversion embeddings (learned_embeds*.safetensors)"
    )


def looks_like_export(folder: Path) -> bool:
    """True when ``folder`` holds ``export.json`` or the files of some kind of export (what ``export.py --overwrite``
    may replace)."""
    folder = Path(folder)
    return (folder / MANIFEST).is_file() or bool(kinds_in(folder))


def clear_folder(folder: Path) -> list[str]:
    """Remove everything in ``folder`` (an earlier export, before another is written there); returns the names removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def export_kinds() -> tuple[str, ...]:
    return plugins.names(EXPORTS)


def load_export(folder: str | Path, base: Optional[str] = None) -> Generator:
    """A :class:`~models.generator.Generator` from any export folder (eval mode, on the CPU).

    ``base``: the base Stable Diffusion (hub id, folder or preset) for exports that are trained on one (textual
    inversion, projection): it overrides the one the export names, and is required for plain diffusers
    textual-inversion files, which name none.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind = manifest["kind"]
    if kind not in export_kinds():
        raise ExportError(f"{folder}: export kind {kind!r} is not installed (known: {', '.join(export_kinds())})")
    generator = plugins.load(EXPORTS, kind)(folder, manifest, base)
    generator.info.update({"kind": kind, "strategy": manifest.get("strategy", generator.info.get("strategy")),
                           "export": str(folder), "weights": manifest.get("weights", "trained")})
    generator.sd.eval()
    return generator


# ---------------------------------------------------------------------- the built-in kinds
def load_pipeline(folder: Path, manifest: dict, base: Optional[str] = None) -> Generator:
    """A diffusers ``StableDiffusionPipeline`` folder: everything it needs is in it."""
    from models.stable_diffusion import load_stable_diffusion

    if base is not None:
        raise ExportError(f"{folder}: a pipeline export holds its whole model; a base model applies to textual-inversion "
                          "and projection exports only")
    # the text window it was trained with: export.json's base model records it, the pipeline folder's files do not
    base_model = manifest.get("base_model") or {}
    return Generator(load_stable_diffusion({"pretrained": str(folder), "local_files_only": True,
                                            "max_sequence_length": base_model.get("max_sequence_length"),
                                            "long_prompts": base_model.get("long_prompts", "truncate")}))


def load_textual_inversion(folder: Path, manifest: dict, base: Optional[str] = None) -> Generator:
    """``learned_embeds*.safetensors`` (+ ``textual_inversion.json``) on the base model."""
    from models.generator import ClipConditioning
    from models.stable_diffusion import load_stable_diffusion
    from models.token_embedding import PlaceholderTokens, read_learned_embeddings

    folder = Path(folder)
    details_file = folder / "textual_inversion.json"
    details = json.loads(details_file.read_text()) if details_file.is_file() else {}
    details.setdefault("base_model", manifest.get("base_model"))
    if base is None and not details["base_model"]:
        raise ExportError(f"{folder}: textual-inversion embeddings without textual_inversion.json do not name their base "
                          "model; give the model the tokens were trained on")
    spec = {"pretrained": base, "local_files_only": Path(base).is_dir()} if base else details["base_model"]
    tokens, rows = read_learned_embeddings(folder, details.get("tokens"))
    sd = load_stable_diffusion(spec)
    placeholders = PlaceholderTokens(sd, tokens, multi_token_initializer="average")
    placeholders.load(rows, where=str(folder))
    subject = details.get("subject") or " ".join(t.token for t in tokens)
    conditioning = ClipConditioning(sd, placeholders.expand) if sd.family == "stable-diffusion" else sd.conditioning(rewrite=placeholders.expand)
    return Generator(sd, conditioning, tokens=[t.token for t in tokens], subject=subject)


def load_projection(folder: Path, manifest: dict, base: Optional[str] = None) -> Generator:
    from models.projection import load_projection as load

    return load(folder, base)
