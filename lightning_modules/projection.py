"""Textual projection (paper §2.5): a frozen domain text encoder, an MLP into CLIP's space, SD unchanged.

The domain encoder (CXR-BERT-specialized by default, :mod:`models.domain_encoder`) replaces SD's CLIP text encoder; a
projection (:mod:`models.projection`), trained on LAION captions (text only) with an MSE loss, maps its output to what
CLIP would have produced for the same caption, so that the frozen U-Net still understands the conditioning. Both
encoders are frozen; only the projection trains. The levels (``document``: one vector per caption, shown to the U-Net
as ``[bos, v, ..., v]``; ``token``: the token states, aligned by position) are described in :mod:`models.projection`.

Document level encodes each caption set once with both encoders and caches the vectors on disk (memory-mapped, keyed
by the two models, the extraction and the caption set; :mod:`lightning_modules.preparation`), so a step costs only the
MLP. Token level encodes on the fly (no cache: 1M x 77 x 768 values per encoder would be ~118 GB in fp16), without
gradients, in the run's precision.

``projection: none`` is the paper's "No Projection" baseline: the domain encoder's output goes to the U-Net as it is
(its width must equal CLIP's). It trains nothing; a run with it measures the MSE of the identity map and draws sample
grids.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from core.cache import cache_root
from lightning_modules.base import DiffusionModule
from lightning_modules.preparation import DocumentEncoder, Needs
from models.domain_encoder import DomainEncoderSpec, load_domain_encoder
from models.exports import write_manifest
from models.projection import (LEVELS, PROJECTIONS, ProjectedConditioning, ProjectionConfigError, ProjectionMLP,  # noqa: F401
                               align_token_states, build_projection, save_projection)


class TextualProjection(DiffusionModule):
    """Condition Stable Diffusion on a domain text encoder through a trained projection.

    Args:
        domain_encoder: the frozen domain encoder and its extraction (document level).
        level: ``document`` (one vector per caption) or ``token`` (the token states); see :mod:`models.projection`.
        projection: ``mlp`` (trained) or ``none`` (the "No Projection" baseline: identity, nothing trains).
        hidden_size: width of the MLP's hidden layers (default: CLIP's width).
        depth: number of Linear layers (2 = the paper's MLP).
        cache_embeddings: document level: encode the caption set once and cache it on disk.
        cache_dir: the cache root of those embeddings (default ``$CXR_DIFFUSION_CACHE``).
        encode_batch_size: captions per batch when filling the cache.
        learning_rate: peak learning rate of AdamW on the projection.
        **kwargs: see :class:`~lightning_modules.base.DiffusionModule` (``model`` names SD, whose CLIP is the target).
    """

    families = ("stable-diffusion", "sana")
    families_note = "its projection maps into CLIP's or Gemma-2's conditioning, and one into T5's (or SD 3.5's three encoders') is still to come"

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
        if kwargs.get("prior_preservation") is not None:
            raise ProjectionConfigError("prior_preservation: the textual projection trains on captions, not images; remove it")
        self._domain_spec = domain_encoder if isinstance(domain_encoder, DomainEncoderSpec) else DomainEncoderSpec(**dict(domain_encoder))
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.hparams["domain_encoder"] = asdict(self._domain_spec)

    # ------------------------------------------------------------------ what a strategy defines
    def configure_trainable(self) -> ProjectedConditioning:
        self.domain = load_domain_encoder(self._domain_spec)
        hp = self.hparams
        self.projection = build_projection(self.domain, int(self.sd.text_encoder.config.hidden_size), hp.level, hp.projection,
                                           hp.hidden_size, hp.depth)
        self.projection.requires_grad_(hp.projection == "mlp")
        # the identity has nothing to optimise: manual optimisation, so Lightning runs no backward pass
        self.automatic_optimization = hp.projection == "mlp"
        return ProjectedConditioning(self.sd, self.domain, self.projection, hp.level)

    def configure_optimizers(self):
        if self.hparams.projection == "none":
            return None  # the identity trains nothing; the run still logs its MSE and draws grids
        return super().configure_optimizers()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.domain.to(dtype=self.frozen_dtype)

    def needs(self) -> Needs:
        if self.hparams.level != "document" or not self.hparams.cache_embeddings:
            return Needs()
        c = self.conditioning
        key = {"domain": self.domain.cache_key(), "clip": self.spec.cache_key()}
        encode = lambda texts: (c.inputs(texts), c.targets(texts))
        root = Path(self.hparams.cache_dir) if self.hparams.cache_dir else cache_root()
        return Needs(documents=DocumentEncoder(encode, c.in_features, c.out_features, key, root, self.hparams.encode_batch_size))

    # ------------------------------------------------------------------ the step
    def projection_loss(self, batch: dict) -> torch.Tensor:
        documents = self.prepared.documents
        if documents is not None:
            inputs, targets = documents.lookup(batch["index"])
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        else:
            captions = list(batch["caption"])
            if self.conditioning.masked:  # Sana: the positions real in both sequences (models.projection)
                return self.conditioning.masked_loss(captions)
            inputs, targets = self.conditioning.inputs(captions), self.conditioning.targets(captions)
        return F.mse_loss(self.projection(inputs.float()), targets.float())

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.projection_loss(batch)
        if self.automatic_optimization and not self.loss_is_usable(loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # Without an optimizer the global step never advances, so the identity baseline stops on batches.
        if not self.automatic_optimization and self.trainer.max_steps and self.trainer.max_steps > 0:
            if self.trainer.fit_loop.total_batch_idx + 1 >= self.trainer.max_steps:
                self.trainer.should_stop = True

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.projection_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["projection_widths"] = [self.conditioning.in_features, self.conditioning.out_features]

    def check_resumable(self, checkpoint: dict, datamodule=None, world_size: Optional[int] = None, strategy=None) -> None:
        if "projection_widths" in checkpoint:
            self.conditioning.check_widths(*checkpoint["projection_widths"], where="the checkpoint")
        super().check_resumable(checkpoint, datamodule, world_size, strategy)

    # ------------------------------------------------------------------ export
    def write_export(self, out_dir: Path) -> Path:
        """``projection.safetensors`` and ``projection.json`` (what it connects) and ``export.json``."""
        out = Path(out_dir)
        save_projection(out, self.conditioning, self.hparams.projection, self.hparams.hidden_size, self.hparams.depth)
        write_manifest(out, "projection", type(self).__name__, dict(vars(self.spec)),
                       files=["projection.json", "projection.safetensors"])
        return out
