"""Export a trained run: ``python export.py runs/<name> OUT_DIR [--ckpt last]``.

Every export is a folder that plain diffusers loads, plus ``export.json`` naming its kind, strategy and base model
(``models/exports.py``; ``generate.py --export`` and the studies read any of them with ``load_export``):

* U-Net runs: a ``StableDiffusionPipeline`` folder (safetensors): ``StableDiffusionPipeline.from_pretrained(OUT_DIR)``;
* textual-inversion runs: ``learned_embeds.safetensors`` for ``pipe.load_textual_inversion(OUT_DIR)``;
* projection runs: ``projection.safetensors`` and ``projection.json`` (the domain encoder and the MLP).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder written by train.py (runs/<name>)")
    parser.add_argument("out_dir", help="folder to write the export to")
    parser.add_argument("--ckpt", default="last", help="'last' or a checkpoint file name/path")
    args = parser.parse_args(argv)

    from lightning_modules.runs import RunLoadError, load_run

    try:
        module, path = load_run(args.run_dir, args.ckpt)
    except RunLoadError as err:
        sys.exit(f"export.py: error: {err}")
    out = module.export(args.out_dir)
    print(f"exported {path} -> {out}")


if __name__ == "__main__":
    main()
