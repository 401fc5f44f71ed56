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
    return place_unplaced(vertices, vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32))


def place_unplaced(vertices: np.ndarray, vmapping: np.ndarray, indices: np.ndarray, uvs: np.ndarray):
    """xatlas leaves sliver faces (near-zero area) unplaced, all three uvs at (0,0). Each gets three
    vertices of its own, all at the uv of the placed vertex nearest its centre: it takes the colour
    of the surface around it and stays a point in uv space. (Moving each vertex to its own nearest
    placed vertex would stretch a sliver across charts, over texels of other triangles, with a
    bounding box over most of the atlas.)"""
    unplaced = np.all(uvs[indices] == 0, axis=(1, 2))
    placed = np.unique(indices[~unplaced])
    if not unplaced.any() or not len(placed):
        return vmapping, indices, uvs
    from scipy.spatial import cKDTree

    xyz = vertices[vmapping]
    _, nearest = cKDTree(xyz[placed]).query(xyz[indices[unplaced]].mean(1))
    n_old, n_new = len(vmapping), 3 * int(unplaced.sum())
    vmapping = np.concatenate([vmapping, vmapping[indices[unplaced]].reshape(-1)])
    uvs = np.concatenate([uvs, np.repeat(uvs[placed[nearest]], 3, axis=0)])
    indices = indices.copy()
    indices[unplaced] = np.arange(n_old, n_old + n_new).reshape(-1, 3)
    return vmapping, indices, uvs


def face_texel_boxes(uv: Tensor, faces: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per face: the texel-centre triangle [F,3,2], the lower corner of its texel bounding box [F,2]
    and the box's extent [F,2] (texels)."""
    tri = uv[faces] * size - 0.5  # texel-centre coordinates
    lo = tri.min(1).values.floor().clamp(0, size - 1).long()
    hi = tri.max(1).values.ceil().clamp(0, size - 1).long()
    return tri, lo, hi - lo + 1


def rasterize_uv(uv: Tensor, faces: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """All texel centres covered by a triangle in UV space: (texel ids [M], face ids [M], barycentrics [M,3]).

    Vectorised: each triangle enumerates the texels of its bounding box (repeat_interleave over
    variable counts), and a barycentric test keeps those inside. Memory grows with the boxes' total
    area: bake_texture calls this on face chunks whose boxes stay under a texel budget.
    """
    tri, lo, extent = face_texel_boxes(uv, faces, size)
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


def face_chunks(uv: Tensor, faces: Tensor, size: int, texel_budget: int) -> list[tuple[int, int]]:
    """Consecutive face ranges [start, end) whose texel boxes add up to at most texel_budget each
    (a single face over the budget gets a range of its own)."""
    _, _, extent = face_texel_boxes(uv, faces, size)
    total = torch.cumsum(extent[:, 0] * extent[:, 1], 0)
    bounds, start = [], 0
    while start < len(faces):
        before = int(total[start - 1]) if start else 0
        end = int(torch.searchsorted(total, before + texel_budget, right=True))
        end = max(end, start + 1)
        bounds.append((start, end))
        start = end
    return bounds


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
                 size: int = 1024, chunk_size: int = 262144, texel_budget: int = 1 << 22) -> np.ndarray:
    """[size,size,3] uint8 texture (row 0 = v=1, image convention) of albedo_fn at each texel's 3D point.

    Faces are baked in chunks whose candidate texels stay under `texel_budget`, so peak memory is the
    texture plus one chunk (about 100 bytes per candidate texel), whatever the mesh size.
    """
    uv, f = torch.from_numpy(uvs), torch.from_numpy(faces)
    verts = torch.from_numpy(vertices).float()
    tex = torch.zeros(size * size, 3)
    filled = torch.zeros(size * size, dtype=torch.bool)
    for start, end in face_chunks(uv, f, size, texel_budget):
        texel, face_ids, bary = rasterize_uv(uv, f[start:end], size)
        points = (verts[f[start:end][face_ids]] * bary.unsqueeze(-1)).sum(1)
        for i in range(0, len(points), chunk_size):
            tex[texel[i:i + chunk_size]] = albedo_fn(points[i:i + chunk_size]).float().cpu()
        filled[texel] = True
    tex = dilate(tex.reshape(size, size, 3), filled.reshape(size, size))
    return (tex.flip(0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
