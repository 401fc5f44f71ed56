"""Volume renderer: shapes and ranges, batch sizes, the ray/box test, and empty-space skipping."""
import pytest
import torch

from perpneg3d.cameras import RandomCameras, orbit_cameras
from perpneg3d.geometry import ImplicitVolume
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer import DiffuseMaterial, SolidBackground, VolumeRenderer, ray_box_intersection


def make(skip_empty=True, samples=24):
    torch.manual_seed(0)
    geometry = ImplicitVolume(radius=1.0, n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch",
                              density_shift=-1.0)  # the tests below were sized for this field
    renderer = VolumeRenderer(SolidBackground((1.0, 1.0, 1.0)), DiffuseMaterial(ambient_only_steps=0), radius=1.0,
                              num_samples_per_ray=samples, estimator="stratified", skip_empty=skip_empty)
    return geometry, renderer


def test_ray_box_intersection_hand_values():
    o = torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far = ray_box_intersection(o, d, 1.0)
    assert torch.allclose(near[:2], torch.tensor([2.0, 0.0])) and torch.allclose(far[:2], torch.tensor([4.0, 1.0]))
    assert near[2] == far[2]  # a miss: an empty segment


@pytest.mark.parametrize("batch", [1, 4])
def test_shapes_and_ranges(batch):
    geometry, renderer = make()
    cams = RandomCameras(batch_size=batch, heights=[12], widths=[16]).sample(0, torch.Generator().manual_seed(0))
    renderer.update(0, geometry)
    out = renderer(geometry, cams, shading="lambertian", with_normals=True, rng=RandomStreams.seeded(1))
    assert out.rgb.shape == (batch, 12, 16, 3) and out.opacity.shape == (batch, 12, 16, 1)
    assert out.normal.shape == (batch, 12, 16, 3) and out.depth.shape == (batch, 12, 16, 1)
    assert out.opacity.min() >= 0 and out.opacity.max() <= 1 + 1e-5
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1 + 1e-5
    assert out.opacity.max() > 0.5  # the blob is visible
    assert out.orientation.shape == (batch, 12, 16, 1) and (out.orientation >= 0).all()


def test_empty_rays_show_the_background():
    geometry, renderer = make()
    renderer.update(0, geometry)
    # a camera looking away from the box: every ray misses it
    cams = orbit_cameras(torch.tensor([0.0]), 0.0, 3.0, 40.0, 8)
    cams.c2w[:, :3, 2] *= -1  # flip the viewing direction
    cams.c2w[:, :3, 0] *= -1
    out = renderer(geometry, cams)
    assert torch.allclose(out.rgb, torch.ones_like(out.rgb)) and out.opacity.abs().max() == 0


def test_skipping_empty_cells_changes_nothing_visible():
    geometry, skip = make(skip_empty=True, samples=64)
    _, full = make(skip_empty=False, samples=64)
    skip.update(0, geometry)
    occupied = skip.estimator.binaries.float().mean().item()
    assert 0.0 < occupied < 0.5  # most of the box is skipped
    cams = orbit_cameras(torch.tensor([0.0, 120.0]), 20.0, 2.0, 40.0, 16)
    skip.eval(), full.eval()
    a, b = skip(geometry, cams), full(geometry, cams)
    # only the faint tails in cells below the occupancy threshold are lost
    assert (a.opacity - b.opacity).abs().max() < 0.08 and (a.opacity - b.opacity).abs().mean() < 0.02
    assert (a.rgb - b.rgb).abs().mean() < 0.02
    assert a.num_samples == b.num_samples  # same stratified samples; skipped ones just are not evaluated


def test_gradient_reaches_the_field():
    geometry, renderer = make()
    renderer.update(0, geometry)
    cams = orbit_cameras(torch.tensor([30.0]), 10.0, 2.0, 40.0, 8)
    renderer(geometry, cams, rng=RandomStreams.seeded(0)).rgb.mean().backward()
    assert geometry.encoding.encoding.embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None for p in geometry.density_mlp.parameters())
