"""The strategies side by side on the phantom-trained bases: ``python benchmarks/strategy_comparison.py``.

For each base (``tiny-phantom``, Stable Diffusion; ``tiny-phantom-sana``, Sana) and each strategy the family has (the
whole denoiser, the denoiser + its text encoder, LoRA at ranks 4 and 16), each without and with an EMA (decay 0.999),
this trains the base's phantom demo configuration (phantoms, prior preservation, the demo's rates; ``--steps`` steps,
300 by default for both bases) and prints one table with a ``base`` column: the finding-correctness AUROC with its
95 % Newcombe score interval (``--n`` images per prompt, 64 by default, the phantom classifier; the same seeds for every
model; each base's own row first), the checkpoint's size and the CPU seconds per training step. Every model samples as
``python -m synthetic.finding_correctness_demo`` does: 25 steps, guidance 4.0, its base's own sampler (Stable
Diffusion: ddim; Sana: flow-matching Euler), recorded per row. A run folder whose ``last.ckpt`` is at step ``--steps``
is reused (one at another step is refused, naming it). Writes ``comparison.json`` and ``comparison.md`` (rewritten
after each row) and each run's ``finding_correctness.png`` under ``--out``.
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
SAMPLING = {"steps": 25, "guidance": 4.0}  # synthetic/finding_correctness_demo.py's defaults, for both bases
EMA = ["--model.init_args.ema", '{"decay": 0.999}']
# per base: (strategy key, label, config, extra arguments); the key is what --only selects (``_ema`` adds the EMA)
BASES = {
    "tiny-phantom": (
        ("denoiser", "U-Net", "demo", []),
        ("text_encoder", "U-Net + text encoder", "unet_text_encoder_demo", []),
        ("lora4", "LoRA, rank 4", "lora_unet_demo", ["--model.init_args.rank", "4"]),
        ("lora16", "LoRA, rank 16", "lora_unet_demo", ["--model.init_args.rank", "16"]),
    ),
    "tiny-phantom-sana": (
        ("denoiser", "transformer", "sana_phantom_demo", []),
        ("text_encoder", "transformer + Gemma-2 last layer", "sana_text_encoder_phantom_demo", []),
        ("lora4", "LoRA, rank 4", "lora_sana_phantom_demo", ["--model.init_args.rank", "4"]),
        ("lora16", "LoRA, rank 16", "lora_sana_phantom_demo", ["--model.init_args.rank", "16"]),
    ),
}
STRATEGIES = [key + ema for key, *_ in BASES["tiny-phantom"] for ema in ("", "_ema")]


def train(name: str, config: str, extra: list, out: Path, steps: int) -> Path:
    run = out / "runs" / name
    if (run / "checkpoints" / "last.ckpt").is_file():  # a finished run of this length is reused, not retrained
        from lightning_modules.runs import load_checkpoint_file

        done = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"]
        if done != steps:  # a stopped run (checkpointed every 100 steps) or one of another --steps
            raise SystemExit(f"{run}: its last.ckpt is at step {done}, not --steps {steps}: delete the folder to train it "
                             f"again, or pass --steps {done}")
        return run
    # the step timer skips the first 10 steps (fewer in a short run, so a 2-step run times its last step)
    timer = json.dumps({"class_path": "synthetic.testing.StepTimer", "init_args": {"warmup": max(0, min(10, steps - 1))}})
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config, "--runs_dir", str(out / "runs"), "--run_name", name,
           "--data.init_args.root", str(out / "phantoms"), "--trainer.max_steps", str(steps), "--trainer.callbacks=[]",
           f"--trainer.callbacks+={timer}", "--trainer.limit_val_batches", "0", "--wandb_mode", "disabled", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, CXR_DIFFUSION_CACHE=str(out / "cache")))
    if done.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{done.stderr[-3000:]}")
    return run


def evaluate(generator, classifier, n: int, label: str, grid: Path | None) -> dict:
    import torch

    from core.grids import labelled_grid
    from metrics.finding_correctness import finding_correctness_of_images

    seeds = [1000 + i for i in range(n)]
    images = {p: generator.generate([p] * n, seeds=seeds, **SAMPLING) for p in (NORMAL, EFFUSION)}
    if grid is not None:
        k = min(8, n)
        labelled_grid(torch.cat([images[NORMAL][:k], images[EFFUSION][:k]]), [NORMAL] * k + [EFFUSION] * k, k, title=label).save(grid)
    score = finding_correctness_of_images(classifier, images[EFFUSION], images[NORMAL], "Pleural Effusion", n_boot=200, seed=0)
    return {**score, "sampler": generator.sample_scheduler, "sampling_steps": SAMPLING["steps"], "guidance": SAMPLING["guidance"]}


def compare_base(base: str, only: list, args, classifier, rows: list) -> None:
    """Train and score the selected strategies on ``base``, appending its base-model row first, then one per model."""
    from lightning_modules.runs import load_run_generator

    first = True
    for key, label, config, extra in BASES[base]:
        for ema in (False, True):
            if key + ("_ema" if ema else "") not in only:
                continue
            name = f"{config}{'_r' + extra[-1] if extra else ''}{'_ema' if ema else ''}"
            run = train(name, config, extra + (EMA if ema else []), args.out, args.steps)
            if first:  # the base model, once per base: the same prompts and seeds
                generator, _ = load_run_generator(run, trained=False)
                score = evaluate(generator, classifier, args.n, f"base ({base})", args.out / f"base_{base}.png")
                add_row(rows, args.out, {"base": base, "family": generator.sd.family, "model": f"base ({base})",
                                         "strategy": "base", "ema": False, "training_steps": 0, **score})
                first = False
            model = label + (" + EMA" if ema else "")
            generator, ckpt = load_run_generator(run)
            score = evaluate(generator, classifier, args.n, f"{base}: {model}", run / "finding_correctness.png")
            timing = run / "step_time.json"
            add_row(rows, args.out, {"base": base, "family": generator.sd.family, "model": model, "strategy": key, "ema": ema,
                                     "training_steps": args.steps, "run": str(run), **score,
                                     "checkpoint_mib": ckpt.stat().st_size / 2**20,
                                     "seconds_per_step": json.loads(timing.read_text())["seconds_per_step"] if timing.is_file() else None})


def add_row(rows: list, out: Path, row: dict) -> None:
    """Append ``row``, print it and rewrite comparison.md and comparison.json (a stopped comparison keeps its rows)."""
    rows.append(row)
    print(f"{row['base']:<18} {row['model']:<40} AUROC {row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]", flush=True)
    lines = ["| base | model | training steps | AUROC, effusion vs plain prompt [95 % CI] | checkpoint | CPU s/step |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        size = f"{r['checkpoint_mib']:.2f} MiB" if "checkpoint_mib" in r else "–"
        step = f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") is not None else "–"
        lines.append(f"| {r['base']} | {r['model']} | {r['training_steps'] or '–'} | "
                     f"{r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {size} | {step} |")
    samplers = ", ".join(dict.fromkeys(f"{r['base']} {r['sampler']}" for r in rows))
    note = (f"\n{rows[-1]['n_per_prompt']} images per prompt; sampling: {SAMPLING['steps']} steps, guidance "
            f"{SAMPLING['guidance']}, each base's own sampler ({samplers}).\n")
    (out / "comparison.md").write_text("\n".join(lines) + "\n" + note)
    (out / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/strategy_comparison.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES), help="default: both")
    parser.add_argument("--only", nargs="+", choices=STRATEGIES, default=STRATEGIES, metavar="STRATEGY",
                        help=f"train and score only these ({', '.join(STRATEGIES)}; default: all); the base rows always")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run, both bases (default 300)")
    parser.add_argument("--n", type=int, default=64, help="images per prompt")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.n < 2:
        parser.error(f"--steps {args.steps} --n {args.n}: expected at least 1 training step and 2 images per prompt")

    from metrics.classifiers import load_classifier

    args.out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier("tiny-phantom")  # tiny-phantom-sana ships none: it is scored with tiny-phantom's
    rows: list = []
    for base in dict.fromkeys(args.bases):
        compare_base(base, args.only, args, classifier, rows)
    print((args.out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
