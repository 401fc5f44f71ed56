"""Marching tetrahedra: the zero level set of a signed distance on a tetrahedral grid, as a triangle mesh.

Vectorised over all tetrahedra, differentiable with respect to the vertex positions and the signed
distances (DMTet, Shen et al. 2021, section 3.2): a surface vertex on a grid edge (a, b) whose signed
distances change sign sits at the edge's linear zero crossing,
    p = (p_a * s_b - p_b * s_a) / (s_b - s_a),
one vertex per crossing edge, shared by every tetrahedron around that edge, so the mesh is closed wherever
the level set does not leave the grid. Convention: s < 0 inside. A tetrahedron with one vertex on one side
gives a triangle, two and two a quad (two triangles); each triangle is oriented so that its normal points
from the inside vertices to the outside ones.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

_EDGES = tuple(itertools.combinations(range(4), 2))  # the 6 edges of a tetrahedron, as local vertex pairs
_EDGE_INDEX = {pair: i for i, pair in enumerate(_EDGES)}


def _edge(a: int, b: int) -> int:
    return _EDGE_INDEX[(min(a, b), max(a, b))]


def _case_table() -> tuple[Tensor, Tensor]:
    """For each of the 16 inside/outside patterns of a tetrahedron's 4 vertices (bit i: vertex i inside):
    the local edges of up to 2 triangles [16,2,3] (-1: none) and the number of triangles [16]."""
    tris = torch.full((16, 2, 3), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for code in range(16):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris[code, 0] = torch.tensor([_edge(lone, o) for o in others])
            count[code] = 1
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            quad = [_edge(a, c), _edge(a, d), _edge(b, d), _edge(b, c)]  # a cycle around the quad
            tris[code, 0] = torch.tensor([quad[0], quad[1], quad[2]])
            tris[code, 1] = torch.tensor([quad[0], quad[2], quad[3]])
            count[code] = 2
    return tris, count


_TRIS, _COUNT = _case_table()


def marching_tets(vertices: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """(mesh vertices [M,3], faces [F,3] int64) of the zero level set of `sdf` [V] on the tetrahedra `tets`
    [T,4] over `vertices` [V,3]. Differentiable in `vertices` and `sdf`; empty tensors when nothing crosses."""
    device = vertices.device
    inside = sdf < 0
    occ = inside[tets]  # [T,4]
    n_inside = occ.sum(-1)
    crossing = (n_inside > 0) & (n_inside < 4)
    tets, occ = tets[crossing], occ[crossing]
    if tets.shape[0] == 0:
        return vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device)
    local = torch.tensor(_EDGES, device=device)  # [6,2]
    edge_vertices = tets[:, local]  # [T,6,2] global vertex ids of each tet's edges
    # one id per undirected global edge, so tets around an edge share its surface vertex
    lo, hi = edge_vertices.min(-1).values, edge_vertices.max(-1).values
    n_vertices = vertices.shape[0]
    keys = lo * n_vertices + hi
    codes = (occ.long() * (2 ** torch.arange(4, device=device))).sum(-1)  # [T]
    tris = _TRIS.to(device)[codes]  # [T,2,3] local edge ids, -1 where no triangle
    valid = tris[..., 0] >= 0  # [T,2]
    tet_ids = torch.arange(tets.shape[0], device=device).view(-1, 1).expand(-1, 2)[valid]
    face_edges = tris[valid]  # [F,3] local edges
    face_keys = keys[tet_ids.unsqueeze(-1), face_edges]  # [F,3] global edge keys
    unique_keys, face_vertex = torch.unique(face_keys, return_inverse=True)
    a, b = unique_keys // n_vertices, unique_keys % n_vertices
    s_a, s_b = sdf[a].unsqueeze(-1), sdf[b].unsqueeze(-1)
    points = (vertices[a] * s_b - vertices[b] * s_a) / (s_b - s_a)
    faces = face_vertex.view(-1, 3)
    # orient each triangle from the inside vertices of its tetrahedron towards the outside ones
    corners = vertices.detach()[tets[tet_ids]]  # [F,4,3]
    inner = occ[tet_ids].float().unsqueeze(-1)
    outward = (corners * (1 - inner)).sum(1) / (1 - inner).sum(1) - (corners * inner).sum(1) / inner.sum(1)
    tri = points.detach()[faces]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = (normal * outward).sum(-1) < 0
    faces = torch.where(flip.unsqueeze(-1), faces[:, [0, 2, 1]], faces)
    return points, faces


def mesh_area_volume(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Surface area and enclosed volume (divergence theorem: sum of v0 . (v1 x v2) / 6 over faces, positive
    for outward-oriented closed meshes)."""
    v0, v1, v2 = vertices[faces].unbind(1)
    cross = torch.linalg.cross(v1 - v0, v2 - v0)
    return cross.norm(dim=-1).sum() / 2, (v0 * torch.linalg.cross(v1, v2)).sum() / 6


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """[V,3] unit normals: the area-weighted sum of the adjacent faces' normals."""
    v0, v1, v2 = vertices[faces].unbind(1)
    face_normals = torch.linalg.cross(v1 - v0, v2 - v0)  # length = twice the area: area weighting
    normals = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(normals, dim=-1)
