"""Does fine-tuning teach the model to draw the finding it is asked for? ``python -m synthetic.finding_correctness_demo runs/demo``.

The run is one of a phantom-trained base of any family: ``tiny-phantom`` (Stable Diffusion, ``configs/demo.yaml``) or
``tiny-phantom-sana`` (Sana, ``configs/sana_phantom_demo.yaml``); the base and its family are recorded in the JSON.

Generates images for "a photo of a lung xray" and "a photo of a lung xray with a visible pleural
effusion" with the run's base model and with the fine-tuned run, on the same seeds, scores each
image with the shipped phantom classifier (torchxrayvision interface) and prints, per model, the
mean P(effusion) for each prompt, the AUROC separating the two prompts and the accuracy at the
operating point. Writes ``finding_correctness.json`` and a before/after grid into the run folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from datamodules.prompts import FINDING_PROMPTS

NORMAL = FINDING_PROMPTS["No Finding"]
EFFUSION = FINDING_PROMPTS["Pleural Effusion"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m synthetic.finding_correctness_demo", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=64, help="images per prompt and model")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--classifier", default="tiny-phantom")
    parser.add_argument("--grid_columns", type=int, default=8)
    parser.add_argument("--intervals", action="store_true",
                        help="add the AUROC's 95%% interval (Newcombe's score interval) to the table and the JSON")
    args = parser.parse_args(argv)

    from core.grids import labelled_grid
    from lightning_modules.runs import RunLoadError, load_run_generator
    from metrics.classifiers import load_classifier
    from metrics.finding_correctness import finding_correctness_of_images

    try:
        tuned, ckpt = load_run_generator(args.run_dir)
        base, _ = load_run_generator(args.run_dir, trained=False)
    except RunLoadError as err:
        sys.exit(f"finding_correctness_demo.py: error: {err}")
    classifier = load_classifier(args.classifier)
    seeds = [args.seed + i for i in range(args.n)]
    results, rows, labels = {}, [], []
    for name, generator in (("base", base), ("fine-tuned", tuned)):
        images = {p: generator.generate([p] * args.n, seeds=seeds, steps=args.steps, guidance=args.guidance) for p in (NORMAL, EFFUSION)}
        results[name] = finding_correctness_of_images(classifier, images[EFFUSION], images[NORMAL], "Pleural Effusion",
                                                      n_boot=1 if args.intervals else 0)  # the interval is analytic
        for p in (NORMAL, EFFUSION):
            rows.append(images[p][: args.grid_columns])
            labels += [f"{name}: {p}"] * min(args.grid_columns, args.n)
    family = getattr(base.sd, "family", "stable-diffusion")
    on = "" if family == "stable-diffusion" else f", base {base.sd.spec.pretrained} ({family})"  # SD's line as it was
    print(f"finding correctness, Pleural Effusion, {args.n} images per prompt, seeds {seeds[0]}..{seeds[-1]}, "
          f"classifier {args.classifier}, run {ckpt}{on}")
    print(f"{'model':<11} {'P(eff)|effusion prompt':>23} {'P(eff)|normal prompt':>21} {'AUROC':>6} {'accuracy':>9}"
          + (f" {'95% interval':>14}" if args.intervals else ""))
    for name, r in results.items():
        print(f"{name:<11} {r['mean_prob_finding_prompt']:>23.3f} {r['mean_prob_normal_prompt']:>21.3f} {r['auroc']:>6.3f} {r['accuracy']:>9.3f}"
              + (f"   [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if args.intervals else ""))
    grid = labelled_grid(torch.cat(rows), labels, min(args.grid_columns, args.n), title="before / after fine-tuning")
    grid.save(args.run_dir / "finding_correctness.png")
    out = {"classifier": args.classifier, "checkpoint": str(ckpt), "base_model": {"pretrained": base.sd.spec.pretrained, "family": family},
           "n_per_prompt": args.n, "seeds": [seeds[0], seeds[-1]],
           "steps": args.steps, "guidance": args.guidance, "prompts": {"finding": EFFUSION, "normal": NORMAL}, "results": results}
    (args.run_dir / "finding_correctness.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.run_dir / 'finding_correctness.png'} and finding_correctness.json")
    return out


if __name__ == "__main__":
    main()
