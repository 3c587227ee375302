"""The textual projection's plain parts: the MLP, token alignment, and the conditioning it gives the U-Net.

A frozen domain text encoder (:mod:`models.domain_encoder`) replaces SD's CLIP, and a projection maps its output into
CLIP's space (paper §2.5):

* ``document`` — one vector per text: the domain encoder's document vector against CLIP's pooled vector
  (``final_layer_norm`` state at the EOS position, docs/formats.md §6). **As conditioning**, the projected vector
  ``v`` becomes the sequence ``[bos, v, v, ..., v]`` (77 rows): row 0 is CLIP's state of the start token (the same for
  every prompt, as CLIP's attention is causal) and every other row is ``v``. In SD's own conditioning every row after a
  prompt's last word holds an EOS-like summary of the prompt; here the summary is all there is.
* ``token`` — the domain token states against CLIP's ``[77, D]`` conditioning sequence, position by position. The two
  tokenizers split text differently, so the sequences are aligned by position only (:func:`align_token_states`): the
  domain states are truncated to 77 rows, and a text shorter than 77 tokens is padded with its last real state (the
  ``[SEP]`` row), as CLIP pads with EOS states. The MLP acts on each position independently.

Classifier-free guidance uses CLIP's embedding of the empty (or negative) prompt as the unconditional input, because
that is what SD was trained with; the domain encoder never sees it.

On a base whose conditioning carries an attention mask (Sana: Gemma-2's 300-token sequence), only ``token`` applies
(Gemma-2 has no pooled vector): the domain states are aligned to the family's window as above, the denoiser's mask
marks the positions of the text's own domain states, and the MSE counts the positions real in both sequences (the
text encoder's padding states are not conditioning the base ever attended to).

Saved as ``projection.safetensors`` (the MLP, float32) and ``projection.json`` (what it connects):
:func:`save_projection` / :func:`load_projection`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from core.errors import UserError
from models.domain_encoder import DomainEncoder, DomainEncoderSpec

LEVELS = ("document", "token")
PROJECTIONS = ("mlp", "none")
CONFIG_FILE = "projection.json"
WEIGHTS_FILE = "projection.safetensors"


class ProjectionConfigError(UserError, ValueError):
    """The projection's configuration does not fit the encoders it connects."""


class ProjectionMLP(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Linear`` (the paper's ``Linear∘ReLU∘LayerNorm∘Linear``) for ``depth=2``.

    Each extra unit of ``depth`` adds one hidden ``Linear -> LayerNorm -> ReLU`` block. Acts on the last
    dimension, so it maps document vectors ``[B, in]`` and token states ``[B, T, in]`` alike.
    """

    def __init__(self, in_features: int, out_features: int, hidden_features: Optional[int] = None, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ProjectionConfigError(f"depth: {depth}; expected 1 (a single Linear) or more")
        hidden = int(hidden_features or out_features)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def align_token_states(states: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length, H]``: the first ``length`` real states of each text, padded with its last real state."""
    real = mask.sum(dim=1).clamp(min=1).long()  # [B]
    positions = torch.arange(length, device=states.device)[None, :]  # [1, L]
    index = torch.minimum(positions, (real - 1)[:, None]).clamp(max=states.shape[1] - 1)  # [B, L]
    return torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))


def build_projection(domain: DomainEncoder, clip_width: int, level: str, kind: str = "mlp",
                     hidden_size: Optional[int] = None, depth: int = 2) -> nn.Module:
    """The trainable MLP (``kind: mlp``) or the identity of the paper's "No Projection" baseline (``kind: none``)."""
    if level not in LEVELS:
        raise ProjectionConfigError(f"level: {level!r}; expected one of {', '.join(LEVELS)}")
    if kind not in PROJECTIONS:
        raise ProjectionConfigError(f"projection: {kind!r}; expected one of {', '.join(PROJECTIONS)}")
    in_width = domain.output_size if level == "document" else domain.hidden_size
    if kind == "none":
        if in_width != clip_width:
            what = f"document vector, {domain.spec.extraction}" if level == "document" else "token states"
            raise ProjectionConfigError(
                f"projection: none feeds the domain encoder {domain.spec.pretrained!r} ({what}) to the U-Net as they are, "
                f"but they are {in_width} wide and the U-Net expects CLIP's width, {clip_width}; use projection: mlp"
            )
        return nn.Identity()
    return ProjectionMLP(in_width, clip_width, hidden_size, depth)


class ProjectedConditioning:
    """U-Net conditioning from a domain encoder through a projection (module docstring). Plain object: the domain
    encoder and the projection stay attributes of whoever owns them (a LightningModule registers them itself)."""

    def __init__(self, sd, domain: DomainEncoder, projection: nn.Module, level: str):
        self.sd, self.domain, self.projection, self.level = sd, domain, projection, level
        # a family whose conditioning carries an attention mask (Sana's Gemma-2): token level only, masked (see masked_mse)
        self.masked = sd.family != "stable-diffusion"
        if getattr(sd, "clip_chunks", 1) > 1:
            raise ProjectionConfigError("model.long_prompts: chunked: the projection is trained against CLIP's own 77-token "
                                        "conditioning (its pooled vector or its 77 states); train it with long_prompts: truncate")
        if self.masked and level == "document":
            raise ProjectionConfigError(
                f"level: document maps the domain vector onto CLIP's pooled vector, and {sd.family}'s text encoder has no "
                "pooled vector; use level: token (the domain token states onto its conditioning sequence)")
        self.in_features = domain.output_size if level == "document" else domain.hidden_size
        self.out_features = int(sd.text_encoder.config.hidden_size)
        # CLIP's start-token state opens every document-level sequence (the same for any prompt)
        self._bos = sd.encode_prompts([""])[0, 0].detach().clone() if level == "document" else None

    @torch.no_grad()
    def inputs(self, texts: Sequence[str]) -> torch.Tensor:
        """The domain encoder's document vectors ``[B, in]`` or aligned token states ``[B, 77, in]``."""
        states, mask, document = self.domain.encode(list(texts))
        return document if self.level == "document" else align_token_states(states, mask, self.sd.max_token_length)

    @torch.no_grad()
    def domain_mask(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, window]``: 1 at the positions that hold one of the text's own domain token states (the rest repeat the
        last one): the attention mask of a masked family's conditioning."""
        _, mask, _ = self.domain.encode(list(texts))
        real = mask.sum(dim=1).clamp(min=1).long()
        positions = torch.arange(self.sd.max_token_length, device=mask.device)[None, :]
        return (positions < real[:, None]).long()

    @torch.no_grad()
    def targets(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's pooled vectors ``[B, D]`` (document) or conditioning sequences ``[B, 77, D]`` (token); a masked
        family's conditioning sequence (Sana: Gemma-2's ``[B, 300, D]``)."""
        if self.masked:
            return self.sd.conditioning()(list(texts)).embeds
        out = self.sd.text_encoder(self.sd.tokenize(texts, next(self.sd.text_encoder.parameters()).device))
        return out.pooler_output if self.level == "document" else out.last_hidden_state

    def masked_loss(self, texts: Sequence[str]) -> torch.Tensor:
        """A masked family's projection loss on ``texts`` (the text encoder runs once): the MSE over the positions real
        in both the domain sequence and the text encoder's (the denoiser sees only the first, and the second's padding
        states are not conditioning the base was trained with)."""
        with torch.no_grad():
            encoded = self.sd.conditioning()(list(texts))
            mask = (self.domain_mask(texts).to(encoded.mask.device) * encoded.mask).float()
            inputs = self.inputs(texts)
        return self.masked_mse(self.projection(inputs.float()), encoded.embeds, mask)

    def masked_mse(self, projected: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The projection's MSE: over every element (CLIP), or over the positions of ``mask`` (averaged over width)."""
        if mask is None:
            return torch.nn.functional.mse_loss(projected.float(), targets.float())
        per_position = ((projected.float() - targets.float()) ** 2).mean(dim=-1)
        mask = mask.to(per_position)
        return (per_position * mask).sum() / mask.sum().clamp(min=1)

    def to_conditioning(self, projected: torch.Tensor) -> torch.Tensor:
        """``[B, 77, D]`` U-Net conditioning from projected document vectors or token states."""
        if self.level == "token":
            return projected
        seq = projected[:, None, :].expand(-1, self.sd.max_token_length, -1).clone()
        seq[:, 0] = self._bos.to(projected)
        return seq

    def __call__(self, prompts: Sequence[str]):
        projected = self.to_conditioning(self.projection(self.inputs(prompts).float()))
        if self.masked:  # the family's condition: the projected states with the domain sequence's own positions
            return self.sd.condition(projected, self.domain_mask(prompts).to(projected.device))
        return projected

    @torch.no_grad()
    def negative(self, prompts: Sequence[str]):
        """The base's own embedding of the negative (by default empty) prompt, as the base was trained with."""
        return self.sd.encode_prompts(prompts)

    def to(self, device) -> None:
        self.domain.to(device)
        self.projection.to(device)

    def window(self, prompts: Sequence[str]) -> dict:
        """Prompts go through the domain encoder, which truncates them to its own limit (not CLIP's 77)."""
        limit = self.domain.max_length
        lengths = self.domain.tokenizer(list(prompts), truncation=False).input_ids
        return {"encoder": f"domain encoder ({self.domain.spec.pretrained})", "window": limit,
                "too_long": sum(len(ids) > limit for ids in lengths),
                "handling": f"truncated to the domain encoder's {limit} tokens"}

    def check_widths(self, in_features: int, out_features: int, where: str) -> None:
        """A projection trained for other encoder widths cannot be loaded: say which sizes differ."""
        if (int(in_features), int(out_features)) != (self.in_features, self.out_features):
            spec = self.domain.spec
            raise ProjectionConfigError(
                f"{where}: its projection maps {in_features} -> {out_features} wide vectors, but the domain encoder "
                f"{spec.pretrained!r} ({spec.extraction if self.level == 'document' else 'token states'}) "
                f"gives {self.in_features} and CLIP expects {self.out_features}; load it with the encoders it was trained with"
            )


def save_projection(folder: Path, conditioning: ProjectedConditioning, kind: str, hidden_size: Optional[int], depth: int) -> None:
    """``projection.safetensors`` (float32) and ``projection.json`` (the encoders it connects, level and shape)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in conditioning.projection.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    config = {
        "strategy": "textual_projection",
        "stable_diffusion": dict(vars(conditioning.sd.spec)),
        "domain_encoder": asdict(conditioning.domain.spec),
        "level": conditioning.level,
        "projection": kind,
        "hidden_size": hidden_size,
        "depth": depth,
        "in_features": conditioning.in_features,
        "out_features": conditioning.out_features,
        "unconditional": f"the base's own text encoder's embedding of the empty prompt ({conditioning.sd.family})",
        "loss": "MSE over the positions real in both sequences" if conditioning.masked else "MSE",
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_projection(folder: Path, base: Optional[str] = None):
    """A :class:`~models.generator.Generator` from a folder written by :func:`save_projection` (``base`` overrides
    the Stable Diffusion it names)."""
    from safetensors.torch import load_file

    from models.domain_encoder import load_domain_encoder
    from models.generator import Generator
    from models.stable_diffusion import load_stable_diffusion

    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; export a projection run with `python export.py runs/<name> {folder}`")
    config = json.loads(config_file.read_text())
    sd = load_stable_diffusion({"pretrained": base, "local_files_only": Path(base).is_dir()} if base else config["stable_diffusion"])
    domain = load_domain_encoder(DomainEncoderSpec(**config["domain_encoder"]))
    projection = build_projection(domain, int(sd.text_encoder.config.hidden_size), config["level"], config["projection"],
                                  config["hidden_size"], config["depth"])
    conditioning = ProjectedConditioning(sd, domain, projection, config["level"])
    conditioning.check_widths(config["in_features"], config["out_features"], where=str(config_file))
    if config["projection"] == "mlp":
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the export is incomplete")
        projection.load_state_dict(load_file(str(weights)))
    projection.eval()
    return Generator(sd, conditioning, info={"kind": "projection", "strategy": "TextualProjection"})
