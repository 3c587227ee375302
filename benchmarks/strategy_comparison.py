"""The strategies side by side on tiny-phantom at the demo's step budget: ``python benchmarks/strategy_comparison.py``.

For U-Net fine-tuning, U-Net + text encoder and LoRA at two ranks, each without and with an EMA, this trains the demo
configuration (phantoms, prior preservation, 300 steps at the demo's rates) and prints one table: the
finding-correctness AUROC with its 95 % Newcombe score interval (64 images per prompt, the phantom classifier; the same
seeds for every model, the base model's row first), the checkpoint's size and the CPU seconds per training step.
Writes ``comparison.json``, ``comparison.md`` and each run's ``finding_correctness.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NORMAL, EFFUSION = "a photo of a lung xray", "a photo of a lung xray with a visible pleural effusion"
VARIANTS = (
    ("U-Net", "demo", []),
    ("U-Net + text encoder", "unet_text_encoder_demo", []),
    ("LoRA, rank 4", "lora_unet_demo", ["--model.init_args.rank", "4"]),
    ("LoRA, rank 16", "lora_unet_demo", ["--model.init_args.rank", "16"]),
)
EMA = ["--model.init_args.ema", '{"decay": 0.999}']


def train(name: str, config: str, extra: list, out: Path, steps: int) -> Path:
    run = out / "runs" / name
    if (run / "checkpoints" / "last.ckpt").is_file():
        return run
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config, "--runs_dir", str(out / "runs"), "--run_name", name,
           "--data.init_args.root", str(out / "phantoms"), "--trainer.max_steps", str(steps), "--trainer.callbacks=[]",
           "--trainer.callbacks+=synthetic.testing.StepTimer", "--trainer.limit_val_batches", "0", "--wandb_mode", "disabled",
           *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, CXR_DIFFUSION_CACHE=str(out / "cache")))
    if done.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{done.stderr[-3000:]}")
    return run


def evaluate(generator, classifier, n: int, label: str, grid: Path | None) -> dict:
    import torch

    from core.grids import labelled_grid
    from metrics.finding_correctness import finding_correctness_of_images

    seeds = [1000 + i for i in range(n)]
    images = {p: generator.generate([p] * n, seeds=seeds, steps=25, guidance=4.0) for p in (NORMAL, EFFUSION)}
    if grid is not None:
        k = min(8, n)
        labelled_grid(torch.cat([images[NORMAL][:k], images[EFFUSION][:k]]), [NORMAL] * k + [EFFUSION] * k, k, title=label).save(grid)
    return finding_correctness_of_images(classifier, images[EFFUSION], images[NORMAL], "Pleural Effusion", n_boot=200, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=64, help="images per prompt")
    args = parser.parse_args(argv)

    from lightning_modules.runs import load_run_generator
    from metrics.classifiers import load_classifier

    classifier = load_classifier("tiny-phantom")
    rows = []
    for label, config, extra in VARIANTS:
        for ema in (False, True):
            name = f"{config}{'_r' + extra[-1] if extra else ''}{'_ema' if ema else ''}"
            run = train(name, config, extra + (EMA if ema else []), args.out, args.steps)
            if not rows:  # the base model, once: the same prompts and seeds
                base, _ = load_run_generator(run, trained=False)
                rows.append({"model": "base (tiny-phantom)", **evaluate(base, classifier, args.n, "base", None)})
            generator, ckpt = load_run_generator(run)
            score = evaluate(generator, classifier, args.n, f"{label}{' + EMA' if ema else ''}", run / "finding_correctness.png")
            timing = json.loads((run / "step_time.json").read_text())
            rows.append({"model": label + (" + EMA" if ema else ""), **score, "checkpoint_mib": ckpt.stat().st_size / 2**20,
                         "seconds_per_step": timing["seconds_per_step"]})
            print(f"{rows[-1]['model']:<30} AUROC {score['auroc']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]", flush=True)
    lines = [f"| model | AUROC, effusion vs plain prompt [95 % CI] | checkpoint | CPU s/step |", "|---|---|---:|---:|"]
    for r in rows:
        size = f"{r['checkpoint_mib']:.2f} MiB" if "checkpoint_mib" in r else "–"
        step = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else "–"
        lines.append(f"| {r['model']} | {r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {size} | {step} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "comparison.md").write_text(table + "\n")
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
