"""Export a trained run: ``python export.py runs/<name> OUT_DIR [--ckpt last|best] [--merge] [--push_to_hub REPO]``.

Every export is a folder that plain diffusers loads, plus ``export.json`` naming its kind, strategy, base model and
which weights it holds (the trained ones or their EMA), and a ``README.md`` model card (the Hugging Face Hub's format:
base model, strategy, training data with MIMIC-CXR's data-use notice, steps, the run's evaluation results).
``generate.py --export`` and the studies read any of them with ``models.exports.load_export``:

* U-Net and U-Net + text-encoder runs: a ``StableDiffusionPipeline`` folder: ``StableDiffusionPipeline.from_pretrained(OUT_DIR)``;
* LoRA runs: diffusers' LoRA weights, ``pipe.load_lora_weights(OUT_DIR)`` on the base model; ``--merge`` writes a full
  pipeline with the adapters merged instead;
* textual-inversion runs: ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion(OUT_DIR)``;
* projection runs: ``projection.safetensors`` and ``projection.json`` (the domain encoder and the MLP).

``--push_to_hub REPO`` uploads the folder to the Hugging Face Hub, **private** unless ``--public``.

``OUT_DIR`` must be a new or empty folder. A folder holding an earlier export is replaced only with ``--overwrite``
(its files are removed, so two exports never mix); a non-empty folder that holds no export is never emptied. The export
is written into a hidden sibling folder first and moved into place when complete: a failed export changes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from core.errors import UserError, run_main

PROG = "export.py"


class ExportDestinationError(UserError):
    """``OUT_DIR`` is a file, or a non-empty folder that may not be replaced."""


def check_destination(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` must be emptied before the export (``--overwrite`` of an earlier export); refuses a file, a
    non-empty folder without ``--overwrite`` and, even with it, a non-empty folder that holds no export."""
    from models.exports import looks_like_export

    if out.exists() and not out.is_dir():
        raise ExportDestinationError(f"{out}: exists and is not a folder; give a new or empty folder to export into")
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not contents:
        return False
    shown = ", ".join(contents[:5]) + (" ..." if len(contents) > 5 else "")
    if not looks_like_export(out):
        raise ExportDestinationError(f"{out}: the folder is not empty ({shown}) and holds no export; give a new or empty "
                                     "folder (--overwrite replaces an earlier export only)")
    if not overwrite:
        raise ExportDestinationError(f"{out}: holds an earlier export ({shown}); pass --overwrite to replace it (its files "
                                     "are removed first) or give a new or empty folder")
    return True


def write_into(module, out: Path, merge: bool, replace: bool) -> Path:
    """``module.export`` into a hidden sibling of ``out``, then moved into ``out`` (emptied first when ``replace``): an
    export that fails half-way leaves ``out`` as it was, and the files of two exports never mix."""
    from models.exports import clear_folder

    target = out.resolve()
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        module.export(staging, merge=merge)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace:
        print(f"--overwrite: removed the earlier export ({', '.join(clear_folder(out))}) from {out}")
    if out.is_dir():
        for path in staging.iterdir():
            os.replace(path, out / path.name)
        staging.rmdir()
    else:
        os.replace(staging, out)
    return out


def run_results(run) -> dict:
    """The run's own evaluation results, where they exist (FID during training, the finding-correctness demo)."""
    results = {}
    fid = run.path / "fid.csv"
    if fid.is_file():
        import pandas as pd

        table = pd.read_csv(fid)
        last = table[table["step"] == table["step"].max()]
        results["FID during training (last validation)"] = "; ".join(
            f"{r.prompt!r}: {r.fid:.2f} ({r.features} features, N = {r.n_generated} generated / {r.n_real} real)" for r in last.itertuples())
    correctness = run.path / "finding_correctness.json"
    if correctness.is_file():
        data = json.loads(correctness.read_text())
        results["finding correctness (AUROC, effusion vs plain prompt)"] = ", ".join(
            f"{name} {r['auroc']:.3f}" for name, r in data.get("results", {}).items()) + f" (N = {data.get('n_per_prompt')} per prompt)"
    return results


def push_to_hub(folder: Path, repo: str, public: bool) -> str:
    """Upload ``folder`` to the Hub repository ``repo`` (created private unless ``public``); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=not public, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                      commit_message="cxr-diffusion export")
    return str(url)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder written by train.py (runs/<name>)")
    parser.add_argument("out_dir", help="folder to write the export to")
    parser.add_argument("--ckpt", default="last", help="'last', 'best' (the BestCheckpoint's choice under its copy-rate "
                        "limit, see the run's best.json) or a checkpoint file name/path")
    parser.add_argument("--merge", action="store_true", help="LoRA runs: a full pipeline with the adapters merged")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the export to this Hub repository")
    parser.add_argument("--public", action="store_true", help="with --push_to_hub: a public repository (default: private)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR (its files are removed "
                        "first); a non-empty folder without an export is never emptied")
    args = parser.parse_args(argv)

    from core.run_folder import RunFolder
    from lightning_modules.runs import RunLoadError, load_checkpoint_file, load_run
    from models.exports import read_manifest, update_manifest
    from models.model_card import write_model_card

    try:
        replace = check_destination(Path(args.out_dir), args.overwrite)
    except ExportDestinationError as err:
        sys.exit(f"{PROG}: error: {err}")
    run = RunFolder(args.run_dir)
    try:
        module, path = load_run(run, args.ckpt)
        out = write_into(module, Path(args.out_dir), args.merge, replace)
    except (RunLoadError, ValueError) as err:
        sys.exit(f"{PROG}: error: {err}")
    steps = load_checkpoint_file(path).get("global_step")
    data = run.data() if run.data_file.is_file() else None
    results = run_results(run)
    record = run.path / "best.json"
    if args.ckpt == "best" and not record.is_file():
        print(f"{PROG}: warning: {record} is missing, so the export cannot say by which rule best.ckpt was chosen", file=sys.stderr)
    elif args.ckpt == "best":  # the BestCheckpoint's choice: its rule and step in export.json and the model card
        choice = json.loads(record.read_text())
        update_manifest(out, checkpoint_selection={k: choice[k] for k in ("rule", "chosen_step", "chosen", "copy_rate_limit")})
        chosen = choice["chosen"]
        results["checkpoint chosen"] = (f"step {chosen['step']}: {choice['rule']} ({choice['metric']} {chosen['value']:.4g}, "
                                        f"copy rate {chosen['copy_rate']:.3f})")
    write_model_card(out, read_manifest(out), data, steps, results)
    print(f"exported {path} -> {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.public)
        except Exception as err:  # no network, no token, no permission: one line, the export stays on disk
            sys.exit(f"export.py: error: --push_to_hub {args.push_to_hub}: {type(err).__name__}: {err}".splitlines()[0]
                     + f" (the export is in {out})")
        print(f"uploaded {out} to {url} ({'public' if args.public else 'private'})")


if __name__ == "__main__":
    run_main(PROG, main)
