"""nvdiffrast's CUDA rasterizer behind the Rasterizer Protocol (optional, like tinycudann).

Only `RasterizeCudaContext` is used: its OpenGL context is what broke threestudio's refine stage on headless
nodes, and nvdiffrast 0.4 removed it. nvdiffrast is imported only here, only when a mesh is drawn on CUDA, and
its absence (or a failed kernel build) means the pure-torch rasterizer with one logged line. Install with
`pip install -e .[nvdiffrast]` (the `diffrp-nvdiffrast` source package: NVIDIA's non-commercial licence, so it
is never required).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def import_nvdiffrast():
    """nvdiffrast.torch or None (never raises: a missing package or a failed first build both mean None)."""
    try:
        import nvdiffrast.torch as dr  # noqa: PLC0415  (optional CUDA dependency)

        return dr
    except Exception as err:  # ImportError, or the JIT build's RuntimeError
        log.debug("nvdiffrast unavailable: %s", err)
        return None


class NvdiffrastRasterizer:
    """rasterize / interpolate / antialias through nvdiffrast on one CUDA device (its context is made on first use)."""

    def __init__(self, dr, device: torch.device):
        self.dr, self.device = dr, device
        self.context = dr.RasterizeCudaContext(device=device)

    def rasterize(self, clip: Tensor, faces: Tensor, resolution: tuple[int, int]) -> Tensor:
        rast, _ = self.dr.rasterize(self.context, clip.float().contiguous(), faces.int().contiguous(), resolution=list(resolution))
        return rast

    def interpolate(self, attributes: Tensor, rast: Tensor, faces: Tensor) -> Tensor:
        out, _ = self.dr.interpolate(attributes.float().contiguous(), rast, faces.int().contiguous())
        return out

    def antialias(self, color: Tensor, rast: Tensor, clip: Tensor, faces: Tensor) -> Tensor:
        # nvdiffrast's antialias takes float32 colours only (a half-precision shading would be refused on CUDA)
        return self.dr.antialias(color.float().contiguous(), rast, clip.float().contiguous(), faces.int().contiguous())
