"""What the studies evaluate: the base model and trained runs or exports, each as a plain generator (shared by the
generation, memorization and utility studies, which import no other study); a fingerprint of a generator's weights;
the argument types the studies share (numbers checked at parse, before any work)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

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


# numpy's samplers (DataFrame.sample, RandomState) and Lightning's seed_everything take 32-bit seeds; Lightning replaces
# a larger one with a random seed, silently
STUDY_SEED_MAX = 2**32 - 1


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type=``: a finite ``kind`` (int or float) of at least ``minimum``, else a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: expected {'an integer' if kind is int else 'a number'} of at "
                                             f"least {minimum}")
        return value

    return parse


def above(minimum: float) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number greater than ``minimum`` (a learning rate: above 0)."""
    def parse(text: str) -> float:
        return number_in(text, lambda v: v > minimum, f"a number above {minimum}")

    return parse


def fraction(text: str) -> float:
    """An argparse ``type=``: a number strictly between 0 and 1 (a quantile)."""
    return number_in(text, lambda v: 0 < v < 1, "a number between 0 and 1")


def number_in(text: str, ok: Callable[[float], bool], expected: str) -> float:
    """``text`` as a finite float for which ``ok`` holds, else a usage error saying what is ``expected``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
    return value


def study_seed(text: str) -> int:
    """An argparse ``type=`` for the studies' seeds: an integer from 0 to 2**32-1 (:data:`STUDY_SEED_MAX`)."""
    wrong = argparse.ArgumentTypeError(f"{text}: a seed is an integer from 0 to 2**32-1 ({STUDY_SEED_MAX})")
    try:
        value = int(text)
    except ValueError:
        raise wrong from None
    if not 0 <= value <= STUDY_SEED_MAX:
        raise wrong
    return value


def generator_fingerprint(generator) -> str:
    """:func:`models.stable_diffusion.weights_fingerprint` of every tensor a generator samples with: the Stable Diffusion
    parts (a run's trained or EMA weights, LoRA, textual inversion's rows) and its conditioning's own modules (the
    projection and domain encoder). Cached outputs record it, so a run retrained under the same name is noticed."""
    from torch import nn

    from models.stable_diffusion import weights_fingerprint

    tensors = [(f"sd.{k}", v) for k, v in generator.sd.state_dict().items()]
    for name, part in sorted(vars(generator.conditioning).items()):
        if isinstance(part, nn.Module) and part is not generator.sd:
            tensors += [(f"conditioning.{name}.{k}", v) for k, v in part.state_dict().items()]
    return weights_fingerprint(tensors)


@dataclass
class Strategy:
    name: str
    generator: object  # models.generator.Generator
    source: str
    prompts: list[str]  # the prompts as this strategy is asked (textual inversion: with its token)
    sampler: Optional[str] = None  # the sampler the study uses for it (:func:`choose_samplers`)


STABLE_DIFFUSION = "stable-diffusion"


def study_sampler(generator, scheduler: Optional[str], sd_default: Optional[str] = None) -> str:
    """The sampler a study uses for one model: ``scheduler`` when one is asked (``--scheduler``); else, for a Stable
    Diffusion model, the study's own ``sd_default`` where it has one (the sampler it used before other families
    existed, so its Stable Diffusion results stay what they were); else the model's own
    (``generator.sample_scheduler``: the run's ``sample_scheduler`` or its base's ``default_sampler``; Sana: euler, or
    dpm for a folder that ships a flow DPM-Solver)."""
    if scheduler:
        return scheduler
    if sd_default and generator.sd.family == STABLE_DIFFUSION:
        return sd_default
    return generator.sample_scheduler


def check_sampler(name: str, generator, where: str, scheduler: Optional[str]) -> None:
    """Refuse, in one line naming the model and its family, a sampler the model's base cannot sample with (before any
    image is generated): Sana samples with flow-matching schedulers only (euler, dpm)."""
    try:
        generator.sd.inference_scheduler(name)
    except (UserError, ValueError) as err:
        asked = f"--scheduler {name}" if scheduler else f"sampler {name}"
        raise SourceError(f"{asked}: {where} is a {generator.sd.family} model and cannot sample with it: "
                          f"{str(err).splitlines()[0]}") from None


def choose_samplers(strategies: Sequence[Strategy], scheduler: Optional[str], sd_default: Optional[str] = None) -> dict:
    """Set each strategy's :attr:`Strategy.sampler` (:func:`study_sampler`), each checked (:func:`check_sampler`);
    returns ``{strategy name: sampler}`` for the records."""
    for strategy in strategies:
        strategy.sampler = study_sampler(strategy.generator, scheduler, sd_default)
        check_sampler(strategy.sampler, strategy.generator, f"{strategy.name} ({strategy.source})", scheduler)
    return {s.name: s.sampler for s in strategies}


def steps_text(steps: int, samplers: dict) -> str:
    """``50 pndm steps`` when every model used one sampler, else ``50 steps (samplers: Stable Diffusion (base) pndm,
    sana_run euler)`` (for the reports)."""
    names = set(samplers.values())
    if len(names) == 1:
        return f"{steps} {next(iter(names))} steps"
    return f"{steps} steps (samplers: " + ", ".join(f"{model} {sampler}" for model, sampler in samplers.items()) + ")"


def load_strategies(base: Optional[str], runs: Sequence[str], prompts: Sequence[str], ckpt: str = "last") -> list[Strategy]:
    """The base model (if any), then each run folder or export folder, as generators."""
    from lightning_modules.runs import RunLoadError, load_run_generator
    from models.exports import ExportError, load_export
    from models.generator import Generator
    from models.stable_diffusion import StableDiffusionLoadError, load_stable_diffusion

    out = []
    if base:
        try:
            sd = load_stable_diffusion({"pretrained": base})
            # "Stable Diffusion (base)", "Sana (base)": the family's name
            out.append(Strategy(f"{sd.family.replace('-', ' ').title()} (base)", Generator(sd), base, list(prompts)))
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
