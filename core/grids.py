"""Labelled image grids: sample grids during training, generate.py's grid, the studies' figures."""
from __future__ import annotations

from typing import Sequence

import torch


def labelled_grid(images: torch.Tensor, prompts: Sequence[str], per_prompt: int, title: str = ""):
    """A PIL image: one row of ``per_prompt`` images (``[N, C, H, W]`` in [0, 1]) per prompt, the prompt written above
    each row, ``title`` above all."""
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = images.shape
    rows = n // per_prompt
    font = ImageFont.load_default()
    label_h = 14
    pad = 2
    text_w = max(int(font.getlength(p)) for p in [title, *prompts]) + 2 * pad
    width = max(per_prompt * (w + pad) + pad, text_w)
    canvas = Image.new("RGB", (width, rows * (h + label_h + pad) + pad + (label_h if title else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), title, fill="black", font=font)
        y += label_h
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype("uint8")
    for r in range(rows):
        draw.text((pad, y), prompts[r * per_prompt], fill="black", font=font)
        y += label_h
        for c in range(per_prompt):
            canvas.paste(Image.fromarray(arr[r * per_prompt + c]), (pad + c * (w + pad), y))
        y += h + pad
    return canvas


def to_uint8(images: torch.Tensor):
    """``[N, C, H, W]`` in [0, 1] -> uint8 ``[N, H, W, C]`` numpy, rounded."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype("uint8")
