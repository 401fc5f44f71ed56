"""Cameras in the project's convention (docs/conventions.md): z up, front faces +x, azimuth 0 looks at the front."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


def wrap_azimuth(azimuth_deg: Tensor) -> Tensor:
    """Wrap azimuths in degrees to (-180, 180] (docs/conventions.md): the one copy in perpneg3d."""
    return 180.0 - torch.remainder(180.0 - azimuth_deg, 360.0)


def spherical_position(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """r * (cos e cos a, cos e sin a, sin e) -> [B,3]."""
    a, e = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return distance.unsqueeze(-1) * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], -1)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """Camera-to-world [B,4,4] (OpenGL: the camera looks along its -z, +y up)."""
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], device=eye.device).expand_as(eye)
    forward = F.normalize(target - eye, dim=-1)
    right = F.normalize(torch.linalg.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, eye
    return c2w


@dataclass
class CameraBatch:
    """B pinhole cameras sharing one image size.

    c2w: [B,4,4] camera-to-world (OpenGL axes). fovy_deg: [B] vertical field of view in degrees.
    azimuth_deg, elevation_deg, distance: [B] the spherical coordinates prompts are chosen from
    (before any perturbation of the pose). light_position: [B,3] point light in world units.
    """

    c2w: Tensor
    fovy_deg: Tensor
    azimuth_deg: Tensor
    elevation_deg: Tensor
    distance: Tensor
    light_position: Tensor
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device) -> "CameraBatch":
        moved = {k: getattr(self, k).to(device) for k in ("c2w", "fovy_deg", "azimuth_deg", "elevation_deg", "distance", "light_position")}
        return replace(self, **moved)

    def __getitem__(self, index) -> "CameraBatch":
        keys = ("c2w", "fovy_deg", "azimuth_deg", "elevation_deg", "distance", "light_position")
        return replace(self, **{k: getattr(self, k)[index] for k in keys})

    def rays(self) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions, each [B,H,W,3], through pixel centres."""
        h, w, dev = self.height, self.width, self.device
        focal = 0.5 * h / torch.tan(torch.deg2rad(self.fovy_deg) / 2)  # [B]
        j = torch.arange(w, device=dev, dtype=self.c2w.dtype) + 0.5 - w / 2
        i = torch.arange(h, device=dev, dtype=self.c2w.dtype) + 0.5 - h / 2
        ii, jj = torch.meshgrid(i, j, indexing="ij")
        dirs = torch.stack([jj, -ii, -torch.ones_like(ii) * 1.0], -1)  # [H,W,3] at focal 1 scaled below
        dirs = dirs.unsqueeze(0).repeat(self.batch_size, 1, 1, 1)
        dirs[..., :2] = dirs[..., :2] / focal.view(-1, 1, 1, 1)
        world = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs)
        origins = self.c2w[:, :3, 3].view(-1, 1, 1, 3).expand_as(world)
        return origins, F.normalize(world, dim=-1)


def orbit_cameras(
    azimuth_deg: Tensor,
    elevation_deg: Tensor | float,
    distance: float,
    fovy_deg: float,
    height: int,
    width: int | None = None,
) -> CameraBatch:
    """Cameras on a sphere looking at the origin, light at the camera (validation, turntables)."""
    az = azimuth_deg.float()
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).expand_as(az).clone()
    dist = torch.full_like(az, float(distance))
    eye = spherical_position(az, el, dist)
    return CameraBatch(
        c2w=look_at(eye, torch.zeros_like(eye)), fovy_deg=torch.full_like(az, float(fovy_deg)),
        azimuth_deg=az, elevation_deg=el, distance=dist, light_position=eye * 1.0,
        height=height, width=width or height,
    )


def fovy_to_focal(fovy_deg: float, height: int) -> float:
    return 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
