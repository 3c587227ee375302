"""What the studies evaluate: the base model and trained runs or exports, each as a plain generator (shared by the
generation and memorization studies, which import no other study)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from core.errors import UserError


class SourceError(UserError, ValueError):
    """A base model, run or export that cannot be loaded: the message names the option and the folder."""


def study_device(name: str):
    """``--device``: ``auto`` (CUDA when available, else CPU) or a torch device name; a bad name is one error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SourceError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SourceError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return device


@dataclass
class Strategy:
    name: str
    generator: object  # models.generator.Generator
    source: str
    prompts: list[str]  # the prompts as this strategy is asked (textual inversion: with its token)


def load_strategies(base: Optional[str], runs: Sequence[str], prompts: Sequence[str], ckpt: str = "last") -> list[Strategy]:
    """The base model (if any), then each run folder or export folder, as generators."""
    from lightning_modules.runs import RunLoadError, load_run_generator
    from models.exports import ExportError, load_export
    from models.generator import Generator
    from models.stable_diffusion import StableDiffusionLoadError, load_stable_diffusion

    out = []
    if base:
        try:
            out.append(Strategy("Stable Diffusion (base)", Generator(load_stable_diffusion({"pretrained": base})), base, list(prompts)))
        except StableDiffusionLoadError as err:
            raise SourceError(f"--base {base}: {err}") from None
    for run in runs:
        try:
            if (Path(run) / "config.yaml").is_file() or not Path(run).is_dir():
                generator, source = load_run_generator(run, ckpt)
            else:
                generator = load_export(run)
                source = run
        except (RunLoadError, ExportError) as err:
            raise SourceError(f"--runs {run}: {err}") from None
        out.append(Strategy(Path(run).name, generator, str(source), [generator.paper_prompt(p) for p in prompts]))
    names = [s.name for s in out]
    if len(set(names)) < len(names):
        raise SourceError(f"--runs: two strategies have the same name {names}; run folders need distinct names")
    return out
