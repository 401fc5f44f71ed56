"""Pictures of a run: validation grids (front, side, back, overhead x rgb, normals, opacity) and turntables."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from perpneg3d.images import make_grid, save_png, to_uint8
from perpneg3d.renderer.orbit import render_rgb, render_views

VAL_VIEWS = ((0.0, 15.0), (90.0, 15.0), (180.0, 15.0), (0.0, 75.0))  # front, side, back, overhead


def validation_grid(geometry, renderer, cameras, resolution: int, path: Path) -> torch.Tensor:
    """Save and return a [3,H,W] grid: columns front/side/back/overhead; rows rgb, normals, opacity."""
    az = torch.tensor([v[0] for v in VAL_VIEWS])
    el = torch.tensor([v[1] for v in VAL_VIEWS])
    distance, fovy = cameras.middle()
    out = render_views(geometry, renderer, az, el, distance, fovy, resolution, with_normals=True)[0]
    rgb = out.rgb.permute(0, 3, 1, 2)
    opacity = out.opacity.permute(0, 3, 1, 2)
    normal = (out.normal.permute(0, 3, 1, 2) * 0.5 + 0.5) * opacity + (1 - opacity)
    grid = make_grid(torch.cat([rgb, normal, opacity.expand_as(rgb)]).cpu(), nrow=4, upscale=max(1, 128 // resolution))
    save_png(grid, path)
    return grid


def render_turntable(geometry, renderer, cameras, path: Path, frames: int = 120, fps: int = 30,
                     resolution: int = 256, elevation: float = 15.0) -> Path:
    """A 360-degree turntable mp4 (H.264); small renders are upscaled (nearest) to at least 256 px."""
    import imageio.v2 as imageio

    az = torch.linspace(-180, 180, frames + 1)[:-1]
    distance, fovy = cameras.middle()
    rgb = render_rgb(geometry, renderer, az, torch.full_like(az, elevation), distance, fovy, resolution)
    scale = max(1, -(-256 // resolution))
    if scale > 1:
        rgb = F.interpolate(rgb, scale_factor=scale, mode="nearest")
    path = Path(path)
    imageio.mimwrite(path, list(to_uint8(rgb)), fps=fps, codec="libx264", quality=8, macro_block_size=16)
    save_png(rgb[int(torch.argmin((az - 30).abs()))], path.with_suffix(".png"))  # a three-quarter view
    return path
