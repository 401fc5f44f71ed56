"""Splatting renderer: 3D Gaussians (a contracts.GaussianField) seen from a CameraBatch, as the same RenderOutput
the volume and mesh renderers give (issue 30; docs/architecture.md, "Gaussian splatting").

Two paths (renderer.rasterizer): gsplat's CUDA rasterization for Gaussians on CUDA when gsplat is installed and
its kernels build ("auto", or "gsplat" to require it; perpneg3d/renderer/gsplat_rasterizer.py), else the torch path,
written for this project (the CPU's: gsplat's pixel compositing runs in CUDA only):

- projection (EWA splatting, Zwicker et al. 2002, as 3D Gaussian splatting, Kerbl et al. 2023): a Gaussian of
  world covariance R S S R^T, in the camera's frame W (R S S R^T) W^T, becomes on the image
  J W R S S R^T W^T J^T + eps2d I, with J the Jacobian of the pinhole projection at its mean (x/z and y/z clamped
  to 1.3 times the image's half-width, as gsplat does, so Gaussians far outside the view cannot blow up) and
  eps2d = 0.3 px^2 the low-pass filter of 3DGS and gsplat;
- pixels: the project's pinhole (OpenGL axes, docs/conventions.md) with pixel (row i, column j) centred on
  CameraBatch.rays()' ray through it, row 0 at the top;
- compositing: each Gaussian's alpha at a pixel centre within 3 standard deviations of its mean along x and y,
  opacity * exp(-d^T Sigma^-1 d / 2), capped at 0.99 and dropped below 1/255 (gsplat's rules), blended front to
  back in the order of the means' depths: C = sum_i c_i a_i prod_{j<i} (1 - a_j), opacity = 1 - prod_i (1 - a_i),
  depth the same blend of the means' distances; the background fills 1 - opacity (composite()).

Shading: a Gaussian's normal (for lambertian / textureless shading and the normal image) is its shortest axis,
turned towards the camera; its colour is shaded once per camera, then blended.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from perpneg3d.cameras.camera_batch import CameraBatch
from perpneg3d.contracts import Gaussians
from perpneg3d.errors import ConfigError
from perpneg3d.geometry.gaussians import quaternion_to_matrix
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer import gsplat_rasterizer
from perpneg3d.renderer.volume_renderer import RenderOutput, ShadedRenderer
from perpneg3d.validation import NonNegativeFloat, PositiveFloat, validated

log = logging.getLogger(__name__)
ALPHA_MAX, ALPHA_MIN = 0.99, 1.0 / 255.0
RASTERIZERS = ("auto", "torch", "gsplat")
CLAMP_FOV = 1.3  # the Jacobian's x/z, y/z limit in half-widths of the image (gsplat's)


def focal_length(cameras: CameraBatch) -> Tensor:
    """[B] focal length in pixels (the same for x and y: square pixels, CameraBatch.rays())."""
    return 0.5 * cameras.height / torch.tan(torch.deg2rad(cameras.fovy_deg) / 2)


def project(gaussians: Gaussians, cameras: CameraBatch, eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """Means on the image [B,N,2] (x = column, y = row, pixel centres at integers), image covariances [B,N,2,2]
    (pixels^2, low-pass filter included) and depths [B,N] (distance in front of the camera along its axis)."""
    w2c = torch.linalg.inv(cameras.c2w)  # [B,4,4]
    rot = w2c[:, :3, :3]
    cam = torch.einsum("bij,nj->bni", rot, gaussians.means) + w2c[:, None, :3, 3]  # [B,N,3], OpenGL: looks down -z
    depth = -cam[..., 2]
    safe = depth.clamp_min(1e-6)
    f = focal_length(cameras).view(-1, 1)
    cx, cy = cameras.width / 2 - 0.5, cameras.height / 2 - 0.5
    x, y = cam[..., 0], cam[..., 1]
    mean2d = torch.stack([f * x / safe + cx, -f * y / safe + cy], -1)
    # the Jacobian of (column, row) with respect to the camera-frame point, at the (clamped) mean
    lim_x = CLAMP_FOV * (cameras.width / 2) / f
    lim_y = CLAMP_FOV * (cameras.height / 2) / f
    tx = torch.maximum(torch.minimum(x / safe, lim_x), -lim_x) * safe
    ty = torch.maximum(torch.minimum(y / safe, lim_y), -lim_y) * safe
    zero = torch.zeros_like(safe)
    jac = torch.stack([torch.stack([f / safe, zero, f * tx / safe ** 2], -1),
                       torch.stack([zero, -f / safe, -f * ty / safe ** 2], -1)], -2)  # [B,N,2,3]
    axes = quaternion_to_matrix(gaussians.rotations) * gaussians.scales.unsqueeze(-2)  # R S: [N,3,3]
    cov3 = axes @ axes.transpose(-1, -2)  # R S S R^T
    t = jac @ rot.unsqueeze(1)  # J W: [B,N,2,3]
    cov2d = t @ cov3.unsqueeze(0) @ t.transpose(-1, -2)
    cov2d = cov2d + eps2d * torch.eye(2, device=cov2d.device, dtype=cov2d.dtype)
    return mean2d, cov2d, depth


def normals_towards(gaussians: Gaussians, eyes: Tensor) -> Tensor:
    """[B,N,3] each Gaussian's shortest axis, turned to face the camera at eyes [B,3]."""
    axes = quaternion_to_matrix(gaussians.rotations)  # [N,3,3], columns the axes
    shortest = gaussians.scales.argmin(-1)  # [N]
    normal = axes.gather(2, shortest.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(-1)  # [N,3]
    facing = ((eyes.unsqueeze(1) - gaussians.means.unsqueeze(0)) * normal.unsqueeze(0)).sum(-1, keepdim=True)
    return torch.where(facing < 0, -normal, normal).expand(eyes.shape[0], -1, -1)


def conic_and_radius(cov2d: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse image covariances as (a, b, c) of a x^2 + 2 b x y + c y^2 [...,3], and each footprint's
    radius, 3 standard deviations along its longest axis [...] (gsplat's, with its 0.1 floor under the
    eigenvalues' spread)."""
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det = a * c - b * b
    conic = torch.stack([c, -b, a], -1) / det.unsqueeze(-1)
    mid = 0.5 * (a + c)
    largest = mid + (mid * mid - det).clamp_min(0.1).sqrt()
    return conic, 3.0 * largest.sqrt()


def composite(mean2d: Tensor, cov2d: Tensor, depth: Tensor, opacities: Tensor, features: Tensor, height: int,
              width: int, near: float) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha blending at every pixel centre: (blended features [B,H,W,C], opacity [B,H,W,1]).
    features [B,N,C] (colours, depths, normals, ...); Gaussians nearer than `near` draw nothing.

    Each Gaussian draws only the pixel centres within its radius (3 standard deviations, as gsplat's bounding
    box) along x and y: the (Gaussian, pixel) pairs inside are gathered, sorted by pixel and then depth, and the
    transmittance in front of each pair is the exclusive sum of log(1 - alpha) over its pixel's earlier pairs
    (a cumulative sum in float64, restarted at each pixel), so the cost grows with the Gaussians' footprints,
    not Gaussians x pixels."""
    b, n = depth.shape
    conic, radius = conic_and_radius(cov2d)
    live = (depth > near) & (opacities.unsqueeze(0) > 0)
    # window half-width around the nearest pixel centre: radius + 0.5 covers every centre within radius of the mean
    reach = int(math.ceil(float(radius.detach()[live].max()) + 0.5)) if bool(live.any()) else 0  # the CPU path's host read
    reach = min(reach, max(height, width))
    steps = torch.arange(-reach, reach + 1, device=depth.device, dtype=mean2d.dtype)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).view(1, 1, -1, 2)  # [1,1,K,2]
    centres = mean2d.detach().round().unsqueeze(2) + offsets  # [B,N,K,2] pixel centres near each mean
    d = centres - mean2d.unsqueeze(2)
    inside = ((centres[..., 0] >= 0) & (centres[..., 0] <= width - 1) & (centres[..., 1] >= 0)
              & (centres[..., 1] <= height - 1) & (d.detach().abs() <= radius.unsqueeze(-1).unsqueeze(-1)).all(-1)
              & live.unsqueeze(-1))
    power = -0.5 * (conic[..., 0:1] * d[..., 0] ** 2 + 2 * conic[..., 1:2] * d[..., 0] * d[..., 1]
                    + conic[..., 2:3] * d[..., 1] ** 2)
    alpha = (opacities.view(1, n, 1) * power.clamp_max(0).exp()).clamp_max(ALPHA_MAX)
    keep = inside & (alpha.detach() >= ALPHA_MIN)
    bi, gi, ki = keep.nonzero(as_tuple=True)
    pixel = (bi * height + centres[bi, gi, ki, 1].long()) * width + centres[bi, gi, ki, 0].long()
    rank = depth.detach().argsort(1).argsort(1)[bi, gi]  # each Gaussian's place front to back in its camera
    order = (pixel * n + rank).argsort()
    pixel, a = pixel[order], alpha[bi, gi, ki][order]
    feats = features[bi, gi][order]
    log_clear = torch.log1p(-a.double())
    before = torch.cumsum(log_clear, 0) - log_clear  # sum over every earlier pair, all pixels
    first = torch.ones_like(pixel, dtype=torch.bool)
    first[1:] = pixel[1:] != pixel[:-1]
    start = torch.where(first, torch.arange(len(pixel), device=pixel.device), 0).cummax(0).values
    transmittance = (before - before[start]).exp().to(a.dtype)  # restarted at the pixel's first pair
    weights = a * transmittance
    out = features.new_zeros(b * height * width, features.shape[-1]).index_add(0, pixel, weights.unsqueeze(-1) * feats)
    coverage = features.new_zeros(b * height * width).index_add(0, pixel, weights)
    return out.view(b, height, width, -1), coverage.view(b, height, width, 1)


class GaussianRenderer(ShadedRenderer):
    """Renders a GaussianField as the volume renderer's RenderOutput (rgb over the background, opacity, depth,
    normals); the same materials and backgrounds. near: Gaussians closer to the camera draw nothing; eps2d: the
    image-space low-pass filter (px^2); rasterizer: "auto" (gsplat for Gaussians on CUDA when it is installed and
    builds, else torch, said once in the log), "torch", or "gsplat" (CUDA only)."""

    @validated("renderer")
    def __init__(self, background: nn.Module, material, near: PositiveFloat = 0.05, eps2d: NonNegativeFloat = 0.3,
                 rasterizer: str = "auto"):
        super().__init__(background, material)
        if rasterizer not in RASTERIZERS:
            raise ConfigError(f"renderer.rasterizer={rasterizer!r}: use {', '.join(RASTERIZERS)}")
        self.near, self.eps2d, self.choice = near, eps2d, rasterizer
        self._device: torch.device | None = None  # where the current path was chosen for
        self._gsplat = None  # gsplat.rasterization, when that is the path

    @property
    def backend(self) -> str:
        """The path in use once something was drawn (gsplat or torch), else the configured choice."""
        if self._device is None:
            return f"splatting ({self.choice})"
        return f"splatting ({'gsplat' if self._gsplat is not None else 'torch'})"

    def _gsplat_for(self, device: torch.device):
        """gsplat.rasterization for Gaussians on `device`, or None for the torch path; chosen once per device."""
        if device == self._device:
            return self._gsplat
        self._device, self._gsplat = device, None
        if self.choice == "torch" or device.type != "cuda":
            if self.choice == "gsplat":
                raise ConfigError(f"renderer.rasterizer=gsplat needs CUDA (the Gaussians are on {device}): use "
                                  "renderer.rasterizer=auto or torch")
            return None
        found = gsplat_rasterizer.probe()
        if not found.ok:
            if self.choice == "gsplat":
                raise ConfigError(f"renderer.rasterizer=gsplat: {found.reason}; or use renderer.rasterizer=auto")
            log.warning("gsplat unavailable (%s): Gaussians are splatted in torch, more slowly (%s)", found.reason,
                        gsplat_rasterizer.INSTALL)
            return None
        self._gsplat = found.module
        return self._gsplat

    def update(self, step: int, geometry) -> None:
        """Nothing per step."""

    def forward(self, geometry, cameras: CameraBatch, shading: str = "albedo", with_normals: bool = False,
                rng: RandomStreams | None = None) -> RenderOutput:
        b, h, w = cameras.batch_size, cameras.height, cameras.width
        g = geometry.gaussians()
        n = g.means.shape[0]
        eyes = cameras.c2w[:, :3, 3]
        need_normals = with_normals or self.material.needs_normals(shading)
        normals = normals_towards(g, eyes) if need_normals else None
        colors = self.material.shade(g.colors.expand(b, -1, -1).reshape(-1, 3),
                                     normals.reshape(-1, 3) if normals is not None else None,
                                     g.means.expand(b, -1, -1).reshape(-1, 3),
                                     cameras.light_position.view(b, 1, 3).expand(b, n, 3).reshape(-1, 3),
                                     shading).view(b, n, 3)
        distance = (g.means.unsqueeze(0) - eyes.unsqueeze(1)).norm(dim=-1, keepdim=True)  # [B,N,1]
        features = [colors, distance] + ([normals] if with_normals else [])
        gsplat = self._gsplat_for(g.means.device)
        if gsplat is not None:
            out, opacity = gsplat_rasterizer.rasterize(gsplat, g, cameras, torch.cat(features, -1), self.near, self.eps2d)
        else:
            mean2d, cov2d, depth = project(g, cameras, self.eps2d)
            out, opacity = composite(mean2d, cov2d, depth, g.opacities, torch.cat(features, -1), h, w, self.near)
        _, dirs = cameras.rays()
        background = self.background(dirs.reshape(-1, 3), rng).view(b, h, w, 3)
        rgb = out[..., :3] + (1 - opacity) * background
        return RenderOutput(rgb=rgb, opacity=opacity, depth=out[..., 3:4], z_variance=torch.zeros_like(opacity),
                            normal=out[..., 4:7] if with_normals else None, num_samples=n)
