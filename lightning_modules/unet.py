"""U-Net fine-tuning (paper §2.7, after DreamBooth): train the U-Net, keep VAE and CLIP frozen.

With prior preservation the datamodule serves class images beside each batch; they are generated
once by the frozen base model at the start of fit (each rank its share) and cached on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lightning_modules.base import DiffusionModule


class UNetFineTuning(DiffusionModule):
    """Fine-tune the U-Net of Stable Diffusion on image–prompt pairs.

    Args:
        gradient_checkpointing: trade compute for memory in the U-Net.
        **kwargs: see :class:`~lightning_modules.base.DiffusionModule`.
    """

    def __init__(self, gradient_checkpointing: bool = False, **kwargs):
        super().__init__(**kwargs)
        if gradient_checkpointing:
            self.sd.unet.enable_gradient_checkpointing()

    def configure_trainable(self) -> None:
        self.sd.unet.requires_grad_(True)
        self.sd.unet.train()

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.sd.encode_prompts(prompts)

    def export(self, out_dir: str | Path) -> Path:
        """A diffusers ``StableDiffusionPipeline`` folder (safetensors, fp32, PNDM as SD v1.4)."""
        out = Path(out_dir)
        pipe = self.sd.pipeline(scheduler="pndm")
        pipe.to(torch.float32)
        pipe.save_pretrained(out, safe_serialization=True)
        return out
