"""Volume rendering of a density/albedo field through nerfacc.

CUDA: nerfacc's OccGridEstimator marches rays and skips empty space. CPU: stratified samples inside
the ray/box intersection, computed in torch; with skip_empty, samples in cells that nerfacc's
occupancy grid marks empty are not evaluated (density 0), as the CUDA marcher would skip them.
Either way the samples end up as one packed list (ray index, interval) and go through the same
shading and nerfacc compositing, so both backends give the same outputs. The renderer knows nothing
of prompts or guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perpneg3d.cameras import CameraBatch
from perpneg3d.contracts import RaySamples
from perpneg3d.errors import ConfigError
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer import nerfacc_cuda
from perpneg3d.validation import NonNegativeFloat, PositiveFloat, PositiveInt, validated


@dataclass
class RenderOutput:
    """Images of one camera batch. rgb [B,H,W,3] in [0,1] over the background; opacity, depth,
    z_variance [B,H,W,1]; normal [B,H,W,3] (world, composited; None unless asked for); orientation
    [B,H,W,1] sum_i w_i max(0, n_i . d)^2 with detached weights (None without normals); mesh: (vertices,
    faces) a rasterizing renderer drew (None for a volume), for the surface's regularisers."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    z_variance: Tensor
    normal: Tensor | None = None
    orientation: Tensor | None = None
    num_samples: int = 0
    mesh: tuple[Tensor, Tensor] | None = None


def ray_box_intersection(origins: Tensor, dirs: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry/exit distances [R] of rays with the box [-radius, radius]^3 (equal where they miss)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t1, t2 = (-radius - origins) * inv, (radius - origins) * inv
    near = torch.minimum(t1, t2).amax(-1).clamp_min(0)
    far = torch.maximum(t1, t2).amin(-1)
    return near, torch.maximum(far, near)


def ensure_samples(ray_ids: Tensor, t_starts: Tensor, t_ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packed samples with at least one entry: when the marcher returns none (every ray misses the
    occupied cells), one zero-length interval on ray 0 keeps the compositing and the backward pass
    well-defined; it has zero weight (as threestudio's validate_empty_rays). Shapes are known on the
    host, so the check costs no synchronisation."""
    if ray_ids.numel() > 0:
        return ray_ids, t_starts, t_ends
    return ray_ids.new_zeros(1), t_starts.new_zeros(1), t_ends.new_zeros(1)


class ShadedRenderer(nn.Module):
    """What every renderer shares: a material that picks the step's shading and shades, and a background whose
    parameters train (renderer.background). The volume, mesh and splatting renderers derive from it."""

    def __init__(self, background: nn.Module, material):
        super().__init__()
        self.background, self.material = background, material

    def param_groups(self) -> dict[str, list]:
        """Trainable parameters by name (renderer.<name> in trainer.learning_rates)."""
        return {"background": list(self.background.parameters())}

    def choose_shading(self, step: int, generator: torch.Generator) -> str:
        """This step's shading, from the material (the trainer never reaches into it)."""
        return self.material.choose_shading(step, generator)


class VolumeRenderer(ShadedRenderer):
    """Renders `geometry` (density(points), forward(points) -> density, albedo, normals(points)).

    estimator: "auto" (occgrid on CUDA when nerfacc's kernels load, else stratified), "occgrid", "stratified".
    render_step_size: occgrid marching step; None -> 1.732 * 2 * radius / 512.
    skip_empty: keep an occupancy grid for the stratified sampler too and skip samples in empty cells.
    """

    @validated("renderer")
    def __init__(self, background: nn.Module, material, radius: PositiveFloat = 2.0, num_samples_per_ray: PositiveInt = 64,
                 estimator: str = "auto", grid_resolution: PositiveInt = 32, render_step_size: PositiveFloat | None = None,
                 occ_update_every: PositiveInt = 16, occ_threshold: NonNegativeFloat = 0.01,
                 near_plane: NonNegativeFloat = 0.0, chunk_rays: PositiveInt = 16384,
                 normal_weight_threshold: NonNegativeFloat = 1e-4, skip_empty: bool = True):
        super().__init__(background, material)
        if estimator not in ("auto", "occgrid", "stratified"):
            raise ConfigError(f"renderer.estimator={estimator!r}: use auto, occgrid or stratified")
        self.radius, self.num_samples = radius, num_samples_per_ray
        self.step_size = render_step_size or 1.732 * 2 * radius / 512
        self.occ_update_every, self.occ_threshold, self.near_plane = occ_update_every, occ_threshold, near_plane
        self.chunk_rays, self.normal_weight_threshold = chunk_rays, normal_weight_threshold
        if estimator == "occgrid" and not nerfacc_cuda.available():
            raise ConfigError(f"renderer.estimator=occgrid needs nerfacc's CUDA kernels ({nerfacc_cuda.probe().reason}): "
                              "use estimator=auto or stratified (docs/gpu.md says how to build them)")
        self.use_marcher = estimator == "occgrid" or (estimator == "auto" and nerfacc_cuda.available())
        self.estimator = None
        if self.use_marcher or skip_empty:
            from nerfacc import OccGridEstimator

            aabb = torch.tensor([-radius] * 3 + [radius] * 3, dtype=torch.float32)
            self.estimator = OccGridEstimator(roi_aabb=aabb, resolution=grid_resolution, levels=1)

    @property
    def backend(self) -> str:
        if self.use_marcher:
            return "nerfacc occupancy-grid marcher (CUDA)"
        return "stratified" + (" + occupancy grid" if self.estimator is not None else "")

    def update(self, step: int, geometry) -> None:
        """Refresh the occupancy grid every occ_update_every steps (uses the global torch RNG)."""
        if self.estimator is None:
            return
        self.estimator.update_every_n_steps(
            step=step, occ_eval_fn=lambda x: geometry.density(x) * self.step_size,
            occ_thre=self.occ_threshold, n=self.occ_update_every)

    def _stratified(self, geometry, origins: Tensor, dirs: Tensor, generator: torch.Generator | None) -> RaySamples:
        """Packed samples of the torch backend: n stratified intervals inside each ray's box segment."""
        near, far = ray_box_intersection(origins, dirs, self.radius)
        ray_ids = torch.nonzero(far > near).squeeze(-1)
        if ray_ids.numel() == 0:  # every ray misses the box
            empty = origins.new_zeros(0)
            return RaySamples(ray_ids, empty, origins.new_zeros(0, 3), empty, origins.new_zeros(0, 3))
        n = self.num_samples
        edges = torch.linspace(0, 1, n + 1, device=origins.device)
        span = (far - near)[ray_ids].unsqueeze(-1)
        t_starts = near[ray_ids].unsqueeze(-1) + span * edges[:-1]
        t_ends = near[ray_ids].unsqueeze(-1) + span * edges[1:]
        jitter = 0.5
        if self.training and generator is not None:
            jitter = torch.rand(t_starts.shape, generator=generator, device=generator.device).to(origins.device)
        t_pos = t_starts + (t_ends - t_starts) * jitter
        points = origins[ray_ids].unsqueeze(1) + dirs[ray_ids].unsqueeze(1) * t_pos.unsqueeze(-1)
        flat = points.reshape(-1, 3)
        if self.estimator is not None:  # evaluate the field only in occupied cells
            res = self.estimator.binaries.shape[-1]
            cell = ((flat + self.radius) / (2 * self.radius) * res).long().clamp(0, res - 1)
            occupied = self.estimator.binaries[0, cell[:, 0], cell[:, 1], cell[:, 2]]
            keep = torch.nonzero(occupied).squeeze(-1)
            dens_keep, alb_keep = geometry(flat[keep])
            density = torch.zeros(flat.shape[0], device=flat.device, dtype=dens_keep.dtype).index_put((keep,), dens_keep)
            albedo = torch.zeros(flat.shape[0], 3, device=flat.device, dtype=alb_keep.dtype).index_put((keep,), alb_keep)
        else:
            density, albedo = geometry(flat)
        from nerfacc import render_weight_from_density

        weights = render_weight_from_density(t_starts, t_ends, density.reshape(t_starts.shape))[0]
        flat_ids = ray_ids.repeat_interleave(n)
        return RaySamples(flat_ids, t_pos.reshape(-1), flat, weights.reshape(-1), albedo)

    def _occgrid(self, geometry, origins: Tensor, dirs: Tensor) -> RaySamples:
        """Packed samples of the CUDA backend: nerfacc's occupancy-grid marching."""
        from nerfacc import render_weight_from_density

        def sigma_fn(t_starts, t_ends, ray_indices):
            mid = (t_starts + t_ends)[:, None] / 2
            return geometry.density(origins[ray_indices] + dirs[ray_indices] * mid)

        ray_ids, t_starts, t_ends = self.estimator.sampling(
            origins, dirs, sigma_fn=sigma_fn, near_plane=self.near_plane, render_step_size=self.step_size,
            stratified=self.training, alpha_thre=0.0)
        ray_ids, t_starts, t_ends = ensure_samples(ray_ids, t_starts, t_ends)
        t_pos = (t_starts + t_ends) / 2
        points = origins[ray_ids] + dirs[ray_ids] * t_pos[:, None]
        density, albedo = geometry(points)
        weights = render_weight_from_density(t_starts, t_ends, density, ray_indices=ray_ids, n_rays=origins.shape[0])[0]
        return RaySamples(ray_ids, t_pos, points, weights, albedo)

    def _render_rays(self, geometry, origins, dirs, lights, shading, with_normals, rng: RandomStreams | None) -> dict:
        from nerfacc import accumulate_along_rays

        n_rays = origins.shape[0]
        if self.use_marcher:
            samples = self._occgrid(geometry, origins, dirs)
        else:
            samples = self._stratified(geometry, origins, dirs, rng and rng.device)
        ray_ids, t_pos, points, weights, albedo = (samples.ray_ids, samples.t_pos, samples.points, samples.weights,
                                                   samples.albedo)
        need_normals = with_normals or self.material.needs_normals(shading)
        normals = None
        if need_normals:
            # normals only where a sample is visible: finite differences cost 6 density queries each; the
            # visible set's size is read on the host (a known sync, docs/gpu.md)
            keep = torch.nonzero(weights.detach() > self.normal_weight_threshold).squeeze(-1)  # known sync: normals
            normals = torch.zeros_like(points).index_put((keep,), geometry.normals(points[keep]))
        color = self.material.shade(albedo, normals, points, lights[ray_ids], shading)

        def acc(values: Tensor, w: Tensor = weights) -> Tensor:
            return accumulate_along_rays(w, values, ray_indices=ray_ids, n_rays=n_rays)

        out = {"rgb": acc(color), "opacity": acc(None), "depth": acc(t_pos[:, None])}
        depth_mean = (out["depth"] / out["opacity"].clamp_min(1e-6))[ray_ids]
        out["z_variance"] = acc((t_pos[:, None] - depth_mean) ** 2)
        if need_normals:
            out["normal"] = acc(normals)
            facing = (normals * dirs[ray_ids]).sum(-1, keepdim=True).clamp_min(0) ** 2
            out["orientation"] = acc(facing, weights.detach())
        out["rgb"] = out["rgb"] + (1 - out["opacity"]) * self.background(dirs, rng)
        out["num_samples"] = ray_ids.shape[0]
        return out

    def forward(self, geometry, cameras: CameraBatch, shading: str = "albedo", with_normals: bool = False,
                rng: RandomStreams | None = None) -> RenderOutput:
        """Render B cameras; `rng` (training) jitters samples and may randomise the background."""
        b, h, w = cameras.batch_size, cameras.height, cameras.width
        origins, dirs = (x.reshape(-1, 3) for x in cameras.rays())
        lights = cameras.light_position.repeat_interleave(h * w, dim=0)
        if self.training:
            parts = [self._render_rays(geometry, origins, dirs, lights, shading, with_normals, rng)]
        else:
            parts = [self._render_rays(geometry, origins[i:i + self.chunk_rays], dirs[i:i + self.chunk_rays],
                                       lights[i:i + self.chunk_rays], shading, with_normals, rng)
                     for i in range(0, origins.shape[0], self.chunk_rays)]
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "num_samples"}
        shaped = {k: v.reshape(b, h, w, -1) for k, v in merged.items()}
        return RenderOutput(num_samples=sum(p["num_samples"] for p in parts), **shaped)
