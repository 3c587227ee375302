"""Textual projection (paper §2.5): a frozen domain text encoder, an MLP into CLIP's space, SD unchanged.

The domain encoder (CXR-BERT-specialized by default, :mod:`lightning_modules.domain_encoder`) replaces
SD's CLIP text encoder; a projection, trained on LAION captions (text only) with an MSE loss, maps its
output to what CLIP would have produced for the same caption, so that the frozen U-Net still
understands the conditioning. Both encoders are frozen; only the projection trains.

Levels:

* ``document`` — one vector per caption: the domain encoder's document vector (its ``extraction``:
  cls, mean, pooler or projected) against CLIP's pooled vector (``final_layer_norm`` state at the EOS
  position, REFERENCE §6). Both are encoded once per caption set and cached on disk (memory-mapped
  ``.npy``, keyed by the two models, the extraction and the caption set), so a step costs only the MLP.
  **As conditioning**, the projected vector ``v`` becomes the sequence ``[bos, v, v, ..., v]`` (77 rows):
  row 0 is CLIP's state of the start token (the same for every prompt, as CLIP's attention is causal)
  and every other row is ``v``. In SD's own conditioning every row after a prompt's last word holds an
  EOS-like summary of the prompt; here the summary is all there is.
* ``token`` — the domain token states against CLIP's ``[77, D]`` conditioning sequence, position by
  position. The two tokenizers split text differently, so the sequences are aligned by position only:
  the domain states are truncated to 77 rows, and a text shorter than 77 tokens is padded with its last
  real state (the ``[SEP]`` row), as CLIP pads with EOS states; the MSE runs over all 77 positions,
  because the U-Net attends to all of them. The MLP acts on each position independently. Encoding
  runs on the fly (no cache: 1M x 77 x 768 values per encoder would be ~118 GB in fp16), without
  gradients, in the run's precision.

``projection: none`` is the paper's "No Projection" baseline: the domain encoder's output goes to the
U-Net as it is (its width must equal CLIP's). It trains nothing; a run with it measures the MSE of the
identity map and draws sample grids.

Classifier-free guidance uses CLIP's embedding of the empty prompt (or of the negative prompt) as
the unconditional input, because that is what SD was trained with; the domain encoder never sees it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_modules.base import DiffusionModule
from lightning_modules.domain_encoder import DomainEncoderSpec, load_domain_encoder

LEVELS = ("document", "token")
PROJECTIONS = ("mlp", "none")
EXPORT_CONFIG = "projection.json"
EXPORT_WEIGHTS = "projection.safetensors"


class ProjectionConfigError(ValueError):
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


class DocumentEmbeddingCache:
    """Domain document vectors and CLIP pooled vectors of one caption set, as memory-mapped ``.npy`` files.

    ``<root>/<key>/domain.npy [N, in]``, ``clip.npy [N, out]`` (float32) and ``COMPLETE.json``, written
    last: a folder without it is rebuilt. Each rank fills its own rows (``rank::world_size``).
    """

    def __init__(self, folder: Path, n: int, in_features: int, out_features: int):
        self.folder = Path(folder)
        self.n, self.in_features, self.out_features = int(n), int(in_features), int(out_features)
        self._domain: Optional[np.ndarray] = None
        self._clip: Optional[np.ndarray] = None

    @property
    def marker(self) -> Path:
        return self.folder / "COMPLETE.json"

    def nbytes(self) -> int:
        return self.n * (self.in_features + self.out_features) * 4

    def is_complete(self) -> bool:
        if not self.marker.is_file():
            return False
        found = json.loads(self.marker.read_text())
        return found == {"n": self.n, "in_features": self.in_features, "out_features": self.out_features}

    def create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)
        np.lib.format.open_memmap(self.folder / "domain.npy", mode="w+", dtype=np.float32, shape=(self.n, self.in_features)).flush()
        np.lib.format.open_memmap(self.folder / "clip.npy", mode="w+", dtype=np.float32, shape=(self.n, self.out_features)).flush()

    def open(self, mode: str = "r") -> None:
        self._domain = np.load(self.folder / "domain.npy", mmap_mode=mode)
        self._clip = np.load(self.folder / "clip.npy", mmap_mode=mode)

    def write(self, rows: np.ndarray, domain: torch.Tensor, clip: torch.Tensor) -> None:
        self._domain[rows] = domain.float().cpu().numpy()
        self._clip[rows] = clip.float().cpu().numpy()

    def flush(self) -> None:
        self._domain.flush()
        self._clip.flush()

    def finish(self) -> None:
        self.flush()
        self.marker.write_text(json.dumps({"n": self.n, "in_features": self.in_features, "out_features": self.out_features}))

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._domain is None:
            self.open()
        rows = index.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(self._domain[rows])), torch.from_numpy(np.ascontiguousarray(self._clip[rows]))


class TextualProjection(DiffusionModule):
    """Condition Stable Diffusion on a domain text encoder through a trained projection.

    Args:
        domain_encoder: the frozen domain encoder and its extraction (document level).
        level: ``document`` (one vector per caption) or ``token`` (the token states); see the module docstring.
        projection: ``mlp`` (trained) or ``none`` (the "No Projection" baseline: identity, nothing trains).
        hidden_size: width of the MLP's hidden layers (default: CLIP's width).
        depth: number of Linear layers (2 = the paper's MLP).
        cache_embeddings: document level: encode the caption set once and cache it on disk.
        cache_dir: where the cache lives (default ``$CXR_DIFFUSION_CACHE/projection``).
        encode_batch_size: captions per batch when filling the cache.
        learning_rate: peak learning rate of AdamW on the projection.
        **kwargs: see :class:`~lightning_modules.base.DiffusionModule` (``model`` names SD, whose CLIP is the target).
    """

    def __init__(
        self,
        domain_encoder: DomainEncoderSpec = DomainEncoderSpec(),
        level: Literal["document", "token"] = "document",
        projection: Literal["mlp", "none"] = "mlp",
        hidden_size: Optional[int] = None,
        depth: int = 2,
        cache_embeddings: bool = True,
        cache_dir: Optional[str] = None,
        encode_batch_size: int = 256,
        learning_rate: float = 1e-4,
        **kwargs,
    ):
        if level not in LEVELS:
            raise ProjectionConfigError(f"level: {level!r}; expected one of {', '.join(LEVELS)}")
        if projection not in PROJECTIONS:
            raise ProjectionConfigError(f"projection: {projection!r}; expected one of {', '.join(PROJECTIONS)}")
        self._domain_spec = domain_encoder if isinstance(domain_encoder, DomainEncoderSpec) else DomainEncoderSpec(**dict(domain_encoder))
        self._cache: Optional[DocumentEmbeddingCache] = None
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.hparams["domain_encoder"] = asdict(self._domain_spec)

    # ------------------------------------------------------------------ what a strategy defines
    def configure_trainable(self) -> None:
        self.domain = load_domain_encoder(self._domain_spec)
        clip_width = int(self.sd.text_encoder.config.hidden_size)
        level, kind = self.hparams.level, self.hparams.projection
        in_width = self.domain.output_size if level == "document" else self.domain.hidden_size
        what = f"the domain encoder {self._domain_spec.pretrained!r} ({'document vector, ' + self._domain_spec.extraction if level == 'document' else 'token states'})"
        if kind == "none":
            if in_width != clip_width:
                raise ProjectionConfigError(
                    f"projection: none feeds {what} to the U-Net as they are, but they are {in_width} wide and "
                    f"the U-Net expects CLIP's width, {clip_width}; use projection: mlp"
                )
            self.projection = nn.Identity()
        else:
            self.projection = ProjectionMLP(in_width, clip_width, self.hparams.hidden_size, self.hparams.depth)
        self.in_features, self.out_features = in_width, clip_width
        # CLIP's start-token state opens every document-level sequence (the same for any prompt)
        self.register_buffer("clip_bos", self.sd.encode_prompts([""])[0, 0].clone(), persistent=False)
        self.projection.requires_grad_(kind == "mlp")
        # the identity has nothing to optimise: manual optimisation, so Lightning runs no backward pass
        self.automatic_optimization = kind == "mlp"

    def configure_optimizers(self):
        if self.hparams.projection == "none":
            return None  # the identity trains nothing; the run still logs its MSE and draws grids
        return super().configure_optimizers()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.domain.to(dtype=self.frozen_dtype)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def clip_targets(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP's pooled vectors ``[B, D]`` (document) or conditioning sequences ``[B, 77, D]`` (token)."""
        ids = self.sd.tokenize(captions, self.device)
        out = self.sd.text_encoder(ids)
        return out.pooler_output if self.hparams.level == "document" else out.last_hidden_state

    @torch.no_grad()
    def domain_inputs(self, captions: Sequence[str]) -> torch.Tensor:
        """The domain encoder's document vectors ``[B, in]`` or aligned token states ``[B, 77, in]``."""
        states, mask, document = self.domain.encode(list(captions))
        if self.hparams.level == "document":
            return document
        return align_token_states(states, mask, self.sd.max_token_length)

    def to_conditioning(self, projected: torch.Tensor) -> torch.Tensor:
        """``[B, 77, D]`` U-Net conditioning from projected document vectors or token states."""
        if self.hparams.level == "token":
            return projected
        seq = projected[:, None, :].expand(-1, self.sd.max_token_length, -1).clone()
        seq[:, 0] = self.clip_bos.to(projected)
        return seq

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.to_conditioning(self.projection(self.domain_inputs(prompts).float()))

    @torch.no_grad()
    def negative_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's embedding of the negative (by default empty) prompt, as SD was trained with."""
        return self.sd.encode_prompts(prompts)

    # ------------------------------------------------------------------ cache (document level)
    def cache_folder(self, caption_set_key: str) -> Path:
        from datamodules.mimic_cxr import default_cache_dir

        root = Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir() / "projection"
        key = hashlib.sha256(
            json.dumps([self.domain.cache_key(), self.spec.cache_key(), caption_set_key, "document-v1"]).encode()
        ).hexdigest()[:16]
        return root / key

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.level != "document" or not self.hparams.cache_embeddings:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "caption_set_key"):
            raise ProjectionConfigError(
                "cache_embeddings needs a caption datamodule (datamodules.laion.LAIONCaptionDataModule); "
                "set cache_embeddings: false to encode on the fly"
            )
        self._cache = self.build_cache(datamodule)

    def build_cache(self, datamodule) -> DocumentEmbeddingCache:
        """Encode every caption of the datamodule's set once (each rank its rows), or reuse a complete cache."""
        cache = DocumentEmbeddingCache(self.cache_folder(datamodule.caption_set_key()), datamodule.num_captions,
                                       self.in_features, self.out_features)
        strategy = self.trainer.strategy
        if cache.is_complete():
            rank_zero_info(f"document embeddings: reusing {cache.folder} ({cache.n} captions)")
            return cache
        if self.global_rank == 0:
            rank_zero_info(f"document embeddings: encoding {cache.n} captions once into {cache.folder} "
                           f"({cache.nbytes() / 2**20:.1f} MiB)")
            cache.create()
        strategy.barrier("projection_cache_create")
        cache.open("r+")
        captions = datamodule.caption_dataset()
        self.fill_cache(cache, lambda rows: [item["caption"] for item in captions.__getitems__(rows.tolist())],
                        np.arange(self.global_rank, cache.n, self.trainer.world_size), progress=self.global_rank == 0)
        strategy.barrier("projection_cache_filled")
        if self.global_rank == 0:
            cache.finish()
        strategy.barrier("projection_cache_done")
        cache.open("r")
        return cache

    def fill_cache(self, cache: DocumentEmbeddingCache, captions_at, rows: np.ndarray, progress: bool = True) -> None:
        """Encode the captions of ``rows`` (``captions_at(rows) -> list[str]``) with both encoders into ``cache``."""
        from tqdm.auto import tqdm

        batch = int(self.hparams.encode_batch_size)
        for start in tqdm(range(0, len(rows), batch), desc="document embeddings", disable=not progress):
            chunk = rows[start : start + batch]
            texts = captions_at(chunk)
            cache.write(chunk, self.domain_inputs(texts), self.clip_targets(texts))
        cache.flush()

    # ------------------------------------------------------------------ the step
    def projection_loss(self, batch: dict) -> torch.Tensor:
        captions = list(batch["caption"])
        if self._cache is not None:
            inputs, targets = self._cache.lookup(batch["index"])
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        else:
            inputs, targets = self.domain_inputs(captions), self.clip_targets(captions)
        return F.mse_loss(self.projection(inputs.float()), targets.float())

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.projection_loss(batch)
        if self.automatic_optimization and not self.loss_is_usable(loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Without an optimizer the global step never advances, so the identity baseline stops on batches.
        if not self.automatic_optimization and self.trainer.max_steps and self.trainer.max_steps > 0:
            if self.trainer.fit_loop.total_batch_idx + 1 >= self.trainer.max_steps:
                self.trainer.should_stop = True

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.projection_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))
        return loss

    # ------------------------------------------------------------------ checkpoints
    def check_widths(self, in_features: int, out_features: int, where: str) -> None:
        """A projection trained for other encoder widths cannot be loaded: say which sizes differ."""
        if (int(in_features), int(out_features)) != (self.in_features, self.out_features):
            raise ProjectionConfigError(
                f"{where}: its projection maps {in_features} -> {out_features} wide vectors, but the domain encoder "
                f"{self._domain_spec.pretrained!r} ({self._domain_spec.extraction if self.hparams.level == 'document' else 'token states'}) "
                f"gives {self.in_features} and CLIP expects {self.out_features}; load it with the encoders it was trained with"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["projection_widths"] = [self.in_features, self.out_features]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "projection_widths" in checkpoint:
            self.check_widths(*checkpoint["projection_widths"], where="the checkpoint")
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path) -> Path:
        """A folder with the projection (safetensors) and what it connects (``projection.json``)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.projection.state_dict().items()}
        save_file(state, str(out / EXPORT_WEIGHTS))
        config = {
            "strategy": "textual_projection",
            "stable_diffusion": dict(vars(self.spec)),
            "domain_encoder": asdict(self._domain_spec),
            "level": self.hparams.level,
            "projection": self.hparams.projection,
            "hidden_size": self.hparams.hidden_size,
            "depth": self.hparams.depth,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "unconditional": "CLIP's embedding of the empty prompt",
        }
        (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        return out


def load_projection_export(folder: str | Path) -> TextualProjection:
    """A :class:`TextualProjection` (eval mode) from a folder written by :meth:`TextualProjection.export`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file = folder / EXPORT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; export a projection run with `python export.py runs/<name> {folder}`")
    config = json.loads(config_file.read_text())
    module = TextualProjection(
        model=config["stable_diffusion"], domain_encoder=config["domain_encoder"], level=config["level"],
        projection=config["projection"], hidden_size=config["hidden_size"], depth=config["depth"], cache_embeddings=False,
    )
    module.check_widths(config["in_features"], config["out_features"], where=str(config_file))
    if config["projection"] == "mlp":
        weights = folder / EXPORT_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the export is incomplete")
        module.projection.load_state_dict(load_file(str(weights)))
    return module.eval()
