"""Analytic primitives (ellipsoids, boxes) and a vectorised torch ray caster for them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MISS = float("inf")


def rotation_xyz(degrees: tuple[float, float, float]) -> Tensor:
    """Local-to-world rotation R = Rz Ry Rx from Euler angles in degrees."""
    rx, ry, rz = (math.radians(a) for a in degrees)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (mz @ my @ mx).float()


@dataclass
class Primitives:
    """P primitives of one kind: centres [P,3], sizes [P,3] (radii or half extents),
    rotations [P,3,3] local->world, colours [P,3] in [0,1]."""

    centers: Tensor
    sizes: Tensor
    rotations: Tensor
    colors: Tensor

    @staticmethod
    def from_specs(specs: list[tuple]) -> "Primitives":
        """specs: (centre, size, euler_deg, colour) tuples."""
        if not specs:
            return Primitives(torch.zeros(0, 3), torch.ones(0, 3), torch.zeros(0, 3, 3), torch.zeros(0, 3))
        c, s, r, col = zip(*specs)
        return Primitives(torch.tensor(c).float(), torch.tensor(s).float(),
                          torch.stack([rotation_xyz(a) for a in r]), torch.tensor(col).float())


def _to_local(prims: Primitives, origins: Tensor, dirs: Tensor, scale: bool) -> tuple[Tensor, Tensor]:
    """Rays [N,3] into every primitive's frame at once, [N,P,3] each, as one matmul.

    local = (x - c) R / s (row vectors; s = 1 for boxes) = x @ M - c @ M with M = R / s per primitive.
    """
    m = prims.rotations / prims.sizes[:, None, :] if scale else prims.rotations  # [P,3,3]
    m_cat = m.permute(1, 0, 2).reshape(3, -1)  # [3, P*3]
    shift = torch.einsum("pj,pjk->pk", prims.centers, m).reshape(1, -1)
    n, p = origins.shape[0], m.shape[0]
    return (origins @ m_cat - shift).view(n, p, 3), (dirs @ m_cat).view(n, p, 3)


def intersect_ellipsoids(prims: Primitives, origins: Tensor, dirs: Tensor) -> Tensor:
    """Nearest positive hit distance [N,P] of each ray with each ellipsoid (inf on a miss)."""
    o, d = _to_local(prims, origins, dirs, scale=True)
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1
    disc = b * b - a * c
    t = (-b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc > 0) & (t > 0), t, torch.full_like(t, MISS))


def ellipsoid_normals(prims: Primitives, points: Tensor) -> Tensor:
    """World normals [N,3] at surface points [N,3] of ellipsoid i (prims already indexed per point)."""
    local = torch.einsum("nji,nj->ni", prims.rotations, points - prims.centers)
    return F.normalize(torch.einsum("nij,nj->ni", prims.rotations, local / prims.sizes ** 2), dim=-1)


def intersect_boxes(prims: Primitives, origins: Tensor, dirs: Tensor) -> Tensor:
    """Slab test against oriented boxes (sizes = half extents): distance [N,P], inf on a miss."""
    o, d = _to_local(prims, origins, dirs, scale=False)
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t1, t2 = (-prims.sizes - o) * inv, (prims.sizes - o) * inv
    t_near = torch.minimum(t1, t2).amax(-1)
    t_far = torch.maximum(t1, t2).amin(-1)
    return torch.where((t_far >= t_near) & (t_near > 0), t_near, torch.full_like(t_near, MISS))


def box_normals(prims: Primitives, points: Tensor) -> Tensor:
    """World normals [N,3] at surface points of box i: the face whose slab the point is closest to."""
    local = torch.einsum("nji,nj->ni", prims.rotations, points - prims.centers) / prims.sizes
    axis = local.abs().argmax(-1)
    local_n = F.one_hot(axis, 3).float() * torch.sign(local)
    return torch.einsum("nij,nj->ni", prims.rotations, local_n)


def _index(p: Primitives, idx: Tensor) -> Primitives:
    return Primitives(p.centers[idx], p.sizes[idx], p.rotations[idx], p.colors[idx])


def raycast(ellipsoids: Primitives, boxes: Primitives, origins: Tensor, dirs: Tensor, light_dir: Tensor,
            background: float = 1.0, ambient: float = 0.55) -> Tensor:
    """Shaded colour [N,3]: nearest hit, albedo * (ambient + (1-ambient) * max(0, n.l)), background on a miss."""
    n_ell = len(ellipsoids.centers)
    parts = []
    if n_ell:
        parts.append(intersect_ellipsoids(ellipsoids, origins, dirs))
    if len(boxes.centers):
        parts.append(intersect_boxes(boxes, origins, dirs))
    t_min, idx = torch.cat(parts, 1).min(1)
    hit = torch.isfinite(t_min)
    rgb = torch.full_like(origins, background)
    if not hit.any():
        return rgb
    idx, points = idx[hit], origins[hit] + t_min[hit].unsqueeze(-1) * dirs[hit]
    is_ell = idx < n_ell
    normals = torch.zeros_like(points)
    albedo = torch.zeros_like(points)
    if is_ell.any():
        sub = _index(ellipsoids, idx[is_ell])
        normals[is_ell], albedo[is_ell] = ellipsoid_normals(sub, points[is_ell]), sub.colors
    if (~is_ell).any():
        sub = _index(boxes, idx[~is_ell] - n_ell)
        normals[~is_ell], albedo[~is_ell] = box_normals(sub, points[~is_ell]), sub.colors
    shade = ambient + (1 - ambient) * (normals @ light_dir).clamp_min(0).unsqueeze(-1)
    rgb[hit] = albedo * shade
    return rgb
