"""The rasterizing renderer (issue 20, first part): a sphere's mesh against the analytic sphere seen through the
project's cameras (pixel for pixel), its antialiased coverage against the disk's area, depth, the image's
orientation, and the gradient of coverage with respect to the mesh's size against finite differences."""
import math

import pytest
import torch

from perpneg3d.cameras import orbit_cameras
from perpneg3d.geometry.marching_tets import marching_tets
from perpneg3d.geometry.tet_grid import build_tet_grid
from perpneg3d.renderer import DiffuseMaterial, SolidBackground
from perpneg3d.renderer.mesh_renderer import MeshRenderer, disk_fraction

RADIUS, DISTANCE, FOVY = 0.51, 2.5, 40.0  # 0.51: no grid vertex lies exactly on the sphere


class Ball:
    """A marching-tetrahedra sphere scaled by `scale`; red above z = 0, blue below."""

    radius = 1.0

    def __init__(self, resolution=64, scale=None):
        grid = build_tet_grid(resolution, 1.0)
        self.vertices, self.faces = marching_tets(grid.vertices, grid.tets, grid.vertices.norm(dim=-1) - RADIUS)
        self.scale = torch.ones(()) if scale is None else scale

    def mesh(self):
        return self.vertices * self.scale, self.faces

    def albedo(self, points):
        return torch.where(points[:, 2:] > 0, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))


def renderer():
    return MeshRenderer(SolidBackground(), DiffuseMaterial())


def test_a_sphere_covers_the_pixels_whose_rays_hit_it_and_antialiasing_gives_its_area():
    cams = orbit_cameras(torch.tensor([0.0, 130.0]), torch.tensor([0.0, 25.0]), DISTANCE, FOVY, 64)
    out = renderer()(Ball(), cams)
    origins, dirs = cams.rays()
    b = (origins * dirs).sum(-1)
    hits = b * b - ((origins * origins).sum(-1) - RADIUS ** 2) > 0
    fraction = out.opacity.mean(dim=(1, 2, 3))
    assert fraction.tolist() == pytest.approx([disk_fraction(RADIUS, DISTANCE, FOVY)] * 2, rel=0.01)
    # the mesh is a little inside the sphere: every pixel it covers is hit, all but a thin rim of the rest too
    covered = out.opacity[..., 0] > 0.5
    assert not (covered & ~hits).any() and (hits & ~covered).sum() <= 0.03 * hits.sum()
    centre = out.depth[0, 32, 32, 0].item()
    assert centre == pytest.approx(DISTANCE - RADIUS, rel=0.01)


def test_coverage_is_the_renders_opacity_without_a_colour_query():
    """coverage() (the silhouette search's) equals forward()'s antialiased opacity, fractional edge pixels included,
    and never asks the geometry for a colour."""
    cams = orbit_cameras(torch.tensor([0.0, 130.0]), torch.tensor([0.0, 25.0]), DISTANCE, FOVY, 48)
    ball = Ball(32)
    want = renderer()(ball, cams).opacity
    ball.albedo = None  # a colour query would fail
    got = renderer().coverage(ball, cams)
    assert torch.equal(got, want) and ((got > 0.05) & (got < 0.95)).sum() > 20


def test_row_zero_is_the_top_of_the_image():
    out = renderer()(Ball(), orbit_cameras(torch.tensor([0.0]), 0.0, DISTANCE, FOVY, 32))
    assert torch.allclose(out.rgb[0, 10, 16], torch.tensor([1.0, 0.0, 0.0]))  # above the centre: z > 0, red
    assert torch.allclose(out.rgb[0, 21, 16], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(out.rgb[0, 0, 0], torch.ones(3))  # the white background


def test_coverage_gradient_with_respect_to_the_mesh_matches_finite_differences():
    """d(sum of opacity)/d(scale): a growing sphere covers more; autograd (through antialias) against
    central differences; about 2 pi r_img dr_img in pixels."""
    cams = orbit_cameras(torch.tensor([20.0]), 10.0, DISTANCE, FOVY, 32)
    ball = Ball(resolution=32)

    def coverage(scale):
        ball.scale = scale
        return renderer()(ball, cams).opacity.sum()

    scale = torch.ones((), requires_grad=True)
    coverage(scale).backward()
    eps = 1e-3
    numeric = (coverage(torch.tensor(1 + eps)) - coverage(torch.tensor(1 - eps))) / (2 * eps)
    assert scale.grad.item() == pytest.approx(numeric.item(), rel=0.02)
    disk_pixels = disk_fraction(RADIUS, DISTANCE, FOVY) * 32 * 32
    assert scale.grad.item() == pytest.approx(2 * disk_pixels, rel=0.1)  # area ~ scale^2 for a far camera
    assert math.isfinite(scale.grad.item())


def test_the_rasterizer_backend_is_chosen_by_the_mesh_device():
    from perpneg3d.errors import ConfigError
    from perpneg3d.renderer import DiffuseMaterial, MeshRenderer, SolidBackground
    from perpneg3d.renderer.torch_rasterizer import TorchRasterizer

    def renderer(choice):
        return MeshRenderer(SolidBackground((1.0, 1.0, 1.0)), DiffuseMaterial(), rasterizer=choice)

    assert isinstance(renderer("auto")._rasterizer_for(torch.device("cpu")), TorchRasterizer)  # CPU: torch, no log
    with pytest.raises(ConfigError, match=r"renderer.rasterizer=nvdiffrast needs CUDA"):
        renderer("nvdiffrast")._rasterizer_for(torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"renderer.rasterizer='opengl': use auto, torch, nvdiffrast"):
        renderer("opengl")
    own = TorchRasterizer(tile=4)
    assert renderer(own)._rasterizer_for(torch.device("cpu")) is own


def test_an_empty_surface_renders_the_background_alone():
    from perpneg3d.geometry import DMTetGeometry
    from perpneg3d.geometry.implicit_volume import ImplicitVolume

    geometry = DMTetGeometry(ImplicitVolume(radius=1.0, n_levels=2, log2_hashmap_size=8), radius=1.0, grid_resolution=4)
    with torch.no_grad():
        geometry.sdf.fill_(1.0)  # everything outside: no surface
    renderer = MeshRenderer(SolidBackground((0.2, 0.4, 0.6)), DiffuseMaterial())
    out = renderer(geometry, orbit_cameras(torch.tensor([0.0, 90.0]), 15.0, 2.0, 40.0, 8), with_normals=True)
    assert torch.equal(out.rgb, torch.tensor([0.2, 0.4, 0.6]).expand(2, 8, 8, 3))
    assert out.opacity.abs().sum() == 0 and out.normal.shape == (2, 8, 8, 3) and out.mesh[1].shape == (0, 3)
