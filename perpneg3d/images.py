"""Image grids and PNG writing for samples, validation and benchmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[...,3,H,W] or [...,H,W,3] floats in [0,1] -> uint8 HWC numpy (channels-last is detected)."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[-1] not in (1, 3, 4) and x.shape[-3] in (1, 3, 4):
        x = x.movedim(-3, -1)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return (x * 255 + 0.5).to(torch.uint8).numpy()


def make_grid(images: Tensor, nrow: int, pad: int = 2, upscale: int = 1, pad_value: float = 1.0) -> Tensor:
    """[N,3,H,W] -> [3, rows*(H+pad)+pad, nrow*(W+pad)+pad]; optional nearest upscaling."""
    images = images.detach().float().cpu()
    if upscale > 1:
        images = F.interpolate(images, scale_factor=upscale, mode="nearest")
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write [3,H,W] or [H,W,3] in [0,1] as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path
