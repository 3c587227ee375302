"""Report-conditioned evaluation: ``python evaluate.py generation --prompts reports``.

Does a model draw every finding a report names, and only those? RoentGen-v2's protocol, on the suite's data:

1. **Prompts.** Impressions of test-split reports, drawn class-balanced: ``--n_reports_per_class`` reports positive
   for each class in ``--report_classes`` (default: every finding the classifier knows, plus "No Finding"), with a
   seed, rarest class first and without replacement (:func:`datamodules.report_corpus.sample_per_class`). Only the
   IMPRESSION section is used; reports without one are skipped.
2. **Images.** Every strategy draws ``--images_per_report`` images per impression (seeds ``seed + i``).
3. **Scoring.** The classifier (torchxrayvision's DenseNet, 18 labels; the phantom classifier for the demo) scores
   every image on every finding it knows. Per finding, the AUROC of "classifier score" against "the report's CheXpert
   label" (positive 1.0 against negative 0.0 or blank; uncertain -1.0 left out), with Newcombe's 95% score interval; macro:
   their mean, with a percentile bootstrap interval from resampling the images jointly.
4. **Confusion view.** Mean score of each finding among the images drawn for each class: what appears without being
   asked for shows off the diagonal.
5. **Long prompts.** Impressions longer than a model's text window are handled as the model states
   (:meth:`models.generator.Generator.prompt_window`: CLIP truncates to 77 tokens; a projection's domain encoder to its
   own limit); the count is reported per strategy.

Outputs in ``--out``: ``report_auroc.csv`` (strategy × finding, and macro), ``report_confusion.csv`` and
``report_confusion.png``, ``report_prompts.csv`` (study ids and classes: no report text), ``report_results.md``,
``provenance.json``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from core import provenance
from core.errors import UserError
from datamodules.mimic_cxr import CHEXPERT_CLASSES, SPLIT_CSV, MIMICDataError, read_csv_checked
from datamodules.report_corpus import ReportCorpusError, load_corpus
from datamodules.reports import scrub_deid_markers
from evaluation.sources import Strategy, choose_samplers, load_strategies, steps_text, study_device
from metrics.classifiers import CHEXPERT_TO_XRV, classifier_targets, finding_probabilities, load_classifier
from metrics.scores import auroc, auroc_with_ci, bootstrap_ci


class ReportEvaluationError(UserError, ValueError):
    """Bad input to the report-conditioned evaluation: the message names the option, folder or class."""


def scorable_findings(classifier) -> list[str]:
    """The CheXpert classes the classifier has an output for, in CheXpert order."""
    targets = classifier_targets(classifier)
    return [c for c in CHEXPERT_CLASSES if CHEXPERT_TO_XRV.get(c, c) in targets]


def check_classes(classes: Sequence[str], scorable: Sequence[str], classifier_name: str) -> list[str]:
    unknown = [c for c in classes if c not in CHEXPERT_CLASSES]
    if unknown:
        raise ReportEvaluationError(f"--report_classes: {unknown} are not CheXpert classes; expected some of "
                                    f"{list(CHEXPERT_CLASSES)}")
    unscored = [c for c in classes if c not in scorable and c != "No Finding"]
    if unscored:
        raise ReportEvaluationError(f"--report_classes: the classifier {classifier_name} does not know {unscored}; it "
                                    f"scores {list(scorable)} (and 'No Finding' reports serve as negatives)")
    return list(classes)


def split_impressions(mimic_root: str, reports_root: str, labels_csv: str, split: str, deid_markers: str = "remove") -> pd.DataFrame:
    """Impressions of the reports of ``split`` studies, one row per study with its 14 CheXpert labels; with
    ``deid_markers="remove"`` MIMIC-CXR's ``___`` markers are dropped from the text (``deid_removed``: how many; an
    impression that is nothing but markers is left out), as the training datamodule does."""
    try:
        splits = read_csv_checked(Path(mimic_root), SPLIT_CSV)
    except MIMICDataError as err:
        raise ReportEvaluationError(str(err)) from None
    studies = set(splits["study_id"]) if split == "all" else set(splits.loc[splits["split"] == split, "study_id"])
    corpus = load_corpus(reports_root, labels_csv, uncertain="negative", progress=True)
    table = corpus.table
    table = table[table["study_id"].isin(studies) & (table["section"] == "impression")].reset_index(drop=True)
    if deid_markers == "remove":
        scrubbed = [scrub_deid_markers(text) for text in table["text"]]
        table = table.assign(text=[s for s, _ in scrubbed], deid_removed=[n for _, n in scrubbed])
        table = table[table["text"].str.len() > 0].reset_index(drop=True)
    else:
        table = table.assign(deid_removed=0)
    return table


def draw_reports(table: pd.DataFrame, classes: Sequence[str], n_per_class: int, seed: int, where: str) -> pd.DataFrame:
    """``n_per_class`` impressions positive for each class, rarest class first, without replacement; ``class`` column."""
    positive = {c: table[c].to_numpy() == 1.0 for c in classes}
    short = {c: int(p.sum()) for c, p in positive.items() if p.sum() < n_per_class}
    if short:
        listing = ", ".join(f"{c!r}: {n}" for c, n in short.items())
        raise ReportEvaluationError(f"{where}: too few impressions positive for {listing} (--n_reports_per_class "
                                    f"{n_per_class}); lower --n_reports_per_class or leave those classes out of "
                                    "--report_classes")
    rng, taken, picks = np.random.default_rng(seed), np.zeros(len(table), dtype=bool), []
    for c in sorted(classes, key=lambda c: (positive[c].sum(), CHEXPERT_CLASSES.index(c))):
        pool = np.flatnonzero(positive[c] & ~taken)
        if len(pool) < n_per_class:
            raise ReportEvaluationError(f"{where}: after drawing the rarer classes, {len(pool)} impressions positive for "
                                        f"{c!r} are left (--n_reports_per_class {n_per_class}); lower it")
        chosen = rng.choice(pool, size=n_per_class, replace=False)
        taken[chosen] = True
        picks.append(table.iloc[chosen].assign(**{"class": c}))
    order = {c: i for i, c in enumerate(classes)}
    drawn = pd.concat(picks, ignore_index=True)
    return drawn.sort_values(["class", "study_id"], key=lambda s: s.map(order) if s.name == "class" else s).reset_index(drop=True)


def generate_for_reports(strategy: Strategy, prompts: Sequence[str], per_report: int, cfg, resolution: int) -> torch.Tensor:
    """``per_report`` images per prompt, image ``i`` of a prompt with seed ``cfg.seed + i``: ``[len * per_report, 3, H, W]``."""
    from tqdm.auto import tqdm

    asked = [p for p in prompts for _ in range(per_report)]
    seeds = [cfg.seed + i for _ in prompts for i in range(per_report)]
    out = []
    for s in tqdm(range(0, len(asked), cfg.batch_size), desc=f"{strategy.name}: reports", disable=len(asked) <= cfg.batch_size):
        out.append(strategy.generator.generate(asked[s:s + cfg.batch_size], seeds=seeds[s:s + cfg.batch_size], steps=cfg.steps,
                                               guidance=cfg.guidance, scheduler=strategy.sampler, height=resolution,
                                               width=resolution, batch_size=cfg.batch_size).cpu())
    return torch.cat(out)


def score_strategy(name: str, scores: dict, labels: pd.DataFrame, findings: Sequence[str], n_boot: int, seed: int) -> list[dict]:
    """Per finding the AUROC of score against the report's label (uncertain left out), and the macro AUROC."""
    rows = []
    for f in findings:
        y = labels[f].to_numpy()
        keep = (y == 1.0) | (y == 0.0) | np.isnan(y)
        pos, neg = scores[f][keep & (y == 1.0)], scores[f][keep & (y != 1.0)]
        r = (auroc_with_ci(pos, neg, n_boot, seed) if min(len(pos), len(neg)) >= 2 else
             {"auroc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")})  # too few to score
        rows.append({"strategy": name, "finding": f, "auroc": r["auroc"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                     "n_positive": len(pos), "n_negative": len(neg), "n_uncertain_left_out": int((~keep).sum())})

    def macro(idx: np.ndarray) -> float:
        values = []
        for f in findings:
            y, s = labels[f].to_numpy()[idx], scores[f][idx]
            known = y != -1.0
            values.append(auroc((y[known] == 1.0).astype(int), s[known]))
        return float(np.nanmean(values)) if not all(np.isnan(values)) else float("nan")

    n = len(labels)
    lo, hi = bootstrap_ci(macro, n, n_boot, seed) if n_boot > 0 else (float("nan"), float("nan"))
    rows.append({"strategy": name, "finding": "macro", "auroc": macro(np.arange(n)), "ci_low": lo, "ci_high": hi,
                 "n_positive": int(sum(r["n_positive"] for r in rows)), "n_negative": int(sum(r["n_negative"] for r in rows)),
                 "n_uncertain_left_out": int(sum(r["n_uncertain_left_out"] for r in rows))})
    return rows


def run_report_study(cfg, log: Callable[[str], None] = print) -> Path:
    """The report-conditioned evaluation of the base model and every run (``cfg``: the generation study's config)."""
    started, out = time.time(), Path(cfg.out)
    device = study_device(cfg.device)
    try:
        classifier = load_classifier(cfg.classifier, cfg.xrv_cache_dir).to(device)
    except FileNotFoundError as err:
        raise ReportEvaluationError(str(err)) from None
    scorable = scorable_findings(classifier)
    classes = check_classes(cfg.report_classes or [*scorable, "No Finding"], scorable, cfg.classifier)
    if cfg.n_reports_per_class < 1 or cfg.images_per_report < 1:
        raise ReportEvaluationError(f"--n_reports_per_class {cfg.n_reports_per_class} and --images_per_report "
                                    f"{cfg.images_per_report}: each must be at least 1")
    reports_root = cfg.reports_root or cfg.mimic_root
    labels_csv = cfg.report_labels or str(Path(cfg.mimic_root) / "mimic-cxr-2.0.0-chexpert.csv.gz")
    try:
        impressions = split_impressions(cfg.mimic_root, reports_root, labels_csv, cfg.split, cfg.deid_markers)
        drawn = draw_reports(impressions, classes, cfg.n_reports_per_class, cfg.seed,
                             f"{reports_root} ({cfg.split!r} split, IMPRESSION sections)")
    except ReportCorpusError as err:
        raise ReportEvaluationError(str(err)) from None
    log(f"{len(drawn)} impressions ({cfg.n_reports_per_class} per class: {', '.join(classes)}), "
        f"{cfg.images_per_report} image(s) each; scored on {scorable}")
    strategies = load_strategies(cfg.base, cfg.runs, list(drawn["text"]))
    # the generation study's rule: --scheduler for every model, else Stable Diffusion's pndm and each other family's own
    samplers = choose_samplers(strategies, cfg.scheduler, "pndm")
    resolution = cfg.resolution or strategies[0].generator.native_size
    labels = drawn.loc[drawn.index.repeat(cfg.images_per_report)].reset_index(drop=True)
    rows, confusion, windows = [], [], []
    for strategy in strategies:
        strategy.generator.to(device)
        windows.append({"strategy": strategy.name, **strategy.generator.prompt_window(strategy.prompts),
                        "sampler": strategy.sampler})
        images = generate_for_reports(strategy, strategy.prompts, cfg.images_per_report, cfg, resolution)
        scores = {f: finding_probabilities(classifier, images.to(device), f).numpy() for f in scorable}
        strategy.generator.to("cpu")
        rows += score_strategy(strategy.name, scores, labels, scorable, cfg.n_boot, cfg.seed)
        for c in classes:
            mask = (labels["class"] == c).to_numpy()
            confusion.append({"strategy": strategy.name, "asked": c, **{f: float(scores[f][mask].mean()) for f in scorable}})
    write_report_outputs(cfg, out, drawn, pd.DataFrame(rows), pd.DataFrame(confusion), pd.DataFrame(windows), scorable,
                         classes, resolution, samplers)
    provenance.write(out / "provenance.json", provenance.record(
        "study/generation-reports", {k: v for k, v in asdict(cfg).items()},
        {"strategies": [{"name": s.name, "source": s.source, "sampler": s.sampler, "guidance": cfg.guidance,
                         "family": s.generator.sd.family} for s in strategies], "study_ids": drawn["study_id"].tolist(),
         "deid_markers_removed": int(drawn["deid_removed"].sum()),
         "seconds": round(time.time() - started, 1)}, packages=("torch", "diffusers", "transformers", "torchxrayvision")))
    log(f"wrote {out / 'report_results.md'}")
    return out


def write_report_outputs(cfg, out: Path, drawn: pd.DataFrame, table: pd.DataFrame, confusion: pd.DataFrame,
                         windows: pd.DataFrame, scorable: Sequence[str], classes: Sequence[str], resolution: int,
                         samplers: Optional[dict] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    drawn[["study_id", "subject_id", "class"]].to_csv(out / "report_prompts.csv", index=False)  # ids only, no report text
    table.to_csv(out / "report_auroc.csv", index=False)
    confusion.to_csv(out / "report_confusion.csv", index=False)
    confusion_figure(confusion, scorable, classes, out / "report_confusion.png")
    names = list(dict.fromkeys(table["strategy"]))
    findings = [*scorable, "macro"]
    lines = ["# Report-conditioned evaluation", "",
             f"{len(drawn)} test-split impressions ({cfg.n_reports_per_class} per class: {', '.join(classes)}; seed "
             f"{cfg.seed}), {cfg.images_per_report} image(s) each at {resolution} px, "
             f"{steps_text(cfg.steps, samplers) if samplers else f'{cfg.steps} {cfg.scheduler} steps'}, "
             f"guidance {cfg.guidance}. Classifier: {cfg.classifier}. Per finding: AUROC of the classifier's score "
             "against the report's CheXpert label (uncertain labels left out), Newcombe's 95% score interval; macro: "
             f"95% percentile bootstrap over the images ({cfg.n_boot} resamples); 0.5 is chance.", "",
             "| strategy | " + " | ".join(findings) + " |", "|---|" + "---:|" * len(findings)]
    for name in names:
        cells = []
        for f in findings:
            r = table[(table.strategy == name) & (table.finding == f)].iloc[0]
            cells.append("n/a" if pd.isna(r.auroc) else f"{r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    removed = int(drawn["deid_removed"].sum()) if "deid_removed" in drawn else 0
    lines += ["", (f"De-identification markers (`___`): {removed} removed from {int((drawn['deid_removed'] > 0).sum())} of the "
                   f"{len(drawn)} impressions (--deid_markers remove), as the training datamodule does."
                   if cfg.deid_markers == "remove" else "De-identification markers (`___`): kept (--deid_markers keep).")]
    lines += ["", "## Long prompts", "", "| strategy | text encoder | window (tokens) | impressions over it | handling |",
              "|---|---|---:|---:|---|"]
    lines += [f"| {w.strategy} | {w.encoder} | {w.window} | {w.too_long} of {len(drawn)} | {w.handling} |"
              for w in windows.itertuples()]
    lines += ["", "## Confusion view: mean score of each finding by the class the report was drawn for", "",
              "Off the diagonal: findings that appear without being asked for ([report_confusion.png](report_confusion.png)).",
              "", "| strategy | drawn for | " + " | ".join(scorable) + " |", "|---|---|" + "---:|" * len(scorable)]
    lines += [f"| {r['strategy']} | {r['asked']} | " + " | ".join(f"{r[f]:.3f}" for f in scorable) + " |"
              for _, r in confusion.iterrows()]
    lines += ["", "`report_prompts.csv` lists the study ids drawn (no report text: the impressions are MIMIC-CXR data)."]
    (out / "report_results.md").write_text("\n".join(lines) + "\n")


def confusion_figure(confusion: pd.DataFrame, scorable: Sequence[str], classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(confusion["strategy"]))
    width, height = 1.0 + 0.9 * len(scorable), 1.6 + 0.7 * len(classes)
    fig, axes = plt.subplots(1, len(names), figsize=(1.4 + width * len(names), height), squeeze=False)
    for ax, name in zip(axes[0], names):
        m = confusion[confusion.strategy == name].set_index("asked").loc[list(classes), list(scorable)].to_numpy()
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(scorable)), scorable, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes if ax is axes[0][0] else [""] * len(classes), fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle("mean classifier score (columns) for images of reports drawn for each class (rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
