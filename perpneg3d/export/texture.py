"""UV texture baking on the CPU: xatlas unwraps, every texel inside a triangle gets the field's albedo."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 4):
    """xatlas atlas -> (vertex map into the old vertices, new faces, uv in [0,1]); charts are packed
    `padding` texels apart so baked colours never bleed from one chart into another."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.padding, pack.resolution, pack.bilinear = padding, texture_size, True
    atlas.generate(pack_options=pack)
    vmapping, indices, uvs = atlas[0]
    vmapping, indices, uvs = vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32)
    # xatlas leaves sliver faces (near-zero area) unplaced at uv (0,0); give their vertices the uv of
    # the nearest placed vertex so they take the colour of the surface around them
    unplaced = np.all(uvs[indices] == 0, axis=(1, 2))
    if unplaced.any():
        from scipy.spatial import cKDTree

        placed = np.unique(indices[~unplaced])
        lost = np.setdiff1d(np.unique(indices[unplaced]), placed)
        if len(lost) and len(placed):
            xyz = vertices[vmapping]
            _, nearest = cKDTree(xyz[placed]).query(xyz[lost])
            uvs[lost] = uvs[placed[nearest]]
    return vmapping, indices, uvs


def rasterize_uv(uv: Tensor, faces: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """All texel centres covered by a triangle in UV space: (texel ids [M], face ids [M], barycentrics [M,3]).

    Vectorised: each triangle enumerates the texels of its bounding box (repeat_interleave over
    variable counts), and a barycentric test keeps those inside.
    """
    tri = uv[faces] * size - 0.5  # [F,3,2] in texel-centre coordinates
    lo = tri.min(1).values.floor().clamp(0, size - 1).long()
    hi = tri.max(1).values.ceil().clamp(0, size - 1).long()
    extent = hi - lo + 1
    counts = extent[:, 0] * extent[:, 1]
    face_ids = torch.repeat_interleave(torch.arange(len(faces)), counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum())) - start[face_ids]
    px = lo[face_ids, 0] + local % extent[face_ids, 0]
    py = lo[face_ids, 1] + local // extent[face_ids, 0]
    p = torch.stack([px, py], -1).float()
    a, b, c = tri[face_ids, 0], tri[face_ids, 1], tri[face_ids, 2]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    bary = torch.stack([1 - w1 - w2, w1, w2], -1)
    inside = (bary >= -1e-4).all(-1)
    return (py * size + px)[inside], face_ids[inside], bary[inside]


def dilate(texture: Tensor, filled: Tensor, iterations: int = 2) -> Tensor:
    """Grow filled texels into empty neighbours so bilinear lookups at chart borders do not bleed."""
    tex, mask = texture.permute(2, 0, 1).unsqueeze(0), filled.float()[None, None]
    kernel = torch.ones(1, 1, 3, 3)
    for _ in range(iterations):
        total = F.conv2d(tex * mask, kernel.repeat(3, 1, 1, 1), padding=1, groups=3)
        count = F.conv2d(mask, kernel, padding=1)
        grown = (count > 0) & (mask == 0)
        tex = torch.where(grown, total / count.clamp_min(1), tex)
        mask = torch.where(grown, torch.ones_like(mask), mask)
    return tex[0].permute(1, 2, 0)


def bake_texture(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, albedo_fn: Callable[[Tensor], Tensor],
                 size: int = 1024, chunk_size: int = 262144) -> np.ndarray:
    """[size,size,3] uint8 texture (row 0 = v=1, image convention) of albedo_fn at each texel's 3D point."""
    uv, f = torch.from_numpy(uvs), torch.from_numpy(faces)
    texel, face_ids, bary = rasterize_uv(uv, f, size)
    points = (torch.from_numpy(vertices).float()[f[face_ids]] * bary.unsqueeze(-1)).sum(1)
    colors = torch.cat([albedo_fn(points[i:i + chunk_size]).float().cpu() for i in range(0, len(points), chunk_size)]) \
        if len(points) else torch.zeros(0, 3)
    tex = torch.zeros(size * size, 3)
    filled = torch.zeros(size * size, dtype=torch.bool)
    tex[texel], filled[texel] = colors, True
    tex = dilate(tex.reshape(size, size, 3), filled.reshape(size, size))
    return (tex.flip(0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
