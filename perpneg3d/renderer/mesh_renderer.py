"""Rasterizing renderer: a surface geometry's mesh, seen from a CameraBatch, as the same RenderOutput the
volume renderer gives (rgb over the background, opacity, depth, normals), so the trainer, guidance and
prompts do not know which stage runs (docs/architecture.md, "Second stage").

The camera is the project's pinhole (OpenGL axes, docs/conventions.md) as a perspective projection whose
pixel centres coincide with CameraBatch.rays(); the rasterizer's row 0 is at the bottom (NDC y = -1), so
images are flipped to put row 0 at the top as everywhere else. Shading and backgrounds are the volume
renderer's. Silhouette gradients come from the rasterizer's antialias, applied to colour and coverage.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perpneg3d.cameras.camera_batch import CameraBatch
from perpneg3d.contracts import Rasterizer
from perpneg3d.errors import ConfigError
from perpneg3d.geometry.marching_tets import vertex_normals
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer import nvdiffrast_rasterizer
from perpneg3d.renderer.torch_rasterizer import TorchRasterizer
from perpneg3d.renderer.volume_renderer import RenderOutput, ShadedRenderer
from perpneg3d.validation import PositiveFloat, validated

log = logging.getLogger(__name__)


def projection(cameras: CameraBatch, near: float, far: float) -> Tensor:
    """[B,4,4] world -> clip: OpenGL perspective (fovy, aspect W/H) times the world-to-camera matrix."""
    f = 1.0 / torch.tan(torch.deg2rad(cameras.fovy_deg) / 2)
    proj = torch.zeros(cameras.batch_size, 4, 4, device=cameras.device, dtype=cameras.c2w.dtype)
    proj[:, 0, 0] = f * cameras.height / cameras.width
    proj[:, 1, 1] = f
    proj[:, 2, 2] = (far + near) / (near - far)
    proj[:, 2, 3] = 2 * far * near / (near - far)
    proj[:, 3, 2] = -1.0
    return proj @ torch.linalg.inv(cameras.c2w)


BACKENDS = ("auto", "torch", "nvdiffrast")


class MeshRenderer(ShadedRenderer):
    """Renders a Surface (mesh() -> vertices [M,3], faces [F,3]; albedo(points)) with a Rasterizer.

    rasterizer: "auto" (nvdiffrast's CUDA context for meshes on CUDA when it is installed, else the torch
    rasterizer, said once in the log), "torch", "nvdiffrast" (CUDA only), or any Rasterizer object.
    """

    @validated("renderer")
    def __init__(self, background: nn.Module, material, rasterizer: str | Rasterizer = "auto", near: PositiveFloat = 0.05,
                 far: PositiveFloat = 100.0):
        super().__init__(background, material)
        if isinstance(rasterizer, str) and rasterizer not in BACKENDS:
            raise ConfigError(f"renderer.rasterizer={rasterizer!r}: use {', '.join(BACKENDS)}")
        self.choice = rasterizer
        self.rasterizer = rasterizer if not isinstance(rasterizer, str) else TorchRasterizer()
        self._device: torch.device | None = None  # where the current rasterizer was chosen for
        self.near, self.far = near, far

    @property
    def backend(self) -> str:
        return f"rasterizer {self.choice if isinstance(self.choice, str) else type(self.choice).__name__}"

    def _rasterizer_for(self, device: torch.device) -> Rasterizer:
        """The rasterizer for meshes on `device`, chosen once per device (docs/architecture.md, "Second stage")."""
        if not isinstance(self.choice, str) or device == self._device:
            return self.rasterizer
        self._device = device
        if self.choice == "torch" or device.type != "cuda":
            if self.choice == "nvdiffrast":
                raise ConfigError(f"renderer.rasterizer=nvdiffrast needs CUDA (the mesh is on {device}): use "
                                  "renderer.rasterizer=auto or torch")
            self.rasterizer = TorchRasterizer()
            return self.rasterizer
        dr = nvdiffrast_rasterizer.import_nvdiffrast()
        if dr is None:
            if self.choice == "nvdiffrast":
                raise ConfigError("renderer.rasterizer=nvdiffrast: nvdiffrast is not installed or failed to build: "
                                  "pip install -e .[nvdiffrast], or use renderer.rasterizer=auto")
            log.warning("nvdiffrast is not installed: meshes are rasterized in torch (pip install -e .[nvdiffrast] "
                        "for its CUDA rasterizer)")
            self.rasterizer = TorchRasterizer()
        else:
            self.rasterizer = nvdiffrast_rasterizer.NvdiffrastRasterizer(dr, device)
        return self.rasterizer

    def update(self, step: int, geometry) -> None:
        """Nothing per step (a volume renderer's occupancy grid has no counterpart here)."""

    def _rasterized(self, vertices: Tensor, faces: Tensor, cameras: CameraBatch):
        """(rasterizer, clip-space vertices [B,V,4], its rasterization [B,H,W,4]) of a non-empty mesh."""
        homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1)
        clip = torch.einsum("bij,vj->bvi", projection(cameras, self.near, self.far), homogeneous)
        rasterizer = self._rasterizer_for(vertices.device)
        return rasterizer, clip, rasterizer.rasterize(clip, faces, (cameras.height, cameras.width))

    @torch.no_grad()
    def coverage(self, geometry, cameras: CameraBatch) -> Tensor:
        """[B,H,W,1] the surface's antialiased coverage, row 0 at the top: forward()'s opacity without shading, so
        without a colour query (the refine stage's silhouette search renders a mesh per candidate level)."""
        vertices, faces = geometry.mesh()
        if faces.shape[0] == 0:
            return vertices.new_zeros(cameras.batch_size, cameras.height, cameras.width, 1)
        rasterizer, clip, rast = self._rasterized(vertices, faces, cameras)
        mask = (rast[..., 3:] > 0).to(vertices.dtype)
        return rasterizer.antialias(mask, rast, clip, faces).clamp(0, 1).flip(1)

    def forward(self, geometry, cameras: CameraBatch, shading: str = "albedo", with_normals: bool = False,
                rng: RandomStreams | None = None) -> RenderOutput:
        b, h, w = cameras.batch_size, cameras.height, cameras.width
        vertices, faces = geometry.mesh()
        if faces.shape[0] == 0:  # no surface (every signed distance on one side): the background alone
            return self._empty(cameras, vertices, faces, with_normals, rng)
        rasterizer, clip, rast = self._rasterized(vertices, faces, cameras)
        covered = rast[..., 3] > 0  # [B,H,W]
        points = rasterizer.interpolate(vertices, rast, faces)
        need_normals = with_normals or self.material.needs_normals(shading)
        normals = F.normalize(rasterizer.interpolate(vertex_normals(vertices, faces), rast, faces), dim=-1) \
            if need_normals else None
        lights = cameras.light_position.view(b, 1, 1, 3).expand(b, h, w, 3)
        shaded = self.material.shade(geometry.albedo(points.reshape(-1, 3)),
                                     normals.reshape(-1, 3) if normals is not None else None,
                                     points.reshape(-1, 3), lights.reshape(-1, 3), shading).view(b, h, w, 3)
        mask = covered.unsqueeze(-1).to(shaded.dtype)
        blended = rasterizer.antialias(torch.cat([shaded * mask, mask], -1), rast, clip, faces)
        color, opacity = blended[..., :3], blended[..., 3:].clamp(0, 1)
        eye = cameras.c2w[:, :3, 3].view(b, 1, 1, 3)
        depth = (points - eye).norm(dim=-1, keepdim=True) * mask
        out = dict(rgb=color, opacity=opacity, depth=depth, z_variance=torch.zeros_like(depth),
                   normal=normals * mask if with_normals else None)
        out = {k: v.flip(1) if v is not None else None for k, v in out.items()}  # row 0 at the top
        _, dirs = cameras.rays()
        background = self.background(dirs.reshape(-1, 3), rng).view(b, h, w, 3)
        out["rgb"] = out["rgb"] + (1 - out["opacity"]) * background
        return RenderOutput(num_samples=int(faces.shape[0]), mesh=(vertices, faces), **out)

    def _empty(self, cameras: CameraBatch, vertices: Tensor, faces: Tensor, with_normals: bool,
               rng: RandomStreams | None) -> RenderOutput:
        b, h, w = cameras.batch_size, cameras.height, cameras.width
        zeros = vertices.new_zeros(b, h, w, 1)
        _, dirs = cameras.rays()
        background = self.background(dirs.reshape(-1, 3), rng).view(b, h, w, 3)
        return RenderOutput(rgb=background, opacity=zeros, depth=zeros, z_variance=zeros,
                            normal=vertices.new_zeros(b, h, w, 3) if with_normals else None, num_samples=0,
                            mesh=(vertices, faces))


def disk_fraction(radius: float, distance: float, fovy_deg: float) -> float:
    """Share of a square image's area that a sphere of `radius` at `distance` covers (its silhouette is a
    disk of angular radius asin(r/d)): for tests and benchmarks."""
    half = math.tan(math.radians(fovy_deg) / 2)
    r_img = math.tan(math.asin(radius / distance)) / half  # in units of half the image height
    return math.pi * r_img ** 2 / 4
