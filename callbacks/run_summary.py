"""What a training run says about itself: one line of parameter counts at its start, and at its end where everything
is and which commands come next.

* :class:`ParameterSummary` replaces Lightning's model-summary table. Lightning 2.6's table has a FLOPs column that is
  counted only by a forward pass on the module's ``example_input_array``; a diffusion module has none (a step needs
  latents, timesteps and conditioning), so the column and "Total FLOPs" always read 0. We print the honest part, the
  parameter counts, in one line.
* :func:`end_of_run_summary` reads the run folder (:class:`core.run_folder.RunFolder` knows its layout) and never
  raises: whatever it cannot read is "n/a" with the reason, so a finished run never fails on its own summary.
"""
from __future__ import annotations

import csv
import shlex
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from core.run_folder import RunFolder
from datamodules.prompts import FINDING_PROMPTS

EFFUSION_PROMPT = FINDING_PROMPTS["Pleural Effusion"]
PHANTOM_BASE = "tiny-phantom"


class ParameterSummary(ModelSummary):
    """Lightning's model summary as one line: trained and frozen parameter counts and their size (no FLOPs column)."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)  # top-level modules only: the counts are the same at any depth

    def on_fit_start(self, trainer, pl_module) -> None:
        self._module_name = type(pl_module).__name__
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes, total_flops: int = 0, **kwargs) -> None:
        rank_zero_info(parameter_line(getattr(self, "_module_name", "model"), total_parameters, trainable_parameters, model_size))


def parameter_line(name: str, total: int, trainable: int, size_mb: float) -> str:
    count = get_human_readable_count
    return (f"{name}: {count(trainable).strip()} trained parameters, {count(total - trainable).strip()} frozen "
            f"({count(total).strip()} in all, {size_mb:.1f} MB)")


# ---------------------------------------------------------------------------------------------------- end of a run
LABEL = 13  # width of the item names


def _item(name: str, text: str) -> str:
    return f"  {name:<{LABEL}}{text}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _checkpoint_step(path: Path) -> Optional[int]:
    """``global_step`` of a Lightning checkpoint, memory-mapped (the tensors are not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def checkpoint_line(run: RunFolder, step: Optional[int]) -> str:
    path = run.last_checkpoint
    if not path.is_file():
        return _item("checkpoint", f"n/a (no {path})")
    try:
        step = _checkpoint_step(path) if step is None else step
    except Exception as err:  # an unreadable checkpoint is reported, not raised
        return _item("checkpoint", f"{path} (step n/a: {type(err).__name__})")
    return _item("checkpoint", f"{path} (step {step}, {_size(path)})")


def samples_line(run: RunFolder) -> str:
    grids = sorted(p.name for p in run.samples.glob("*.png")) if run.samples.is_dir() else []
    if not grids:
        return _item("samples", f"n/a (no grids in {run.samples}/: the run has no SampleGrid callback)")
    names = ", ".join(grids) if len(grids) <= 3 else f"{grids[0]} ... {grids[-1]}"
    return _item("samples", f"{run.samples}/ ({len(grids)} grid{'s' if len(grids) > 1 else ''}: {names})")


def last_fid_per_prompt(path: Path) -> list[dict]:
    """The last row of each prompt in a ``fid.csv`` written by :class:`callbacks.fid.FIDCallback`, in first-seen order."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    last: dict[str, dict] = {}
    for row in rows:
        last[row["prompt"]] = row
    return list(last.values())


def fid_lines(run: RunFolder) -> list[str]:
    path = run.path / "fid.csv"
    if not path.is_file():
        return [_item("FID", "n/a (no fid.csv: the run has no FIDCallback, or no validation with FID ran)")]
    try:
        rows = last_fid_per_prompt(path)
        if not rows:
            return [_item("FID", f"n/a ({path} holds no rows)")]
        features = ", ".join(dict.fromkeys(r.get("features") or "?" for r in rows))
        lines = [_item("FID", f"{path}: last value per prompt ({features} features; lower is closer to the real "
                              "images; compare runs at equal N only)")]
        width = max(len(r["prompt"]) for r in rows)
        for r in rows:
            lines.append(f"  {'':<{LABEL}}{float(r['fid']):>8.2f}  {r['prompt']:<{width}}  (step {r['step']}, "
                         f"N = {r['n_generated']} generated / {r['n_real']} real)")
        return lines
    except Exception as err:  # a truncated or hand-edited file is reported, not raised
        return [_item("FID", f"n/a ({path} unreadable: {type(err).__name__}: {err})")]


def losses_line(run: RunFolder) -> str:
    path = run.losses_file
    if not path.is_file():
        return _item("losses", f"n/a (no {path})")
    try:
        rows = [r for r in path.read_text().splitlines()[1:] if r]
        if not rows:
            return _item("losses", f"{path} (no rows)")
        _, step, loss = rows[-1].split(",")
        return _item("losses", f"{path} ({len(rows)} batches; last loss {float(loss):.4f} at step {step})")
    except Exception as err:
        return _item("losses", f"{path} (unreadable: {type(err).__name__})")


def wandb_line(run: RunFolder, mode: str, url: Optional[str] = None) -> str:
    """``mode``: ``disabled``, ``offline`` or ``online`` (``url``: the online run's page)."""
    if mode == "disabled":
        return _item("W&B", "disabled (--wandb_mode disabled)")
    if mode == "online":
        return _item("W&B", url or f"online (run id {_wandb_id(run) or 'n/a'})")
    run_id = _wandb_id(run)
    folder = run.path / "wandb"
    starts = sorted(folder.glob(f"offline-run-*-{run_id}")) if run_id and folder.is_dir() else []
    if not starts:
        return _item("W&B", f"offline: n/a (no offline run in {folder})")
    if len(starts) == 1:
        return _item("W&B", f"offline; upload with: wandb sync {shlex.quote(str(starts[0]))}")
    # a resumed run: one offline folder per start, all under the run's one W&B id
    return _item("W&B", f"offline ({len(starts)} starts); upload with: wandb sync {shlex.quote(str(folder))}/offline-run-*-{run_id}")


def _wandb_id(run: RunFolder) -> Optional[str]:
    path = run.wandb_id_file  # read only: RunFolder.wandb_id() would make one
    return path.read_text().strip() if path.is_file() else None


def _config(run: RunFolder) -> dict:
    try:
        return run.config() or {}
    except Exception:  # a folder without its config still gets the generic commands
        return {}


def _init_args(config: dict, key: str) -> dict:
    section = config.get(key) or {}
    return (section.get("init_args") or {}) if isinstance(section, dict) else {}


def next_commands(run: RunFolder, subject: Optional[str] = None) -> list[str]:
    """The commands that come next for this run: generate, export and the matching study, on this run's folder.

    ``subject``: what stands for "lung xray" in the paper's prompts (a textual-inversion run's token), so the
    ``generate.py`` prompt uses what the run learned."""
    config = _config(run)
    model, data = _init_args(config, "model"), _init_args(config, "data")
    base = (model.get("model") or {}).get("pretrained") if isinstance(model.get("model"), dict) else None
    data_class = str((config.get("data") or {}).get("class_path", "")) if isinstance(config.get("data"), dict) else ""
    folder, name = shlex.quote(str(run.path)), run.name
    prompt = EFFUSION_PROMPT.replace("lung xray", subject) if subject else EFFUSION_PROMPT
    commands = [f"python generate.py --run {folder} --prompt {shlex.quote(prompt)} --n 8 --out {shlex.quote(f'generated/{name}')}",
                f"python export.py {folder} {shlex.quote(f'exported/{name}')}"]
    out = shlex.quote(f"studies/generation_{name}")
    if base in (PHANTOM_BASE, "tiny-phantom-sana") and not subject:
        # did it learn to draw an effusion on request? (the demo's own study: the shipped phantom classifier)
        commands.append(f"python -m synthetic.finding_correctness_demo {folder}")
    elif base == PHANTOM_BASE:
        # a textual-inversion demo: the generation study asks the paper's prompts with the run's token (docs/generation-study.md)
        root = data.get("root") if data_class.startswith("synthetic.phantoms") and data.get("root") else "data/phantoms"
        commands.append(f"python evaluate.py generation --mimic_root {shlex.quote(str(root))} --split all --base {PHANTOM_BASE} "
                        f"--runs {folder} --n_per_prompt 8 --steps 10 --scheduler ddim --fid_features xrv "
                        f"--classifier {PHANTOM_BASE} --out {out}")
    else:
        root = data.get("root") if "mimic" in data_class.lower() and data.get("root") else "MIMIC"
        base_arg = f" --base {shlex.quote(str(base))}" if base else ""
        commands.append(f"python evaluate.py generation --mimic_root {shlex.quote(str(root))}{base_arg} --runs {folder} --out {out}")
    return commands


def end_of_run_summary(run: RunFolder, step: Optional[int] = None, wandb_mode: str = "offline", wandb_url: Optional[str] = None,
                       subject: Optional[str] = None) -> str:
    """What a finished run left and what comes next (about 12 lines; the first is ``run folder: <path>``).

    ``step``: the step the run ended at (the checkpoint's; read from ``last.ckpt`` when not given)."""
    lines = [f"run folder: {run.path}"]
    for part in (lambda: [checkpoint_line(run, step)], lambda: [samples_line(run)], lambda: fid_lines(run),
                 lambda: [losses_line(run)], lambda: [wandb_line(run, wandb_mode, wandb_url)]):
        try:
            lines += part()
        except Exception as err:  # never fail a finished run on its summary
            lines.append(_item("n/a", f"({type(err).__name__}: {err})"))
    try:
        commands = next_commands(run, subject)
    except Exception as err:
        commands = [f"n/a ({type(err).__name__}: {err})"]
    return "\n".join(lines + ["next:"] + [f"  {c}" for c in commands])
