"""Export a trained run: ``python export.py runs/<name> OUT_DIR [--ckpt last] [--merge] [--push_to_hub REPO]``.

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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder written by train.py (runs/<name>)")
    parser.add_argument("out_dir", help="folder to write the export to")
    parser.add_argument("--ckpt", default="last", help="'last' or a checkpoint file name/path")
    parser.add_argument("--merge", action="store_true", help="LoRA runs: a full pipeline with the adapters merged")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the export to this Hub repository")
    parser.add_argument("--public", action="store_true", help="with --push_to_hub: a public repository (default: private)")
    args = parser.parse_args(argv)

    from core.run_folder import RunFolder
    from lightning_modules.runs import RunLoadError, load_checkpoint_file, load_run
    from models.exports import read_manifest
    from models.model_card import write_model_card

    run = RunFolder(args.run_dir)
    try:
        module, path = load_run(run, args.ckpt)
        out = module.export(args.out_dir, merge=args.merge)
    except (RunLoadError, ValueError) as err:
        sys.exit(f"export.py: error: {err}")
    steps = load_checkpoint_file(path).get("global_step")
    data = run.data() if run.data_file.is_file() else None
    write_model_card(out, read_manifest(out), data, steps, run_results(run))
    print(f"exported {path} -> {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.public)
        except Exception as err:  # no network, no token, no permission: one line, the export stays on disk
            sys.exit(f"export.py: error: --push_to_hub {args.push_to_hub}: {type(err).__name__}: {err}".splitlines()[0]
                     + f" (the export is in {out})")
        print(f"uploaded {out} to {url} ({'public' if args.public else 'private'})")


if __name__ == "__main__":
    main()
