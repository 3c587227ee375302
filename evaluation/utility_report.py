"""The utility study's outputs: differences between arms, ``utility.md``, ``utility.csv``, ``differences.csv``,
``utility.png``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from evaluation.utility_study import ARMS, init_saw_test, intervals, score


def differences(cfg, probabilities: dict, labels: np.ndarray) -> pd.DataFrame:
    """Per source and arm b, c, d: the AUROC difference to arm (a), averaged over seeds, with a paired bootstrap
    interval (each replicate resamples the test images once, for both arms and every seed)."""
    rows = []
    for source in dict.fromkeys(k[0] for k in probabilities):
        for arm in "bcd":
            def stat(idx: np.ndarray) -> list[float]:
                per_seed = [np.subtract(score(probabilities[(source, arm, s)], labels, cfg.findings, idx),
                                        score(probabilities[(source, "a", s)], labels, cfg.findings, idx)) for s in cfg.seeds]
                return list(np.nanmean(per_seed, axis=0))

            value = stat(np.arange(len(labels)))
            lo, hi = intervals(stat, len(labels), cfg.n_boot, cfg.seed)
            rows += [{"source": source, "arm": arm, "versus": "a", "finding": f, "difference": v, "ci_low": a, "ci_high": b,
                      "seeds": len(cfg.seeds)} for f, v, a, b in zip([*cfg.findings, "macro"], value, lo, hi)]
    return pd.DataFrame(rows)


def write_outputs(cfg, out: Path, table: pd.DataFrame, diffs: pd.DataFrame, real, resolution: int,
                  native: Optional[dict] = None, samplers: Optional[dict] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "utility.csv", index=False)
    diffs.to_csv(out / "differences.csv", index=False)
    plot(table, out / "utility.png")
    (out / "utility.md").write_text(markdown(cfg, table, diffs, real, resolution, native, samplers))


def steps_words(steps: int, samplers: Optional[dict], scheduler: Optional[str]) -> str:
    """``25 ddim steps``, or ``25 steps (samplers: Stable Diffusion (base) ddim, sana euler)`` when the sources differ."""
    from evaluation.sources import steps_text

    if samplers:
        return steps_text(steps, samplers)
    return f"{steps} {scheduler} steps" if scheduler else f"{steps} steps (each model's own sampler)"


def markdown(cfg, table: pd.DataFrame, diffs: pd.DataFrame, real, resolution: int, native: Optional[dict] = None,
             samplers: Optional[dict] = None) -> str:
    """``native``: each source's generation size in px (its synthetic images are resized from it to ``resolution``);
    ``samplers``: each source's sampler (default: ``cfg.scheduler`` for all)."""
    counts = ", ".join(f"{f}: {int(n)}" for f, n in zip(cfg.findings, real.train_labels.sum(0)))
    test_counts = ", ".join(f"{f}: {int(n)}" for f, n in zip(cfg.findings, real.test_labels.sum(0)))
    sizes = ", ".join(f"{n} px" for n in sorted(set((native or {}).values())))
    generated = f" (synthetic images generated at the models' native {sizes}, resized as the real ones)" if sizes else ""
    lines = ["# Utility of synthetic images", "",
             f"Real training set: {len(real.train_images)} frontal train-split images ({counts} positive; the rest No "
             f"Finding), mirrored one-to-one by each source's synthetic set ({cfg.prompt_source} prompts, "
             f"{steps_words(cfg.gen_steps, samplers, cfg.scheduler)}, guidance {cfg.guidance}). Test: {len(real.test_images)} real "
             f"test-split images ({test_counts} positive). Classifier: {cfg.classifier} architecture, {cfg.init}, "
             f"{resolution} px{generated}.", ""]
    if real.skipped:
        lines += [f"**Left out**: {len(real.skipped)} unreadable real image(s) (--on_bad_image skip; listed in "
                  "provenance.json).", ""]
    leak = init_saw_test(cfg)
    if leak:
        lines += [f"**Caution**: {leak} (run with --i_know_init_saw_mimic_test).", ""]
    lines += [f"**Budget**: arms a, b and c train {cfg.steps} steps of {cfg.batch_size} images at learning rate "
              f"{cfg.learning_rate} (the same number of images seen); arm d trains {cfg.steps} steps on synthetic images "
              f"then {cfg.steps} on real ones. Seeds: {cfg.seeds}. Intervals: 95% bootstrap over the test images "
              f"({cfg.n_boot} resamples).", "",
              "## Macro AUROC per arm (mean over seeds; per seed in utility.csv)", "",
              "| source | " + " | ".join(f"({a}) {n}" for a, n in ARMS.items()) + " |", "|---|" + "---:|" * len(ARMS)]
    macro = table[table.finding == "macro"]
    for source in dict.fromkeys(macro["source"]):
        cells = []
        for arm in ARMS:
            m = macro[(macro.source == source) & (macro.arm == arm)]
            cells.append(f"{m.auroc.mean():.3f} [{m.ci_low.mean():.3f}, {m.ci_high.mean():.3f}]")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += ["", "## Difference to (a) real only, averaged over seeds (paired bootstrap 95% interval)", "",
              "| source | arm | " + " | ".join([*cfg.findings, "macro"]) + " |", "|---|---|" + "---:|" * (len(cfg.findings) + 1)]
    for (source, arm), g in diffs.groupby(["source", "arm"], sort=False):
        cells = [f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in g.itertuples()]
        lines.append(f"| {source} | ({arm}) {ARMS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "The per-finding AUROCs with intervals, per arm and seed, are in utility.csv; the plot is utility.png."]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    macro = table[table.finding == "macro"]
    sources = list(dict.fromkeys(macro["source"]))
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(sources), 4.2), dpi=120)
    width = 0.8 / len(ARMS)
    for k, (arm, name) in enumerate(ARMS.items()):
        for i, source in enumerate(sources):
            m = macro[(macro.source == source) & (macro.arm == arm)]
            x = i + (k - (len(ARMS) - 1) / 2) * width
            ax.bar(x, m.auroc.mean(), width, color=f"C{k}", label=f"({arm}) {name}" if i == 0 else None)
            ax.scatter([x] * len(m), m.auroc, color="black", s=8, zorder=3)  # each seed
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(sources)), sources, fontsize=8)
    ax.set_ylabel("macro AUROC on real test images")
    ax.set_ylim(0, 1)
    ax.set_title("classifier trained on each arm (bars: mean over seeds; dots: seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
