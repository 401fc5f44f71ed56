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
    """sdf [V] and deform [V,3] on a grid of `grid_resolution` cells per side over a box inside
    [-radius, radius]^3 (`bbox` [2,3], saved with the state). A vertex moves at most deform_scale grid cells
    (tanh-bounded, as in DMTet). sdf < 0 inside. Initially a sphere of init_radius on the whole box, until
    initialise_from() puts a coarse run's surface there, on a box fitted to it first (fit_grid(): the surface's
    bounding box plus fit_margin of its extent on each side, as threestudio's coarse-to-fine isosurface box;
    null keeps the whole box), so that the grid's cells land on the object. The signed distance is clamped to
    [-sdf_clamp, sdf_clamp] there: a coarse density of 15 would otherwise take a vertex hundreds of steps to
    change sign (docs/method.md). init_level: the coarse density level a refine run starts from (a number;
    "silhouette": the level whose silhouettes best match the coarse renders; "export": the coarse run's
    export threshold), read by perpneg3d.training.refine."""

    @validated("geometry")
    def __init__(self, color_field: nn.Module, radius: PositiveFloat = 1.0, grid_resolution: PositiveInt = 128,
                 deform_scale: NonNegativeFloat = 0.25, init_radius: PositiveFloat = 0.5,
                 init_level: float | str = "silhouette", fit_margin: NonNegativeFloat | None = 0.1,
                 sdf_clamp: PositiveFloat = 1.0):
        super().__init__()
        if isinstance(init_level, str) and init_level not in ("silhouette", "export"):
            raise ConfigError(f"geometry.init_level={init_level!r}: use silhouette, export or a density value")
        self.init_level, self.fit_margin, self.sdf_clamp = init_level, fit_margin, sdf_clamp
        grid = cached_tet_grid(grid_resolution, 1.0)
        self.radius, self.grid_resolution, self.deform_scale = radius, grid_resolution, deform_scale
        self.register_buffer("unit_vertices", grid.vertices, persistent=False)  # [-1, 1]^3, scaled to bbox
        self.register_buffer("tets", grid.tets, persistent=False)
        self.register_buffer("bbox", self.whole_box(grid.vertices.device))
        self.sdf = nn.Parameter(self.grid_vertices.norm(dim=-1) - init_radius)
        self.deform = nn.Parameter(torch.zeros_like(grid.vertices))
        self.color_field = color_field

    def whole_box(self, device) -> Tensor:
        """[2,3] the box [-radius, radius]^3 (before fit_grid, and in checkpoints made before it existed)."""
        return torch.tensor([-self.radius, self.radius], device=device).unsqueeze(-1).expand(2, 3).contiguous()

    @property
    def grid_vertices(self) -> Tensor:
        """[V,3] the undeformed grid over bbox."""
        centre, half = self.bbox.mean(0), (self.bbox[1] - self.bbox[0]) / 2
        return centre + half * self.unit_vertices

    def vertices(self) -> Tensor:
        """[V,3] the deformed grid."""
        cell = (self.bbox[1] - self.bbox[0]) / self.grid_resolution
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
        """Nothing: the stage has no coarse-to-fine band. The colour field keeps the hash-grid levels it came
        with (the coarse run's last, loaded by initialise_from; a resume's, from the checkpoint): restarting the
        coarse run's band from step 0 would switch its finest levels off again (threestudio's refine stages run
        without one)."""

    @torch.no_grad()
    def fit_grid(self, volume, level: float, probe: int = 64) -> None:
        """Fit bbox to the volume's surface at density `level`: the box of the points of a probe lattice
        (`probe` cells per side over [-radius, radius]^3) above the level, one probe cell wider (the surface
        lies between such a point and its neighbour), then fit_margin of its extent more on each side, within
        the whole box. The whole box where fit_margin is null or nothing is above the level."""
        self.bbox.copy_(self.whole_box(self.bbox.device))
        if self.fit_margin is None:
            return
        axis = torch.linspace(-self.radius, self.radius, probe + 1, device=self.bbox.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        inside = points[_chunked_density(volume, points) > level]
        if len(inside) == 0:  # a host read, once per refine run
            return
        cell = 2 * self.radius / probe
        lo, hi = inside.amin(0) - cell, inside.amax(0) + cell
        extent = hi - lo
        self.bbox.copy_(torch.stack([(lo - self.fit_margin * extent).clamp_min(-self.radius),
                                     (hi + self.fit_margin * extent).clamp_max(self.radius)]))

    @torch.no_grad()
    def initialise_from(self, volume, threshold: float, density: Tensor | None = None) -> None:
        """The coarse run's surface and colour: sdf = threshold - density at the grid vertices (the level set of
        `threshold`), clamped to [-sdf_clamp, sdf_clamp], and the volume's state into the colour field when
        they are the same kind. density: the volume's density at grid_vertices when already computed
        (grid_density(), on the grid as fit_grid() left it)."""
        density = self.grid_density(volume) if density is None else density
        self.sdf.copy_((threshold - density.to(self.sdf)).clamp(-self.sdf_clamp, self.sdf_clamp))
        self.deform.zero_()
        if type(volume) is type(self.color_field):
            self.color_field.load_state_dict(volume.state_dict())

    @torch.no_grad()
    def grid_density(self, volume, chunk: int = 262144) -> Tensor:
        """[V] a volume's density at the undeformed grid vertices."""
        return _chunked_density(volume, self.grid_vertices, chunk)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint made before the grid was fitted has no bbox: its grid spanned the whole box
        state_dict.setdefault(prefix + "bbox", self.whole_box(self.bbox.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _chunked_density(volume, points: Tensor, chunk: int = 262144) -> Tensor:
    """[N] a volume's density at points [N,3], `chunk` points at a time, in float32."""
    return torch.cat([volume.density(points[i:i + chunk]).float() for i in range(0, len(points), chunk)])


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
