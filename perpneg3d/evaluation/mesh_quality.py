"""What makes a mesh usable in Blender, measured: pieces, non-manifold edges, watertightness, faces, smoothness;
and any triangle mesh as a Surface, so a coarse run's marching-cubes export and a refined DMTet are rendered,
classified and compared the same way (scripts/bench_refine.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def mesh_quality(mesh) -> dict:
    """A trimesh.Trimesh's components, non-manifold edges (used by other than two faces), watertightness, face
    count, and the mean angle in degrees between the normals of faces that share an edge (0 on a plane; the
    angle normal consistency penalises)."""
    edges = np.sort(mesh.edges, axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    angles = np.degrees(mesh.face_adjacency_angles) if len(mesh.face_adjacency) else np.zeros(1)
    return dict(components=len(mesh.split(only_watertight=False)), non_manifold_edges=int((uses != 2).sum()),
                watertight=bool(mesh.is_watertight), faces=int(len(mesh.faces)), mean_normal_angle_deg=float(angles.mean()))


class MeshSurface(nn.Module):
    """A fixed triangle mesh (world units) coloured by a field's albedo(): the Surface contract without
    trainable parameters or regularisers."""

    def __init__(self, vertices: Tensor, faces: Tensor, color_field: nn.Module, radius: float):
        super().__init__()
        self.register_buffer("vertices_", vertices.float())
        self.register_buffer("faces_", faces.long())
        self.color_field, self.radius = color_field, radius

    @classmethod
    def from_trimesh(cls, mesh, color_field: nn.Module, radius: float) -> "MeshSurface":
        return cls(torch.as_tensor(np.asarray(mesh.vertices)), torch.as_tensor(np.asarray(mesh.faces)), color_field, radius)

    def mesh(self) -> tuple[Tensor, Tensor]:
        return self.vertices_, self.faces_

    def albedo(self, points: Tensor) -> Tensor:
        return self.color_field.albedo(points)

    def regularizers(self, vertices: Tensor, faces: Tensor) -> dict[str, Tensor]:
        return {}

    def param_groups(self) -> dict[str, list]:
        return {}

    def update_step(self, step: int) -> None:
        """Nothing changes with the step."""
