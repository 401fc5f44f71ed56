"""Density grid -> clean triangle mesh: chunked sampling, an automatic iso-level, marching cubes, clean-up."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.errors import PerpNegError

log = logging.getLogger(__name__)


class EmptyFieldError(PerpNegError):
    """Nothing in the field reaches the iso-level: exporting would write an empty file."""


@torch.no_grad()
def sample_grid(density_fn: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, resolution: int,
                chunk_size: int = 262144, device: str | torch.device = "cpu") -> Tensor:
    """density on a resolution^3 lattice spanning [lo, hi] (corners included), [R,R,R] float32 on CPU,
    indexed [x, y, z]; evaluated one slab of x at a time so memory stays bounded."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution) for i in range(3)]
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
    out = torch.empty(resolution, resolution * resolution)
    slabs = max(1, chunk_size // yz.shape[0])
    for i in range(0, resolution, slabs):
        xs = axes[0][i:i + slabs]
        pts = torch.cat([xs.repeat_interleave(yz.shape[0]).unsqueeze(-1), yz.repeat(len(xs), 1)], -1)
        out[i:i + len(xs)] = density_fn(pts.to(device)).float().cpu().reshape(len(xs), -1)
    return out.reshape(resolution, resolution, resolution)


@torch.no_grad()
def sample_grid_near_level(density_fn: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, resolution: int,
                           level: float, factor: int = 4, chunk_size: int = 262144,
                           device: str | torch.device = "cpu") -> Tensor:
    """A fine grid of at least `resolution` points per side that is exact near the iso-level only.

    A coarse grid (one point every `factor` fine points) finds the coarse cells the level crosses;
    the fine points inside those cells are evaluated, everything else is the
    coarse grid's trilinear upsampling, which lies on the same side of the level. Marching cubes
    then sees the same surface at a fraction of the queries (surface features smaller than a coarse
    cell can be missed).
    """
    n_coarse = -(-(resolution - 1) // factor) + 1
    coarse = sample_grid(density_fn, lo, hi, n_coarse, chunk_size, device)
    n_fine = (n_coarse - 1) * factor + 1
    fine = F.interpolate(coarse[None, None], size=(n_fine,) * 3, mode="trilinear", align_corners=True)[0, 0]
    corners = torch.stack([coarse[i:n_coarse - 1 + i, j:n_coarse - 1 + j, k:n_coarse - 1 + k]
                           for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    crossing = ((corners.amin(0) <= level) & (corners.amax(0) >= level))[None, None].float()
    fine_cells = crossing.repeat_interleave(factor, 2).repeat_interleave(factor, 3).repeat_interleave(factor, 4)
    nodes = F.max_pool3d(F.pad(fine_cells, (1, 1, 1, 1, 1, 1)), 2, 1)[0, 0] > 0  # nodes touching a kept cell
    points = torch.nonzero(nodes)
    if len(points):
        step = (hi - lo) / (n_fine - 1)
        values = torch.cat([density_fn((lo + points[i:i + chunk_size] * step).to(device)).float().cpu()
                            for i in range(0, len(points), chunk_size)])
        fine[points[:, 0], points[:, 1], points[:, 2]] = values
    log.info("fine grid %d^3: %d of %d points evaluated near the surface", n_fine, len(points), n_fine ** 3)
    return fine


def auto_threshold(grid: Tensor, voxel_size: float, opacity: float = 0.5) -> float | None:
    """Iso-level where renders see the surface: march orthographic rays through the grid from the six
    axis directions; on every ray whose opacity 1 - exp(-sum sigma * dx) passes `opacity`, read the
    density at the crossing; return the median of those densities (None if no ray is that opaque).

    Unlike the mean of the field (threestudio's "auto", its issue 52), this does not depend on how much
    empty space the box holds, and puts the mesh where the volume renderer shows the surface.
    """
    values = []
    for axis in range(3):
        for flip in (False, True):
            g = grid.flip(axis) if flip else grid
            g = g.movedim(axis, 0).reshape(grid.shape[axis], -1)  # [steps, rays]
            alpha = 1 - torch.exp(-torch.cumsum(g.clamp_min(0) * voxel_size, 0))
            hit = alpha[-1] >= opacity
            if hit.any():
                first = (alpha[:, hit] >= opacity).float().argmax(0)
                values.append(g[:, hit].gather(0, first.unsqueeze(0))[0])
    if not values:
        return None
    return float(torch.cat(values).median())


def resolve_threshold(grid: Tensor, voxel_size: float, threshold) -> float:
    """A number, or "auto"; raises EmptyFieldError with the density range and a suggestion."""
    lo, hi = float(grid.min()), float(grid.max())
    suggestion = auto_threshold(grid, voxel_size)
    if threshold == "auto":
        level = suggestion
        if level is None or level >= hi:
            raise EmptyFieldError(f"no surface found: density ranges {lo:.3g}..{hi:.3g} and no ray through the box is "
                                  f"50% opaque; the field is empty or transparent (train longer), or pass "
                                  f"export.threshold=<a value below {hi:.3g}>")
        return level
    level = float(threshold)
    if not lo < level < hi:
        hint = f"{suggestion:.3g} (auto)" if suggestion is not None else f"{0.5 * (lo + hi):.3g}"
        raise EmptyFieldError(f"threshold {level:.3g} is outside the density range {lo:.3g}..{hi:.3g}: "
                              f"nothing to mesh; try export.threshold={hint}")
    return level


def occupied_bounds(grid: Tensor, level: float, lo: Tensor, hi: Tensor, margin_voxels: int = 2) -> tuple[Tensor, Tensor]:
    """Tight box around voxels above `level`, grown by a margin (for a second, finer pass)."""
    idx = torch.nonzero(grid > level)
    res = grid.shape[0]
    step = (hi - lo) / (res - 1)
    imin = (idx.min(0).values - margin_voxels).clamp_min(0)
    imax = (idx.max(0).values + margin_voxels).clamp_max(res - 1)
    return lo + imin * step, lo + imax * step


def marching_cubes(grid: Tensor, level: float, lo: Tensor, hi: Tensor):
    """PyMCubes on the [x,y,z] grid -> trimesh.Trimesh in world units (clean_mesh orients the normals)."""
    import mcubes
    import trimesh

    padded = np.pad(grid.numpy().astype(np.float64), 1, constant_values=min(float(grid.min()), level - 1.0))
    verts, faces = mcubes.marching_cubes(padded, level)  # padding closes surfaces cut by the box
    verts = verts - 1.0
    scale = ((hi - lo) / (grid.shape[0] - 1)).numpy()
    return trimesh.Trimesh(lo.numpy() + verts * scale, faces.astype(np.int64), process=True)


def clean_mesh(mesh, min_component_ratio: float = 0.05, max_faces: int | None = None):
    """Weld duplicate vertices and drop degenerate faces, drop floaters (components with fewer faces
    than min_component_ratio of the largest), decimate to max_faces (quadric, fast-simplification)
    and re-orient normals outward."""
    import trimesh

    # marching cubes makes near-duplicate vertices where the field is close to the level at a grid
    # node; welding them (to 1/100 of the mean edge) collapses the slivers, which are then dropped
    digits = int(np.ceil(-np.log10(max(float(mesh.edges_unique_length.mean()) / 100, 1e-12))))
    mesh.merge_vertices(digits_vertex=digits)
    mesh.update_faces(mesh.nondegenerate_faces(height=1e-12))
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        biggest = max(len(p.faces) for p in parts)
        kept = [p for p in parts if len(p.faces) >= min_component_ratio * biggest]
        log.info("kept %d of %d mesh components", len(kept), len(parts))
        mesh = trimesh.util.concatenate(kept)
    if max_faces and len(mesh.faces) > max_faces:
        mesh = mesh.simplify_quadric_decimation(face_count=int(max_faces))
    trimesh.repair.fix_normals(mesh, multibody=True)
    return mesh
