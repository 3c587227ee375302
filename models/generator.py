"""What generates: a Stable Diffusion plus the way prompts become U-Net conditioning.

A :class:`Generator` is what :func:`models.exports.load_export` returns for any export, what a trained run gives
(``lightning_modules.runs.load_run(...).generator()``), and what ``generate.py``, the studies and the callbacks sample
from. ``generate(prompts, seeds=...)`` returns images ``[N, 3, H, W]`` in [0, 1]; image ``i`` uses seed ``seed + i``
and does not depend on the batch it is generated in.

A *conditioning* turns prompts into the U-Net's ``[B, 77, D]`` input and gives the unconditional (negative-prompt)
input of classifier-free guidance. :class:`ClipConditioning` is SD's own (CLIP's ``last_hidden_state``), optionally
rewriting each prompt first (textual inversion expands multi-vector tokens); the textual projection has its own
(``models.projection.ProjectedConditioning``). Gradients flow where something trains: only :meth:`Generator.generate`
turns them off.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch

# torch.Generator.manual_seed takes 0 .. 2**64-1 (a negative seed wraps around onto a positive one: refused here)
SEED_MAX = 2**64 - 1


def seed_value(text: str) -> int:
    """A ``--seed`` argument (argparse ``type=``): an integer from 0 to 2**64-1, the range ``torch.Generator.manual_seed``
    takes."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; a seed is an integer from 0 to 2**64-1") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range; a seed is an integer from 0 to 2**64-1 ({SEED_MAX})")
    return value


class Conditioning(Protocol):
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """U-Net conditioning ``[B, T, D]`` of the prompts."""

    def negative(self, prompts: Sequence[str]) -> torch.Tensor:
        """The unconditional input of classifier-free guidance for (usually empty) negative prompts."""

    def to(self, device) -> None:
        """Move the conditioning's own networks (those that are not part of the Stable Diffusion)."""

    def window(self, prompts: Sequence[str]) -> dict:
        """How long prompts are handled: ``{"encoder", "window" (tokens), "too_long" (count), "handling"}``."""


class ClipConditioning:
    """SD's conditioning: CLIP's ``last_hidden_state`` after the final layer norm, of each (rewritten) prompt."""

    def __init__(self, sd, rewrite: Optional[Callable[[str], str]] = None):
        self.sd = sd
        self.rewrite = rewrite

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [self.rewrite(p) for p in prompts] if self.rewrite else list(prompts)
        return self.sd.clip_states(prompts)

    def negative(self, prompts: Sequence[str]) -> torch.Tensor:
        return self(prompts)

    def to(self, device) -> None:
        """Nothing of its own: CLIP is part of the Stable Diffusion."""

    def window(self, prompts: Sequence[str]) -> dict:
        prompts = [self.rewrite(p) for p in prompts] if self.rewrite else list(prompts)
        chunks = getattr(self.sd, "clip_chunks", 1)
        handling = (f"truncated to CLIP's {self.sd.max_token_length} tokens" if chunks == 1 else
                    f"chunked: {chunks} CLIP windows of 75 tokens, truncated after {self.sd.text_window}")
        return {"encoder": "CLIP", "window": self.sd.text_window, "too_long": self.sd.count_too_long(prompts), "handling": handling}


class Generator:
    """Stable Diffusion ``sd`` with a ``conditioning``.

    Args:
        sd: the :class:`~models.stable_diffusion.StableDiffusion` parts.
        conditioning: how prompts become U-Net conditioning (default: :class:`ClipConditioning`).
        tokens: placeholder tokens the prompts should contain (textual inversion), for warnings and defaults.
        subject: what stands for "lung xray" in the paper's prompts (textual inversion: its token).
        sample_scheduler: the default sampler (ddim, pndm, euler, dpm; default: the family's).
        info: where it came from: ``kind``, ``strategy``, ``base_model``, ... (recorded by generate.py and the studies).
    """

    def __init__(self, sd, conditioning: Optional[Conditioning] = None, tokens: Sequence[str] = (), subject: Optional[str] = None,
                 sample_scheduler: Optional[str] = None, info: Optional[dict] = None):
        self.sd = sd
        self.conditioning = conditioning if conditioning is not None else sd.conditioning()
        self.tokens = list(tokens)
        self.subject = subject
        self.sample_scheduler = sample_scheduler or sd.default_sampler
        self.info = {"base_model": dict(vars(sd.spec)), **(info or {})}

    @property
    def device(self) -> torch.device:
        return next(self.sd.denoiser.parameters()).device

    def to(self, device) -> "Generator":
        self.sd.to(device)
        self.conditioning.to(device)
        return self

    def prompt_window(self, prompts: Sequence[str]) -> dict:
        """How this model handles long prompts, and how many of ``prompts`` exceed its window (see Conditioning.window)."""
        return self.conditioning.window(prompts)

    @property
    def native_size(self) -> int:
        return int(self.sd.native_size)

    def paper_prompt(self, prompt: str) -> str:
        """A paper prompt as this model is asked it: "lung xray" replaced by the subject token, if any."""
        return prompt.replace("lung xray", self.subject) if self.subject else prompt

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seed: int = 0, steps: int = 25, guidance: float = 7.5, negative_prompt: str = "",
                 scheduler: Optional[str] = None, seeds: Optional[Sequence[int]] = None, height: Optional[int] = None,
                 width: Optional[int] = None, batch_size: int = 8, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] (CPU, float32); image ``i`` uses seed ``seed + i`` (or ``seeds[i]``).

        ``dtype``: run the networks under autocast to this dtype (the frozen parts' dtype under mixed precision).
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        device = self.device
        dtype = dtype or torch.float32
        out = []
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                cond = self.conditioning(chunk)
                uncond = self.conditioning.negative([negative_prompt] * len(chunk))
                out.append(self.sd.sample(cond, uncond, seeds[start : start + batch_size], steps=steps, guidance=guidance,
                                          height=height, width=width, scheduler=scheduler or self.sample_scheduler))
        return torch.cat(out)
