"""Does the demo copy its training phantoms? ``python benchmarks/memorization_demo.py`` (an estimate: 30-45 min on 2 CPU
cores, from its parts run separately, never timed end to end).

Trains the U-Net demo (``configs/demo.yaml``: 16 training phantoms, prior preservation) for 100, 300 and 1,000 steps,
the last with a :class:`callbacks.memorization.MemorizationMonitor` checking every 100 steps, and the same
configuration on only 2 training images (one per finding: the paper's 5 + 5 in miniature) for 1,000 steps. Then
audits them with ``evaluate.py memorization`` in pixel space (aligned gray pixels), held-out images from a second
phantom dataset (other "patients", ``data/phantoms_heldout``: the set the report-conditioned and utility demos read,
written by the command their pages show, ``python -m synthetic.phantoms data/phantoms_heldout --n-per-finding 500
--findings "No Finding" "Pleural Effusion" --seed 11``; whichever runs first, the other keeps it), the base model as
the control. Every step is a command a user can run; finished runs and audits are reused.

Writes under ``--out``: ``summary.md`` (the table), ``copy_rate_vs_steps.png`` and the audits' own folders.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = {"No Finding": 500, "Pleural Effusion": 500}
QUANTILE = "0.98"  # the held-out root has 183 test images of the two findings: 0.99 would need 200
AUDIT = ["--features", "pixel", "--quantile", QUANTILE, "--n_per_prompt", "32", "--steps", "10"]


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ, WANDB_MODE="offline"))
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}")


def train(runs: Path, name: str, steps: int, *extra: str) -> Path:
    sh("train.py", "--config", "demo.yaml", "--runs_dir", str(runs), "--run_name", name, "--trainer.max_steps", str(steps),
       "--ckpt_path", "last", *extra)
    return runs / name


TWO = ("--data.init_args.train_images_per_finding", "1")


def calibrate(out: Path, heldout: Path, run: Path) -> float:
    if not (out / "calibration.json").is_file():
        sh("evaluate.py", "memorization", "--runs", str(run), "--out", str(out), "--heldout_root", str(heldout),
           "--calibrate_only", *AUDIT)
    return json.loads((out / "calibration.json").read_text())["threshold"]


def monitor_args(threshold: float) -> str:
    monitor = {"class_path": "callbacks.memorization.MemorizationMonitor",
               "init_args": {"every_n_steps": 100, "n_per_prompt": 16, "threshold": threshold, "steps": 10}}
    return f"--trainer.callbacks+={json.dumps(monitor)}"


def audit(out: Path, heldout: Path, runs: list[Path], *extra: str) -> dict:
    if not (out / "memorization.csv").is_file():
        sh("evaluate.py", "memorization", "--runs", *map(str, runs), "--out", str(out), "--heldout_root", str(heldout),
           *AUDIT, *extra)
    import pandas as pd

    table = pd.read_csv(out / "memorization.csv")
    return {name: (int(g["copy"].sum()), len(g), float(g["train_similarity"].mean())) for name, g in table.groupby("model", sort=False)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs_dir", default="runs/memorization_demo")
    p.add_argument("--heldout_root", default="data/phantoms_heldout")
    p.add_argument("--out", default="results/memorization_demo")
    args = p.parse_args(argv)
    runs, heldout, out = (REPO / args.runs_dir), (REPO / args.heldout_root), (REPO / args.out)
    from synthetic.phantoms import write_phantom_mimic

    write_phantom_mimic(heldout, n_per_finding=HELDOUT, size=256, seed=11)
    short = [train(runs, f"demo-{s}", s) for s in (100, 300)]
    threshold = calibrate(out / "calibration", heldout, short[0])
    long = train(runs, "demo-1000", 1000, monitor_args(threshold))
    # the 2-image run: 100 steps, its own threshold (its training images differ), then on to 1,000 with the monitor
    two = train(runs, "two-images", 100, *TWO)
    threshold_two = calibrate(out / "calibration-two-images", heldout, two)
    train(runs, "two-images", 1000, *TWO, monitor_args(threshold_two))
    demo = audit(out / "demo", heldout, [*short, long])
    few = audit(out / "two-images", heldout, [two])
    write_summary(out, runs, demo, few, threshold, threshold_two)
    return 0


def write_summary(out: Path, runs: Path, demo: dict, few: dict, threshold: float, threshold_two: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from metrics.memorization import copy_rate

    def row(label, steps, train_images, counts):
        copies, n, mean = counts
        rate = copy_rate([True] * copies + [False] * (n - copies))
        return {"model": label, "steps": steps, "training images": train_images, "copies": f"{copies}/{n}",
                "copy rate": rate["rate"], "ci_low": rate["ci_low"], "ci_high": rate["ci_high"], "mean similarity": mean}

    base = next(iter(demo.values()))
    n_demo, n_few = (len(json.loads((runs / name / "data.json").read_text())["train"]) for name in ("demo-100", "two-images"))
    rows = [row("base (tiny-phantom)", 0, n_demo, base)]
    rows += [row(f"demo, {s} steps", s, n_demo, demo[f"demo-{s}"]) for s in (100, 300, 1000)]
    rows += [row("base (tiny-phantom)", 0, n_few, next(iter(few.values()))),
             row("2 training images, 1000 steps", 1000, n_few, few["two-images"])]
    table = pd.DataFrame(rows)
    lines = ["| model | training images | copies | copy rate [95% CI] | mean nearest-training similarity |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['training images']} | {r['copies']} | {100 * r['copy rate']:.1f}% "
              f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] | {r['mean similarity']:.3f} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "summary.csv", index=False)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for first, label, color, csv_path, t in ((0, f"{n_demo} training images", "tab:blue", runs / "demo-1000", threshold),
                                             (4, f"{n_few} training images", "tab:red", runs / "two-images", threshold_two)):
        audited = table.iloc[[first, 1, 2, 3]] if first == 0 else table.iloc[[4, 5]]
        ax.errorbar(audited["steps"], 100 * audited["copy rate"], fmt="o", color=color, capsize=3,
                    yerr=[100 * (audited["copy rate"] - audited["ci_low"]), 100 * (audited["ci_high"] - audited["copy rate"])],
                    label=f"audit, {label} (64 images, 95% CI; threshold {t:.3f})")
        monitor = csv_path / "memorization_monitor.csv"
        if monitor.is_file():
            m = pd.read_csv(monitor)
            ax.plot(m["step"], 100 * m["copy_rate"], "--", marker=".", color=color, alpha=0.6,
                    label=f"MemorizationMonitor, {label} (32 images)")
    ax.set_xlabel("training steps")
    ax.set_ylabel("copy rate (%)")
    ax.set_title(f"tiny-phantom U-Net demo: share of generated images closer to a training image\nthan the {QUANTILE} "
                 "quantile of other patients' images (pixel space)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "copy_rate_vs_steps.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
