"""gsplat's CUDA rasterization of 3D Gaussians behind the GaussianRenderer (optional, as nvdiffrast is for meshes).

gsplat 1.5.3 (nerfstudio, Apache-2.0; `pip install -e .[gsplat]`) compiles its CUDA kernels on first use with
torch's JIT extension build, as nerfacc does: the same toolkit discovery (nerfacc_cuda.build_environment), the
same stale-lock rule and the same child-process build with a timeout (`python -m
perpneg3d.renderer.gsplat_rasterizer --build`). It is imported only here, only when Gaussians are drawn on CUDA;
its absence, or a build that fails, means the torch splatting path with one logged line (renderer.rasterizer=auto),
or one line of error (renderer.rasterizer=gsplat).

The call (`rasterization`, float32, "classic" mode, unpacked) takes the project's cameras as:
- viewmats: world-to-camera matrices in OpenCV's axes (x right, y down, z forward), i.e. the inverse of
  CameraBatch.c2w (OpenGL axes, docs/conventions.md) with its y and z rows negated;
- Ks: the pinhole of CameraBatch (one focal length, square pixels) with the principal point at the image centre,
  (W/2, H/2) in gsplat's pixel coordinates, where column j's centre is j + 0.5 (the torch path puts it at j).
tests/test_gaussians.py pins both against gsplat's own torch reference of its projection on the CPU. The two paths
differ in documented details only (docs/architecture.md, "Gaussian splatting"): gsplat bounds a Gaussian by 3.33
standard deviations per image axis (fewer for a faint one), caps alpha at 0.999 and stops a pixel once its
transmittance is below 1e-4; the torch path bounds by 3 along the longest axis and caps alpha at 0.99.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.cameras.camera_batch import CameraBatch
from perpneg3d.contracts import Gaussians
from perpneg3d.errors import first_line, reported_errors
from perpneg3d.renderer import nerfacc_cuda as jit

log = logging.getLogger(__name__)
EXTENSION_NAME = "gsplat_cuda"  # gsplat's own name for its JIT extension (gsplat/cuda/_backend.py)
BUILD_CODE = "from gsplat.cuda import _backend; import sys; sys.exit(0 if _backend._C is not None else 3)"
INSTALL = "pip install -e .[gsplat]"


def gsplat_cameras(cameras: CameraBatch) -> tuple[Tensor, Tensor]:
    """(viewmats [B,4,4], Ks [B,3,3]) of the cameras as gsplat takes them (see the module docstring)."""
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], device=cameras.c2w.device, dtype=cameras.c2w.dtype)
    viewmats = flip.view(1, 4, 1) * torch.linalg.inv(cameras.c2w)
    f = 0.5 * cameras.height / torch.tan(torch.deg2rad(cameras.fovy_deg) / 2)  # GaussianRenderer's focal_length
    zero, one = torch.zeros_like(f), torch.ones_like(f)
    ks = torch.stack([f, zero, zero + cameras.width / 2, zero, f, zero + cameras.height / 2, zero, zero, one], -1)
    return viewmats, ks.view(-1, 3, 3)


def rasterize(rasterization, gaussians: Gaussians, cameras: CameraBatch, features: Tensor, near: float,
              eps2d: float) -> tuple[Tensor, Tensor]:
    """gsplat's front-to-back blend of per-camera features [B,N,C]: (blended features [B,H,W,C], opacity
    [B,H,W,1]), what the torch path's composite() returns. `rasterization` is gsplat.rasterization."""
    viewmats, ks = gsplat_cameras(cameras)
    out, alpha, _ = rasterization(
        gaussians.means.float(), F.normalize(gaussians.rotations.float(), dim=-1), gaussians.scales.float(),
        gaussians.opacities.float(), features.float(), viewmats.float(), ks.float(), cameras.width, cameras.height,
        near_plane=near, eps2d=eps2d, packed=False, rasterize_mode="classic", render_mode="RGB")
    return out.to(features.dtype), alpha.to(features.dtype)


def _load_extension():
    from gsplat.cuda import _backend  # noqa: PLC0415  (compiles on first import)

    return _backend._C


@functools.lru_cache(maxsize=1)
def probe() -> jit.Probe:
    """Load gsplat's kernels once per process (module: gsplat.rasterization); never raises, never waits on a
    stale lock; a failure is cached (the build is not retried at every render)."""
    if not torch.cuda.is_available():
        return jit.Probe(False, "no CUDA device")
    try:
        import gsplat  # noqa: F401, PLC0415  (optional CUDA dependency)
    except ImportError:
        return jit.Probe(False, f"gsplat is not installed ({INSTALL})")
    lock = jit.stale_lock(jit.build_directory(extension=EXTENSION_NAME))
    if lock is not None:
        return jit.Probe(False, f"a killed build left {lock}, and loading would wait on it forever: delete it "
                                f"(rm {lock}) or rebuild with python -m perpneg3d.renderer.gsplat_rasterizer --build")
    jit.ensure_cuda_home()
    start = time.perf_counter()
    try:
        module = _load_extension()
    except Exception as err:  # noqa: BLE001  (any build or load failure means: the torch path)
        problems = jit.toolkit_problems()
        return jit.Probe(False, problems[0] if problems else f"gsplat's CUDA build failed: {first_line(err, 200)}")
    if module is None:
        return jit.Probe(False, "gsplat found no CUDA toolkit: " + (jit.toolkit_problems() or ["add the toolkit's bin/ to PATH"])[0])
    from gsplat import rasterization  # noqa: PLC0415

    return jit.Probe(True, "loaded", time.perf_counter() - start, rasterization)


def build(timeout_s: float = 1800.0) -> jit.Probe:
    """Build (or load) gsplat's kernels in a child process with a timeout (nerfacc_cuda.build's rules)."""
    return jit.build(timeout_s, extension=EXTENSION_NAME, code=BUILD_CODE, package="gsplat")


def main(argv=None) -> int:
    args = jit.build_parser("gsplat", 1800.0).parse_args(argv)
    try:
        import gsplat  # noqa: PLC0415
    except ImportError:
        print(f"gsplat is not installed: {INSTALL}")
        return 1
    print(f"gsplat {gsplat.__version__}; build folder: {jit.build_directory(extension=EXTENSION_NAME)}")
    for key, value in jit.build_environment().items():
        print(f"build environment: {key}={value}")
    if not torch.cuda.is_available() and not args.without_device:
        print("no CUDA device: Gaussians are splatted in torch on this machine")
        return 0 if not args.build else 1
    if args.without_device and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("--without-device needs TORCH_CUDA_ARCH_LIST (the GPU's compute capability, e.g. 9.0 for H100/H200)")
        return 2
    result = build(args.timeout) if args.build or args.without_device else probe()
    print(f"gsplat CUDA kernels: {'ok' if result.ok else 'failed'} ({result.reason}, {result.seconds:.1f} s)")
    if not result.ok and result.log_tail:
        print(result.log_tail)
    return 0 if result.ok else 1


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
