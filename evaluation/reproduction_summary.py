"""``summary.md``, ``summary.json`` and ``provenance.json`` of a ``reproduce.py`` results folder.

``summary.md`` shows the paper's Tables 1-4 (read back from the studies' CSV files, each linked) and
links Figures 1, 3 and 4, plus our additions (finding correctness, diversity). ``summary.json`` lists
each table's file, rows and columns. ``provenance.json`` gathers, for the whole reproduction: the
driver's command, git commit, package versions, inputs, every step's command and duration, and for
every run and study where its resolved config, seeds and sampled id lists are.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from core import provenance
from core.run_folder import RunFolder

# (key, title, file under the results folder, index column, note)
TABLES = (
    ("table1", "Table 1: classifier on original vs reconstructed images", "studies/vae/classifier_table.csv", None,
     "torchxrayvision DenseNet-121 (or the phantom classifier in the demo) on the originals and on their VAE reconstructions."),
    ("table2", "Table 2: CheXpert@k, macro average, per encoder and extraction", "studies/text_encoders/table2.csv", 0,
     "None: the model has no such output (e.g. no pooler weights); degenerate: every embedding identical, not scored."),
    ("table3", "Table 3: CheXpert@k per class, best extraction of each encoder", "studies/text_encoders/table3.csv", 0, ""),
    ("table4", "Table 4: FID per strategy and prompt", "studies/generation/table4.csv", 0,
     "Standard FID on our feature extractor: not on the paper's scale (its values are 0.03-0.27). Compare rows with each other, "
     "at equal N; fid.csv has N and grouped-jackknife intervals (docs/statistics.md)."),
    ("finding_correctness", "Finding correctness (ours): does the image show the finding the prompt asks for?",
     "studies/generation/finding_correctness.csv", None,
     "AUROC of the classifier's P(effusion) separating the effusion prompt's images from the plain prompt's; 0.5 = chance."),
    ("memorization", "Memorization audit (beyond the paper): generated images that copy a training image",
     "studies/memorization/summary.csv", None,
     "Per training set (runs trained on the same images share one), the base model as the control: the share of generated "
     "images closer to a training image than the calibrated quantile of other patients' images, with its exact "
     "(Clopper-Pearson) 95% interval. Evidence of copying in one feature space, not proof of privacy; each folder's memorization.md states the "
     "threshold and its false-positive rate."),
    ("report_auroc", "Report-conditioned generation (beyond the paper): AUROC per finding",
     "studies/generation_reports/report_auroc.csv", None,
     "Every model prompted with test-split impressions, class-balanced; per finding the AUROC of the classifier's score "
     "against the report's CheXpert label, and the macro. report_results.md adds the confusion view and long-prompt counts."),
    ("utility", "Downstream utility (beyond the paper): macro AUROC of a classifier per training arm",
     "studies/utility/utility.csv", None,
     "(a) real only, (b) synthetic only, (c) mixed at the same budget, (d) synthetic then real; scored on real test "
     "images. utility.md has the per-finding values and the differences to (a) with paired intervals."),
)
FIGURES = (
    ("Figure 1: the base model and the fine-tuned U-Net (prior preservation) on the plain and the effusion prompt",
     ["studies/generation/figure1.png"]),
    ("Figure 3: VAE reconstruction (a: originals above reconstructions; b: per-image metrics)",
     ["studies/vae/examples.png", "studies/vae/metrics_distribution.png"]),
    ("Figure 4: samples of every strategy and prompt", ["studies/generation/figure4.png"]),
    ("Text-encoder heatmap (Table 3)", ["studies/text_encoders/table3_heatmap.png"]),
)


def _cell(v) -> str:
    if isinstance(v, float):
        return "n/a" if pd.isna(v) else f"{v:.3g}"
    return "" if v is None else str(v)


def markdown_table(df: pd.DataFrame, index: bool) -> str:
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for idx, row in df.iterrows():
        cells = ([str(idx)] if index else []) + [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_table(out: Path, rel: str, index_col) -> pd.DataFrame:
    path = out / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the study that writes it did not finish (rerun reproduce.py)")
    return pd.read_csv(path, index_col=index_col)


def write_summary(out: Path, steps: Sequence, runs: Sequence, args, started: float) -> Path:
    out = Path(out)
    demo = bool(getattr(args, "demo", False))
    md = ["# Reproduction: *Adapting Pretrained Vision-Language Foundational Models to Medical Imaging Domains*", ""]
    if demo:
        md += ["**Demo scale** (`reproduce.py --demo`): tiny models, phantom chest X-rays, a few training steps on a CPU. "
               "These tables show that every step runs and writes what the paper reports; the numbers say nothing about "
               "Stable Diffusion or MIMIC-CXR.", ""]
    git = provenance.git_commit()
    commit = (git.get("commit") or "unknown")[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    md += [f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {commit}. Commands, "
           "inputs, seeds and sampled ids: [provenance.json](provenance.json). Runbook: docs/reproduce.md.", ""]
    tables = {}
    for key, title, rel, index_col, note in TABLES:
        df = read_table(out, rel, index_col)
        if key == "utility":
            df = df[df["finding"] == "macro"][["source", "arm", "arm_name", "seed", "auroc", "ci_low", "ci_high", "steps"]]
        if key == "finding_correctness":
            keep = [c for c in ("strategy", "auroc", "ci_low", "ci_high", "accuracy", "mean_p_effusion_finding_prompt",
                                "mean_p_effusion_normal_prompt", "n_positive", "n_negative") if c in df.columns]
            df = df[keep]
        tables[key] = {"title": title, "file": rel, "rows": [str(i) for i in (df.index if index_col is not None else df.iloc[:, 0])],
                       "columns": [str(c) for c in df.columns]}
        if key == "table4" and any(r.beyond for r in runs):
            note += " Rows beyond the paper (later recipes on the paper's data, for comparison): " + ", ".join(
                f"{r.config} ({r.paper.removeprefix('Beyond the paper: ')})" for r in runs if r.beyond) + "."
        md += [f"## {title}", "", f"[{rel}]({rel})" + (f". {note}" if note else ""), "", markdown_table(df, index_col is not None), ""]
    figures = []
    for title, files in FIGURES:
        present = [f for f in files if (out / f).is_file()]
        if not present:
            raise FileNotFoundError(f"{out / files[0]}: missing; the study that writes it did not finish (rerun reproduce.py)")
        figures.append({"title": title, "files": present})
        md += [f"## {title}", ""] + [f"![{Path(f).stem}]({f})" for f in present] + [""]
    md += ["## Runs", "", "| run | paper | optimizer steps | last loss | samples |", "|---|---|---|---|---|"]
    for run in runs:
        folder = out / "runs" / run.config
        losses = folder / "losses.csv"
        last = pd.read_csv(losses).iloc[-1] if losses.is_file() and losses.stat().st_size > 20 else None
        grids = sorted((folder / "samples").glob("*.png"))
        md.append(f"| [{run.config}](runs/{run.config}) | {run.paper} | {int(last['step']) if last is not None else 0} | "
                  f"{_cell(float(last['loss'])) if last is not None else 'n/a'} | "
                  + (f"[{grids[-1].name}](runs/{run.config}/samples/{grids[-1].name})" if grids else "none") + " |")
    md += ["", "Every study folder also has its own `results.md` or `summary.md` with N, intervals and conventions.", ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps({"mode": "demo" if demo else "full", "tables": tables, "figures": figures},
                                                 indent=1) + "\n")
    write_provenance(out, steps, runs, args, started)
    return out / "summary.md"


def write_provenance(out: Path, steps: Sequence, runs: Sequence, args, started: float) -> Path:
    """provenance.json (core.provenance, ``what: reproduce``): the driver's command and inputs, every step's record, and
    where each run's and study's own provenance, resolved config, seeds and sampled ids are."""
    records = []
    for step in steps:
        marker = out / "steps" / f"{step.slug}.json"
        records.append(json.loads(marker.read_text()) if marker.is_file() else {"step": step.name, "state": "not done"})
    run_info = {}
    for run in runs:
        folder = RunFolder(out / "runs" / run.config)
        starts = folder.starts() if folder.provenance_file.is_file() else []
        run_info[run.config] = {"paper": run.paper, "resolved_config": f"runs/{run.config}/config.yaml",
                                "starts": f"runs/{run.config}/provenance.json", "data_ids": f"runs/{run.config}/data.json",
                                "seeds": starts[-1]["settings"] if starts else None}
    studies = {name: {"provenance": f"studies/{folder}/provenance.json"}
               for name, folder in (("vae", "vae"), ("text-encoders", "text_encoders"), ("generation", "generation"),
                                    ("memorization", "memorization"), ("generation-reports", "generation_reports"),
                                    ("utility", "utility"))}
    studies["vae"]["sampled_images"] = "studies/vae/per_image_metrics.csv (image_id)"
    studies["text-encoders"]["sampled_reports"] = "studies/text_encoders/sample.csv"
    inputs = {k: getattr(args, k, None) for k in ("mimic", "laion", "reports", "images", "sd", "cxr_bert", "xrv_cache_dir",
                                                   "inception_weights", "wandb_mode")}
    if inputs.get("images") and Path(inputs["images"]).is_file():
        inputs["image_ids"] = pd.read_csv(inputs["images"], dtype=str).to_dict("records")
    settings = {"mode": "demo" if getattr(args, "demo", False) else "full", "seconds_this_invocation": round(time.time() - started, 1),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    inputs.update(steps=records, runs=run_info, studies=studies)
    return provenance.write(out / "provenance.json", provenance.record("reproduce", settings, inputs, argv=getattr(args, "argv", None)))
