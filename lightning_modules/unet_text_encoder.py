"""U-Net and text encoder fine-tuning (RoentGen, Chambon et al. 2022; Nat. Biomed. Eng. 2024): the U-Net and CLIP's
text encoder train together, the VAE stays frozen.

RoentGen found this the best of its fine-tuning variants for fidelity and text alignment. The text encoder trains at
its own learning rate (``text_encoder_learning_rate``, default the U-Net's), all of it or only its last
``text_encoder_layers`` transformer layers (with the final layer norm). Everything else is U-Net fine-tuning: prior
preservation (class images come from the base model, before any training), Min-SNR weighting, the latent cache. The
text cache cannot hold (a prompt's conditioning changes at every step), so it is turned off with one info line.
Checkpoints hold both trained parts; the export is a diffusers pipeline folder with both.
"""
from __future__ import annotations

from typing import Optional

from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import ModuleConfigError
from lightning_modules.unet import UNetFineTuning
from models.generator import ClipConditioning


class UNetTextEncoderFineTuning(UNetFineTuning):
    """Fine-tune the U-Net and CLIP's text encoder of Stable Diffusion on image–prompt pairs.

    Args:
        text_encoder_learning_rate: peak learning rate of the text encoder (default: ``learning_rate``).
        text_encoder_layers: train only CLIP's last N transformer layers and its final layer norm; None trains all of
            it (token and position embeddings included).
        **kwargs: see :class:`~lightning_modules.unet.UNetFineTuning` and :class:`~lightning_modules.base.DiffusionModule`.
    """

    families = ("stable-diffusion", "sana")
    families_note = "it trains CLIP's or Gemma-2's layers, and T5's (and SD 3.5's three encoders) are still to come"

    def __init__(self, text_encoder_learning_rate: Optional[float] = None, text_encoder_layers: Optional[int] = None, **kwargs):
        if text_encoder_learning_rate is not None and text_encoder_learning_rate <= 0:
            raise ModuleConfigError(f"text_encoder_learning_rate: {text_encoder_learning_rate!r}; expected a positive rate "
                                    "(or null: the U-Net's)")
        if kwargs.get("text_cache") == "disk":
            raise ModuleConfigError("text_cache: disk caches a frozen text encoder's outputs, but UNetTextEncoderFineTuning "
                                    "trains the text encoder (its outputs change at every step); remove text_cache")
        super().__init__(**kwargs)

    def configure_trainable(self) -> ClipConditioning:
        super().configure_trainable()
        for part in self.text_encoder_parts():
            part.requires_grad_(True)
        self.sd.text_encoder.train()
        if self.hparams.cache_text:
            rank_zero_info("cache_text is off: the text encoder trains, so a prompt's conditioning changes at every step")
        return self.sd.conditioning()  # uncached: CLIP's, or the family's own (Sana: Gemma-2 with its mask)

    def text_encoder_parts(self) -> list:
        """The modules of CLIP's text encoder that train."""
        text_encoder = self.sd.text_encoder
        n = self.hparams.text_encoder_layers
        if n is None:
            return [text_encoder]
        text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it; 5 does not
        # CLIP: encoder.layers + final_layer_norm; Gemma-2 (Sana): layers + norm
        layers = text_model.encoder.layers if hasattr(text_model, "encoder") else text_model.layers
        final_norm = text_model.final_layer_norm if hasattr(text_model, "final_layer_norm") else text_model.norm
        if not 1 <= int(n) <= len(layers):
            raise ModuleConfigError(f"text_encoder_layers: {n!r}; the text encoder of {self.spec.pretrained!r} has "
                                    f"{len(layers)} layers, so expected 1..{len(layers)} (or null: all of it)")
        return [*layers[len(layers) - int(n):], final_norm]

    def param_groups(self) -> list[dict]:
        """The U-Net at ``learning_rate``, the text encoder at ``text_encoder_learning_rate``."""
        unet = [p for p in self.sd.denoiser.parameters() if p.requires_grad]
        text = [p for p in self.sd.text_encoder.parameters() if p.requires_grad]
        lr = self.hparams.text_encoder_learning_rate or self.hparams.learning_rate
        return [{"params": unet}, {"params": text, "lr": lr}]
