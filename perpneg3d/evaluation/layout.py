"""Where a run's layout is decided (issue 21, docs/janus.md): what a field looks like from fixed azimuths while
it trains, measured without touching the run: the view classifier's label per azimuth, the SDS gradient's norm
per azimuth (its own random stream), and the density's extent along x (front-back) and y (side-side)."""
from __future__ import annotations

import torch
from torch import Tensor

from perpneg3d.cameras import orbit_cameras


@torch.no_grad()
def density_extent(geometry, level: float, resolution: int = 48) -> dict[str, float]:
    """Lengths along x, y and z of the region where the density exceeds `level` (a resolution^3 lattice over
    the geometry's box; 0 where nothing does)."""
    r = float(geometry.radius)
    axis = torch.linspace(-r, r, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    device = next(geometry.parameters()).device
    inside = (geometry.density(points.to(device)).cpu() > level).reshape(resolution, resolution, resolution)
    out = {}
    for name, dim in (("x", 0), ("y", 1), ("z", 2)):
        occupied = inside.any(dim=tuple(d for d in range(3) if d != dim)).nonzero().squeeze(-1)
        out[name] = float((occupied.max() - occupied.min() + 1) * (2 * r / (resolution - 1))) if occupied.numel() else 0.0
    return out


def sds_norm_per_view(guidance, prompts, geometry, renderer, azimuth_deg: Tensor, elevation: float, distance: float,
                      fovy_deg: float, resolution: int, step: int, seed: int = 0) -> Tensor:
    """[N] the norm of the SDS gradient on the render of each azimuth, at training step `step`'s timestep range
    (its own generator: the run's random streams are not touched)."""
    device = next(geometry.parameters()).device
    cams = orbit_cameras(azimuth_deg, torch.full_like(azimuth_deg, elevation), distance, fovy_deg, resolution).to(device)
    out = renderer(geometry, cams, shading="albedo")
    rgb = out.rgb.detach().requires_grad_(True)
    batch = prompts(cams.azimuth_deg, cams.elevation_deg)
    sds = guidance(rgb, batch, step, torch.Generator(device=device).manual_seed(seed), cams.c2w)
    (grad,) = torch.autograd.grad(sds.loss, rgb)
    return grad.flatten(1).norm(dim=1).detach().cpu()
