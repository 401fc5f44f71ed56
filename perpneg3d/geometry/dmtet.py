"""DMTet: a surface geometry for mesh refinement (Shen et al. 2021; Magic3D's and threestudio's second stage).

A signed distance and a bounded offset per vertex of a tetrahedral grid (tet_grid.py); the surface is their
zero level set by marching tetrahedra (marching_tets.py), differentiable in both. Colour comes from a field
of its own (`color_field`: any module with albedo(points), by default the hash-grid ImplicitVolume), which a
refine run inherits from the coarse run, as threestudio's geometry_convert_inherit_texture does. The regular-
isers follow threestudio's definitions: normal consistency, the mean over edges of 1 - cos between the
vertex normals at its ends; Laplacian smoothing, the mean distance of a vertex from its neighbours' mean.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from perpneg3d.errors import ConfigError
from perpneg3d.geometry.marching_tets import marching_tets, vertex_normals
from perpneg3d.geometry.tet_grid import cached_tet_grid
from perpneg3d.validation import NonNegativeFloat, PositiveFloat, PositiveInt, validated


class DMTetGeometry(nn.Module):
    """sdf [V] and deform [V,3] on a grid of `grid_resolution` cubes over [-radius, radius]^3. A vertex moves
    at most deform_scale grid cells (tanh-bounded, as in DMTet). sdf < 0 inside. Initially a sphere of
    init_radius, until initialise_from() puts a coarse run's surface there. init_level: the coarse density
    level a refine run starts from (a number; "silhouette": the level whose silhouettes best match the coarse
    renders; "export": the coarse run's export threshold), read by perpneg3d.training.refine."""

    @validated("geometry")
    def __init__(self, color_field: nn.Module, radius: PositiveFloat = 1.0, grid_resolution: PositiveInt = 128,
                 deform_scale: NonNegativeFloat = 0.25, init_radius: PositiveFloat = 0.5,
                 init_level: float | str = "silhouette"):
        super().__init__()
        if isinstance(init_level, str) and init_level not in ("silhouette", "export"):
            raise ConfigError(f"geometry.init_level={init_level!r}: use silhouette, export or a density value")
        self.init_level = init_level
        grid = cached_tet_grid(grid_resolution, radius)
        self.radius, self.grid_resolution, self.deform_scale = radius, grid_resolution, deform_scale
        self.register_buffer("grid_vertices", grid.vertices, persistent=False)
        self.register_buffer("tets", grid.tets, persistent=False)
        self.sdf = nn.Parameter(grid.vertices.norm(dim=-1) - init_radius)
        self.deform = nn.Parameter(torch.zeros_like(grid.vertices))
        self.color_field = color_field

    def vertices(self) -> Tensor:
        """[V,3] the deformed grid."""
        cell = 2 * self.radius / self.grid_resolution
        return self.grid_vertices + cell * self.deform_scale * torch.tanh(self.deform)

    def mesh(self) -> tuple[Tensor, Tensor]:
        """(vertices [M,3], faces [F,3]) of the surface, differentiable in sdf and deform."""
        return marching_tets(self.vertices(), self.tets, self.sdf)

    def albedo(self, points: Tensor) -> Tensor:
        return self.color_field.albedo(points)

    def regularizers(self, vertices: Tensor, faces: Tensor) -> dict[str, Tensor]:
        """normal_consistency and laplacian of a mesh (the one mesh() gave this step)."""
        return {"normal_consistency": normal_consistency(vertices, faces), "laplacian": laplacian_smoothness(vertices, faces)}

    def param_groups(self) -> dict[str, list]:
        groups = {"sdf": [self.sdf], "deform": [self.deform]}
        groups.update({f"color_{k}": v for k, v in self.color_field.param_groups().items()})
        return groups

    def update_step(self, step: int) -> None:
        self.color_field.update_step(step)

    @torch.no_grad()
    def initialise_from(self, volume, threshold: float, density: Tensor | None = None) -> None:
        """The coarse run's surface and colour: sdf = threshold - density at the grid vertices (the level set of
        `threshold`), and the volume's state into the colour field when they are the same kind. density: the
        volume's density at grid_vertices when already computed (grid_density())."""
        density = self.grid_density(volume) if density is None else density
        self.sdf.copy_(threshold - density.to(self.sdf))
        self.deform.zero_()
        if type(volume) is type(self.color_field):
            self.color_field.load_state_dict(volume.state_dict())

    @torch.no_grad()
    def grid_density(self, volume, chunk: int = 262144) -> Tensor:
        """[V] a volume's density at the undeformed grid vertices."""
        return torch.cat([volume.density(self.grid_vertices[i:i + chunk]).float()
                          for i in range(0, len(self.grid_vertices), chunk)])


def _edges(faces: Tensor) -> Tensor:
    """[E,2] the undirected edges of a triangle mesh, each once."""
    pairs = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(-1).values
    n = int(faces.max()) + 1 if faces.numel() else 1
    keys = torch.unique(pairs[:, 0] * n + pairs[:, 1])  # one integer per edge: a 1-D unique, not a row-wise one
    return torch.stack([keys // n, keys % n], -1)


def normal_consistency(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean over edges of 1 - cos(n_a, n_b), n the area-weighted vertex normals: 0 on a plane, large where
    the surface folds (threestudio's Mesh.normal_consistency)."""
    normals = vertex_normals(vertices, faces)
    edges = _edges(faces)
    return (1 - (normals[edges[:, 0]] * normals[edges[:, 1]]).sum(-1)).mean()


def laplacian_smoothness(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean over vertices of |v - mean of its neighbours| (the uniform Laplacian's length)."""
    edges = _edges(faces)
    both = torch.cat([edges, edges.flip(-1)])
    total = torch.zeros_like(vertices).index_add(0, both[:, 0], vertices[both[:, 1]])
    count = torch.zeros(vertices.shape[0], device=vertices.device).index_add(
        0, both[:, 0], torch.ones(both.shape[0], device=vertices.device)).clamp_min(1)
    return (vertices - total / count.unsqueeze(-1)).norm(dim=-1).mean()
