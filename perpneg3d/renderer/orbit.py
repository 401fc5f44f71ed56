"""Eval-mode renders from cameras on an orbit (validation, turntables, metrics, previews)."""
from __future__ import annotations

import torch

from perpneg3d.cameras import orbit_cameras


@torch.no_grad()
def render_views(geometry, renderer, azimuth_deg, elevation_deg, distance, fovy_deg, resolution,
                 shading: str = "albedo", with_normals: bool = False, batch: int = 8):
    """Eval-mode renders of orbit cameras -> list of RenderOutput chunks (batch cameras each)."""
    was_training = (geometry.training, renderer.training)
    geometry.eval(), renderer.eval()
    device = next(geometry.parameters()).device
    outs = []
    try:
        for i in range(0, len(azimuth_deg), batch):
            cams = orbit_cameras(azimuth_deg[i:i + batch], elevation_deg[i:i + batch], distance, fovy_deg, resolution).to(device)
            outs.append(renderer(geometry, cams, shading=shading, with_normals=with_normals))
    finally:
        geometry.train(was_training[0]), renderer.train(was_training[1])
    return outs


def render_rgb(geometry, renderer, azimuth_deg, elevation_deg, distance, fovy_deg, resolution) -> torch.Tensor:
    """[N,3,H,W] albedo renders (what classifiers and previews look at)."""
    outs = render_views(geometry, renderer, azimuth_deg, elevation_deg, distance, fovy_deg, resolution)
    return torch.cat([o.rgb for o in outs]).permute(0, 3, 1, 2).cpu()
