"""The training camera distribution (threestudio's random-camera defaults for DreamFusion)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from perpneg3d.cameras.camera_batch import CameraBatch, look_at, spherical_position, wrap_azimuth
from perpneg3d.errors import require
from perpneg3d.validation import (
    AzimuthRange,
    ElevationRange,
    FovRange,
    Milestones,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    PositiveRange,
    Probability,
    validated,
)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


class RandomCameras:
    """Samples B cameras per step.

    Azimuth covers the full circle stratified across the batch (one random offset, B equal strata);
    elevation, distance and fovy are uniform in their ranges; the pose gets small random perturbations
    (camera position, look-at centre, up vector); the light sits near the camera direction at
    light_distance_range. The render size steps through `heights`/`widths` at `resolution_milestones`.
    progressive_until > 0 is an azimuth curriculum (threestudio's `progressive_until`): the azimuth range
    grows linearly from the front view (0) to azimuth_range by that step, r = min(1, step / (N + 1)).
    views_per_group = f > 1 (a multi-view prior, MVDream: f = 4) draws B / f groups of f consecutive cameras: each
    group one start azimuth (stratified across the groups), elevation, distance, fov and pose perturbation, its
    views at the start plus 0, 360/f, 2 * 360/f, ... degrees; each camera its own light.
    """

    @validated("cameras")
    def __init__(
        self,
        batch_size: PositiveInt = 1,
        heights: Sequence[PositiveInt] = (64,),
        widths: Sequence[PositiveInt] | None = None,
        resolution_milestones: Milestones = (),
        distance_range: PositiveRange = (1.5, 2.0),
        fovy_range: FovRange = (40.0, 70.0),
        elevation_range: ElevationRange = (-10.0, 45.0),
        azimuth_range: AzimuthRange = (-180.0, 180.0),
        stratified_azimuth: bool = True,
        camera_perturb: NonNegativeFloat = 0.1,
        center_perturb: NonNegativeFloat = 0.2,
        up_perturb: NonNegativeFloat = 0.02,
        light_distance_range: PositiveRange = (0.8, 1.5),
        light_position_perturb: NonNegativeFloat = 1.0,
        elevation_sphere_prob: Probability = 0.0,  # earlier runs: angle only; configs set 0.5 (threestudio)
        progressive_until: NonNegativeInt = 0,
        views_per_group: PositiveInt = 1,
    ):
        heights, widths = list(heights), list(widths or heights)
        require(batch_size % views_per_group == 0,
                f"cameras.batch_size={batch_size} must be a multiple of cameras.views_per_group={views_per_group} "
                f"(whole groups of views): use cameras.batch_size={views_per_group * max(1, batch_size // views_per_group)}")
        require(len(heights) == len(widths) == len(resolution_milestones) + 1,
                f"cameras: {len(heights)} heights need {len(heights) - 1} resolution_milestones, got {list(resolution_milestones)}")
        self.batch_size, self.heights, self.widths = batch_size, heights, widths
        self.milestones = list(resolution_milestones)
        self.distance_range, self.fovy_range = tuple(distance_range), tuple(fovy_range)
        self.elevation_range, self.azimuth_range = tuple(elevation_range), tuple(azimuth_range)
        self.stratified_azimuth = stratified_azimuth
        self.camera_perturb, self.center_perturb, self.up_perturb = camera_perturb, center_perturb, up_perturb
        self.light_distance_range, self.light_position_perturb = tuple(light_distance_range), light_position_perturb
        self.elevation_sphere_prob, self.progressive_until = elevation_sphere_prob, progressive_until
        self.views_per_group = views_per_group

    def middle(self) -> tuple[float, float]:
        """(distance, fovy_deg) at the middle of the distribution: where a result is meant to be seen
        from (validation grids, turntables, CLIP's Janus renders, benchmark montages)."""
        return sum(self.distance_range) / 2, sum(self.fovy_range) / 2

    def azimuth_range_at(self, step: int) -> tuple[float, float]:
        """The azimuth range cameras are drawn from at `step`: the front view widening to azimuth_range."""
        lo, hi = self.azimuth_range
        if not self.progressive_until:
            return lo, hi
        r = min(1.0, step / (self.progressive_until + 1))
        return r * lo, r * hi

    def resolution(self, step: int) -> tuple[int, int]:
        idx = sum(step >= m for m in self.milestones)
        return int(self.heights[idx]), int(self.widths[idx])

    def sample_elevation(self, b: int, g: torch.Generator) -> torch.Tensor:
        """[b] elevations in degrees: uniform in angle, or (with probability elevation_sphere_prob per
        camera) uniform on the sphere's band, i.e. sin(elevation) uniform, as threestudio mixes them
        50/50 (it draws the choice once per batch; the marginal per camera is the same). The second
        draw is made only when the probability is above 0, so runs with 0 keep their random stream."""
        lo, hi = self.elevation_range
        u = torch.rand(b, generator=g, device=g.device)
        angle = lo + (hi - lo) * u
        if self.elevation_sphere_prob <= 0:
            return angle
        s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
        sphere = torch.rad2deg(torch.asin((s_lo + (s_hi - s_lo) * u).clamp(-1, 1)))
        pick = torch.rand(b, generator=g, device=g.device) < self.elevation_sphere_prob
        return torch.where(pick, sphere, angle)

    def sample(self, step: int, generator: torch.Generator) -> CameraBatch:
        """Cameras for training step `step`, drawn from `generator` on its own device (the training
        device in train.py: the cameras are made there, nothing is copied)."""
        b, g, dev, f = self.batch_size, generator, generator.device, self.views_per_group
        n = b // f  # groups (f = 1: every camera its own)
        lo, hi = self.azimuth_range_at(step)
        if self.stratified_azimuth:
            azimuth = lo + (hi - lo) * (torch.rand(1, generator=g, device=dev) + torch.arange(n, device=dev)) / n
        else:
            azimuth = _uniform(lo, hi, n, g)
        elevation = self.sample_elevation(n, g)
        distance = _uniform(*self.distance_range, n, g)
        fovy = _uniform(*self.fovy_range, n, g)
        shift = self.camera_perturb * (torch.rand(n, 3, generator=g, device=dev) * 2 - 1)
        center = self.center_perturb * torch.randn(n, 3, generator=g, device=dev)
        up = torch.tensor([0.0, 0.0, 1.0], device=dev).expand(n, 3) + self.up_perturb * torch.randn(n, 3, generator=g, device=dev)
        if f > 1:  # each group's values for its f views; the views 360/f degrees apart
            azimuth = (azimuth.unsqueeze(1) + torch.arange(f, device=dev) * (360.0 / f)).reshape(-1)
            elevation, distance, fovy, shift, center, up = (v.repeat_interleave(f, 0) for v in
                                                            (elevation, distance, fovy, shift, center, up))
        eye = spherical_position(azimuth, elevation, distance) + shift
        light_dir = F.normalize(eye + self.light_position_perturb * torch.randn(b, 3, generator=g, device=dev), dim=-1)
        light = light_dir * _uniform(*self.light_distance_range, b, g).unsqueeze(-1)
        height, width = self.resolution(step)
        return CameraBatch(
            c2w=look_at(eye, center, F.normalize(up, dim=-1)), fovy_deg=fovy, azimuth_deg=wrap_azimuth(azimuth),
            elevation_deg=elevation, distance=distance, light_position=light, height=height, width=width,
        )
