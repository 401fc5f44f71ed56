"""3D Gaussian splatting, the torch renderer (issue 30): single Gaussians against images worked out by hand from
the pinhole and EWA formulas, two Gaussians blended in depth order whatever their order in the tensors, gradients
against finite differences, and the contracts."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from perpneg3d.cameras.camera_batch import orbit_cameras
from perpneg3d.contracts import GaussianField, Gaussians
from perpneg3d.geometry.gaussians import FixedGaussians as Fixed
from perpneg3d.geometry.gaussians import GaussianCloud, quaternion_to_matrix
from perpneg3d.renderer import DiffuseMaterial, SolidBackground
from perpneg3d.renderer.gaussian_renderer import ALPHA_MIN, GaussianRenderer

D, FOVY, SIZE = 2.0, 40.0, 16
F = 0.5 * SIZE / math.tan(math.radians(FOVY) / 2)  # focal length in pixels
CENTRE = SIZE / 2 - 0.5  # the optical axis, in pixel-centre coordinates


def front_camera(dtype=torch.float32):
    """At (D, 0, 0) looking at the origin, z up: image right is world +y, image up world +z."""
    cams = orbit_cameras(torch.tensor([0.0]), 0.0, D, FOVY, SIZE)
    return replace(cams, c2w=cams.c2w.to(dtype), fovy_deg=cams.fovy_deg.to(dtype))


def renderer(background=(1.0, 1.0, 1.0)):
    return GaussianRenderer(SolidBackground(background), DiffuseMaterial())


def one(mean, scales, opacity, color, rotation=(1.0, 0.0, 0.0, 0.0)) -> Gaussians:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return Gaussians(t(mean), t(scales), t(rotation), t(opacity)[0:1].view(1), t(color))


def by_hand(cov, opacity):
    """alpha [SIZE,SIZE] of a Gaussian centred on the axis with image covariance `cov` (2x2, pixels^2): drawn at
    the pixel centres within 3 standard deviations of the longest axis along x and y (gsplat's box; its 0.1 floor
    under the eigenvalues' spread), capped at 0.99, nothing below 1/255."""
    cov = torch.tensor(cov, dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    mid, det = (cov[0, 0] + cov[1, 1]) / 2, torch.linalg.det(cov)
    reach = 3 * (mid + max(mid ** 2 - det, 0.1) ** 0.5) ** 0.5
    r = torch.arange(SIZE, dtype=torch.float64) - CENTRE
    x, y = r.view(1, -1).expand(SIZE, SIZE), r.view(-1, 1).expand(SIZE, SIZE)  # column, row offsets
    q = inv[0, 0] * x * x + 2 * inv[0, 1] * x * y + inv[1, 1] * y * y
    alpha = (opacity * torch.exp(-0.5 * q)).clamp_max(0.99)
    drawn = (alpha >= ALPHA_MIN) & (x.abs() <= reach) & (y.abs() <= reach)
    return torch.where(drawn, alpha, torch.zeros_like(alpha))


def test_a_round_gaussian_on_the_axis_is_the_pinhole_scaled_disk():
    """sigma 0.1 at distance 2: image variance (f sigma / D)^2 + 0.3 px^2, centred on the optical axis."""
    out = renderer(background=(0.0, 0.0, 0.0))(Fixed(one((0, 0, 0), (0.1, 0.1, 0.1), 0.8, (1.0, 0.5, 0.25))),
                                               front_camera(torch.float64))
    s2 = (F * 0.1 / D) ** 2 + 0.3
    alpha = by_hand([[s2, 0.0], [0.0, s2]], 0.8)
    assert torch.allclose(out.opacity[0, ..., 0].double(), alpha, atol=1e-6)
    assert torch.allclose(out.rgb[0].double(), alpha.unsqueeze(-1) * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(out.depth[0, ..., 0].double(), alpha * D, atol=1e-5)  # the mean's distance, blended


def test_an_oriented_gaussian_gives_the_hand_worked_image_covariance():
    """Scales (0.3, 0.2, 0.05) along world x, y, z, turned 30 degrees about x (the viewing axis): the image sees
    the y-z ellipse, rotated by 30 degrees, with rows running down (-z)."""
    angle = math.radians(30)
    q = (math.cos(angle / 2), math.sin(angle / 2), 0.0, 0.0)
    out = renderer(background=(0.0, 0.0, 0.0))(Fixed(one((0, 0, 0), (0.3, 0.2, 0.05), 0.9, (1, 1, 1), q)),
                                               front_camera(torch.float64))
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # in the world's (y, z) plane
    world = rot @ torch.diag(torch.tensor([0.2 ** 2, 0.05 ** 2], dtype=torch.float64)) @ rot.T
    flip = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))  # (column, row) = (y, -z) * f / D
    cov = (F / D) ** 2 * flip @ world @ flip + 0.3 * torch.eye(2, dtype=torch.float64)
    assert cov[0, 1] < 0  # tilted: a real test of the off-diagonal term
    assert torch.allclose(out.opacity[0, ..., 0].double(), by_hand(cov.tolist(), 0.9), atol=1e-6)


def test_two_gaussians_blend_front_to_back_whatever_their_order():
    """A red Gaussian nearer the camera over a green one: the centre pixel is a1 red + (1 - a1) a2 green over the
    background; listing them the other way round changes nothing."""
    near = ((0.2, 0, 0), (0.1, 0.1, 0.1), 0.6, (1.0, 0.0, 0.0))
    far = ((-0.2, 0, 0), (0.1, 0.1, 0.1), 0.7, (0.0, 1.0, 0.0))
    images = []
    for pair in ((near, far), (far, near)):
        gs = [one(*g) for g in pair]
        g = Gaussians(*(torch.cat(parts) for parts in zip(*gs)))
        images.append(renderer(background=(0.0, 0.0, 1.0))(Fixed(g), front_camera(torch.float64)))
    assert torch.equal(images[0].rgb, images[1].rgb) and torch.equal(images[0].depth, images[1].depth)
    # pixel (7, 7) is half a pixel from the axis in each direction
    a1 = 0.6 * math.exp(-0.5 * 0.5 / ((F * 0.1 / (D - 0.2)) ** 2 + 0.3))
    a2 = 0.7 * math.exp(-0.5 * 0.5 / ((F * 0.1 / (D + 0.2)) ** 2 + 0.3))
    expect = [a1, (1 - a1) * a2, (1 - a1) * (1 - a2)]
    assert images[0].rgb[0, 7, 7].tolist() == pytest.approx(expect, abs=1e-6)
    assert images[0].opacity[0, 7, 7, 0].item() == pytest.approx(1 - (1 - a1) * (1 - a2), abs=1e-6)
    assert images[0].depth[0, 7, 7, 0].item() == pytest.approx(a1 * (D - 0.2) + (1 - a1) * a2 * (D + 0.2), abs=1e-5)


def test_a_gaussian_behind_the_camera_draws_nothing():
    out = renderer()(Fixed(one((3.0, 0, 0), (0.1, 0.1, 0.1), 0.9, (0, 0, 0))), front_camera(torch.float64))
    assert torch.equal(out.opacity, torch.zeros_like(out.opacity)) and torch.equal(out.rgb, torch.ones_like(out.rgb))


def test_gradients_match_finite_differences():
    """Every parameter of three Gaussians (means, log-scales, quaternions, opacity and colour logits), through
    projection, sorting and blending, in float64, lambertian shading (normals from the shortest axis)."""
    cloud = GaussianCloud(num_points=3, init_radius=0.3, init_scale=0.15, init_opacity=0.5, seed=3).double()
    with torch.no_grad():
        cloud.rotations.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        cloud.color_logits.copy_(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
        cloud.log_scales.add_(torch.tensor([[0.0, 0.3, -0.4], [0.2, -0.3, 0.0], [-0.2, 0.0, 0.4]], dtype=torch.float64))
    cams = orbit_cameras(torch.tensor([30.0, 200.0]), 20.0, D, FOVY, 8)
    cams = replace(cams, c2w=cams.c2w.double(), fovy_deg=cams.fovy_deg.double(), light_position=cams.light_position.double())
    render = renderer(background=(0.2, 0.3, 0.4))
    weights = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g0 = cloud.gaussians()
    values = [v.detach().clone().requires_grad_(True) for v in
              (cloud.means, cloud.log_scales, cloud.rotations, cloud.opacity_logits, cloud.color_logits)]
    assert torch.equal(g0.scales, values[1].exp()) and torch.equal(g0.colors, torch.sigmoid(values[4]))

    def through(means, log_scales, rotations, opacity_logits, color_logits):  # GaussianCloud.gaussians(), then render
        g = Gaussians(means, log_scales.exp(), torch.nn.functional.normalize(rotations, dim=-1),
                      torch.sigmoid(opacity_logits), torch.sigmoid(color_logits))
        out = render(Fixed(g), cams, shading="lambertian", with_normals=True)
        return (out.rgb * weights).sum() + out.depth.sum() * 0.1 + out.normal.sum() * 0.01

    assert torch.autograd.gradcheck(through, values, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_the_cloud_satisfies_the_contract_and_starts_in_its_ball():
    cloud = GaussianCloud(num_points=500, init_radius=0.4, init_scale=0.05, init_opacity=0.2, seed=0)
    assert isinstance(cloud, GaussianField) and isinstance(Fixed(cloud.gaussians()), GaussianField)
    g = cloud.gaussians()
    assert g.means.norm(dim=-1).max() <= 0.4 and g.means.norm(dim=-1).max() > 0.35  # uniform in the ball's volume
    assert torch.allclose(g.scales, torch.full((500, 3), 0.05)) and torch.allclose(g.opacities, torch.full((500,), 0.2))
    assert sorted(cloud.param_groups()) == ["colors", "means", "opacities", "rotations", "scales"]
    assert torch.allclose(quaternion_to_matrix(torch.tensor([[math.cos(0.5), 0, 0, math.sin(0.5)]])),
                          torch.tensor([[[math.cos(1), -math.sin(1), 0], [math.sin(1), math.cos(1), 0], [0, 0, 1]]]),
                          atol=1e-6)


def test_many_gaussians_equal_a_pixel_by_pixel_loop():
    """30 random Gaussians (some overlapping, some partly outside the image, one behind the camera), two cameras:
    the vectorised compositor equals a plain loop over pixels that blends the Gaussians front to back with the
    same rules (box of 3 standard deviations, 0.99 cap, 1/255 floor)."""
    from perpneg3d.renderer.gaussian_renderer import conic_and_radius, project

    g0 = torch.Generator().manual_seed(5)
    n = 30
    means = (torch.rand(n, 3, generator=g0, dtype=torch.float64) - 0.5) * 1.4
    means[0] = torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64)  # behind the first camera
    g = Gaussians(means, 0.03 + 0.15 * torch.rand(n, 3, generator=g0, dtype=torch.float64),
                  torch.nn.functional.normalize(torch.randn(n, 4, generator=g0, dtype=torch.float64), dim=-1),
                  0.2 + 0.79 * torch.rand(n, generator=g0, dtype=torch.float64),
                  torch.rand(n, 3, generator=g0, dtype=torch.float64))
    cams = orbit_cameras(torch.tensor([0.0, 135.0]), 10.0, D, FOVY, 10)
    cams = replace(cams, c2w=cams.c2w.double(), fovy_deg=cams.fovy_deg.double())
    out = renderer(background=(0.0, 0.0, 0.0))(Fixed(g), cams)
    mean2d, cov2d, depth = project(g, cams)
    conic, radius = conic_and_radius(cov2d)
    assert (depth[0] < 0.05).sum() == 1  # the one behind
    for b in range(2):
        order = depth[b].argsort().tolist()
        for row in range(10):
            for col in range(10):
                colour, clear = torch.zeros(3, dtype=torch.float64), 1.0
                for i in order:
                    dx, dy = col - mean2d[b, i, 0].item(), row - mean2d[b, i, 1].item()
                    if depth[b, i] <= 0.05 or abs(dx) > radius[b, i] or abs(dy) > radius[b, i]:
                        continue
                    a_, b_, c_ = conic[b, i].tolist()
                    alpha = min(0.99, g.opacities[i].item() * math.exp(-0.5 * (a_ * dx * dx + 2 * b_ * dx * dy + c_ * dy * dy)))
                    if alpha < ALPHA_MIN:
                        continue
                    colour += clear * alpha * g.colors[i]
                    clear *= 1 - alpha
                assert torch.allclose(out.rgb[b, row, col], colour, atol=1e-9), (b, row, col)
                assert out.opacity[b, row, col, 0].item() == pytest.approx(1 - clear, abs=1e-9)
    assert out.opacity.max() > 0.9 and out.opacity.min() < 0.05  # dense places and nearly empty ones


def test_a_gaussian_toy_run_trains_and_resumes_exactly(tmp_path):
    """experiment=toy_gs through train.py's path: the Gaussians move, every artefact of a run is written
    (the mesh from their density), and 5 steps + a resume to 8 end bit-identical to 8 straight."""
    from helpers import TINY_GAUSSIANS, compose_train
    from perpneg3d.training.checkpoint import latest_valid_checkpoint
    from perpneg3d.training.run import train

    def final(run):
        return latest_valid_checkpoint(run)[1]["geometry"]

    grow = ["geometry.densify_every=2", "geometry.densify_from=2", "geometry.grad_threshold=0.001",
            "geometry.max_points=2000"]  # densified at steps 2, 4 | 6, 8: the count changes across the resume
    straight = train(compose_train(TINY_GAUSSIANS + grow + ["trainer.max_steps=8", "trainer.ckpt_every=2"], tmp_path / "a"))
    first = train(compose_train(TINY_GAUSSIANS + grow + ["trainer.max_steps=5", "trainer.ckpt_every=2"], tmp_path / "b"))
    at5 = final(first)["means"].shape[0]
    resumed = train(compose_train(TINY_GAUSSIANS + grow + ["trainer.max_steps=8", "trainer.ckpt_every=2",
                                                           f"resume={first}"], tmp_path / "c"))
    a, b = final(straight), final(resumed)
    assert sorted(a) == ["color_logits", "grad_count", "grad_sum", "log_scales", "means", "opacity_logits", "rotations"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 256 < at5 < a["means"].shape[0] <= 2000  # grew before and after the resume
    for name in ("config.yaml", "metrics.json", "turntable.mp4", "mesh.glb"):
        assert (straight / name).is_file(), name
    import trimesh

    mesh = trimesh.load(straight / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100 and mesh.extents.max() < 1.6  # the Gaussians' density, in Blender's metre units

    # refine=<this run>: DMTet from the Gaussians' density, the (densified) Gaussians as its colour field, which
    # learns its colours at the stage's albedo rate and keeps everything else (learning rate 0: bit-identical)
    from perpneg3d.config import check_overrides

    argv = check_overrides("train", [f"refine={straight}", "geometry.grid_resolution=16", "trainer.max_steps=2",
                                     "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.val_resolution=16",
                                     "trainer.turntable_frames=2", "trainer.turntable_resolution=16",
                                     "export.texture_size=64", f"out_dir={tmp_path / 'r'}"])
    assert argv[-1] == "stage=refine_toy"
    refined = train(compose_train(argv, tmp_path / "r"), argv)
    rates = OmegaConf.load(refined / "config.yaml").trainer.learning_rates
    assert rates["geometry.color_colors"] == 0.01 and "geometry.color_encoding" not in rates
    assert all(rates[f"geometry.color_{k}"] == 0.0 for k in ("means", "scales", "rotations", "opacities"))
    colours = latest_valid_checkpoint(refined)[1]["geometry"]
    for k in ("means", "log_scales", "rotations", "opacity_logits"):
        assert torch.equal(colours[f"color_field.{k}"], a[k]), k
    assert not torch.equal(colours["color_field.color_logits"], a["color_logits"])
    assert (refined / "mesh.glb").is_file() and json.loads((refined / "metrics.json").read_text())["steps"] == 2


def test_the_density_for_export_is_as_opaque_as_the_splat():
    """One round Gaussian of opacity 0.6: its density integrated along a line through its centre is -log(1 - 0.6)
    up to the 3-sigma cut (erf(3 / sqrt 2) of it), so the exported surface sits where renders turn opaque; the
    sum and the colour do not depend on how the points are chunked."""
    cloud = GaussianCloud(num_points=1, init_radius=0.01, init_scale=0.1, init_opacity=0.6).double()
    with torch.no_grad():
        cloud.means.zero_()
    s = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    line = torch.stack([s, 0.2 * s, torch.zeros_like(s)], -1) / math.sqrt(1.04)  # a unit-speed line through the centre
    with torch.no_grad():
        depth = torch.trapezoid(cloud.density(line), s)
        assert depth.item() == pytest.approx(-math.log(0.4) * math.erf(3 / math.sqrt(2)), rel=1e-4)
        assert cloud.density(torch.tensor([[0.31, 0.0, 0.0]], dtype=torch.float64)).item() == 0.0  # beyond 3 sigma
        many = GaussianCloud(num_points=200, init_radius=0.6, init_scale=0.08, seed=2).double()
        pts = torch.rand(3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8
        assert torch.allclose(many.density(pts, chunk=3000), many.density(pts, chunk=97), rtol=1e-12, atol=1e-12)
        assert torch.allclose(many.albedo(pts, chunk=3000), many.albedo(pts, chunk=97), rtol=1e-12, atol=1e-12)


def test_densify_clones_small_splits_large_prunes_faint_and_moves_adams_state():
    """Four Gaussians after one optimiser step, with hand-set gradients: #0 small and hot (cloned), #1 large and hot
    (split in two, 1.6 times smaller, drawn around itself), #2 cold (kept as is), #3 faint (pruned). The Parameter
    objects stay the optimiser's; Adam's moments follow their rows and start at 0 for the new ones."""
    cloud = GaussianCloud(num_points=4, init_scale=0.02, densify_every=1, densify_from=1, grad_threshold=0.5,
                          split_scale=0.05, prune_opacity=0.05, seed=7)
    with torch.no_grad():
        cloud.log_scales[1] = math.log(0.2)
        cloud.opacity_logits[3] = -5.0  # opacity 0.0067
    optimizer = torch.optim.Adam([{"params": p} for p in cloud.param_groups().values() for p in p], lr=0.01)
    cloud.means.grad = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0.1], [3.0, 0, 0]])
    for p in (cloud.log_scales, cloud.rotations, cloud.opacity_logits, cloud.color_logits):
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = {k: v.detach().clone() for k, v in cloud.state_dict().items()}
    moments = optimizer.state[cloud.means]["exp_avg"].clone()
    params = list(cloud.parameters())
    cloud.densify(1, optimizer)
    assert cloud.num_points == 5 and [id(p) for p in cloud.parameters()] == [id(p) for p in params]
    means = cloud.means.detach()
    # rows: kept #0, #2 (the split #1 and the pruned #3 are gone), the clone of #0, two halves of #1
    assert torch.equal(means[:2], before["means"][[0, 2]]) and torch.equal(means[2], before["means"][0])
    halves = means[3:] - before["means"][1]
    assert (halves.norm(dim=-1) > 0).all() and (halves.norm(dim=-1) < 0.2 * 4).all() and not torch.equal(halves[0], halves[1])
    assert torch.allclose(cloud.log_scales[3:].detach(), before["log_scales"][[1, 1]] - math.log(1.6))
    state = optimizer.state[cloud.means]["exp_avg"]
    assert state.shape == (5, 3) and torch.equal(state[:2], moments[[0, 2]]) and torch.equal(state[2:], torch.zeros(3, 3))
    assert torch.equal(cloud.grad_sum, torch.zeros(5)) and cloud.means.grad is None
    capped = GaussianCloud(num_points=4, densify_every=1, densify_from=1, grad_threshold=0.5, max_points=5)
    opt2 = torch.optim.Adam(capped.parameters())
    capped.means.grad = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    capped.densify(1, opt2)
    assert capped.num_points == 5 and torch.equal(capped.means[4], capped.means[1])  # only the hotter one cloned


def random_gaussians(n: int, seed: int, dtype=torch.float64) -> Gaussians:
    g0 = torch.Generator().manual_seed(seed)
    return Gaussians((torch.rand(n, 3, generator=g0, dtype=dtype) - 0.5) * 1.6,
                     0.03 + 0.15 * torch.rand(n, 3, generator=g0, dtype=dtype),
                     torch.nn.functional.normalize(torch.randn(n, 4, generator=g0, dtype=dtype), dim=-1),
                     0.2 + 0.7 * torch.rand(n, generator=g0, dtype=dtype), torch.rand(n, 3, generator=g0, dtype=dtype))


def test_the_cameras_handed_to_gsplat_project_as_the_torch_path_does():
    """gsplat's own torch reference of its projection (gsplat 1.5.3, gsplat/cuda/_torch_impl.py), given the
    viewmats and Ks the CUDA path hands over and the covariances gsplat builds from our quaternions (w, x, y, z)
    and scales, puts every Gaussian where the torch path does: means half a pixel on (its pixel centres are at
    j + 0.5), the same inverse covariances (the 1.3 half-width clamp of the Jacobian included: some Gaussians lie
    outside the frame) and the same depths. A non-square image: width and height are not swapped."""
    reference = pytest.importorskip("gsplat.cuda._torch_impl")
    from perpneg3d.renderer.gaussian_renderer import conic_and_radius, project
    from perpneg3d.renderer.gsplat_rasterizer import gsplat_cameras

    g = random_gaussians(40, seed=3)
    cams = orbit_cameras(torch.tensor([0.0, 100.0, 230.0]), torch.tensor([10.0, -20.0, 45.0]), 1.6, 50.0, 24, 40)
    cams = replace(cams, c2w=cams.c2w.double(), fovy_deg=cams.fovy_deg.double())
    viewmats, ks = gsplat_cameras(cams)
    covars, _ = reference._quat_scale_to_covar_preci(g.rotations, g.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = reference._fully_fused_projection(
        g.means, covars, viewmats, ks, cams.width, cams.height, eps2d=0.3, near_plane=0.05)
    mean2d, cov2d, depth = project(g, cams, eps2d=0.3)
    conic, _ = conic_and_radius(cov2d)
    seen = depth > 0.05
    outside = (mean2d[..., 0] < 0) | (mean2d[..., 0] > cams.width - 1) | (mean2d[..., 1] < 0) | (mean2d[..., 1] > cams.height - 1)
    assert 10 < int(seen.sum()) and int((outside & seen).sum()) >= 3  # the clamp is exercised
    assert torch.allclose(depths, depth, atol=1e-12)
    assert torch.allclose(means2d[seen] - 0.5, mean2d[seen], atol=1e-9)
    assert torch.allclose(conics[seen], conic[seen], rtol=1e-9, atol=1e-12)
    assert (radii[~seen] == 0).all()


def gsplat_stand_in(calls: list):
    """gsplat.rasterization's signature and conventions on the CPU: gsplat's torch reference projection (above),
    then the torch path's compositor (gsplat composites in CUDA only), its pixel centres moved back by half a
    pixel. Records every call's arguments."""
    reference = pytest.importorskip("gsplat.cuda._torch_impl")
    from perpneg3d.renderer.gaussian_renderer import composite

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, eps2d,
                      packed, rasterize_mode, render_mode):
        calls.append(dict(colors=colors.shape, width=width, height=height, near=near_plane, eps2d=eps2d,
                          packed=packed, mode=(rasterize_mode, render_mode), dtype=means.dtype))
        covars, _ = reference._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        _, means2d, depths, conics, _ = reference._fully_fused_projection(means, covars, viewmats, Ks, width, height,
                                                                          eps2d=eps2d, near_plane=near_plane)
        a, b, c = conics.unbind(-1)
        det = a * c - b * b
        cov2d = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
        out, alpha = composite(means2d - 0.5, cov2d, depths, opacities, colors, height, width, near_plane)
        return out, alpha, {}

    return rasterization


def test_the_gsplat_path_hands_over_per_camera_colours_depths_and_normals_as_the_torch_path_blends_them():
    """The renderer's CUDA path, run on the CPU with a stand-in for gsplat.rasterization (gsplat's reference
    projection + our compositor): rgb, opacity, depth and normals equal the torch path's on three cameras of a
    non-square image, and gsplat is called once, in float32, unpacked, classic mode, with the per-camera features
    [B, N, 7] (colour 3, distance 1, normal 3) and the renderer's near plane and eps2d."""
    g = random_gaussians(60, seed=4, dtype=torch.float32)
    cams = orbit_cameras(torch.tensor([20.0, 150.0, 260.0]), 15.0, 2.0, 40.0, 12, 20)
    make = lambda: GaussianRenderer(SolidBackground((0.2, 0.4, 0.6)), DiffuseMaterial(), near=0.1, eps2d=0.3)  # noqa: E731
    torch_path = make()(Fixed(g), cams, shading="lambertian", with_normals=True)
    calls, cuda_path = [], make()
    cuda_path._device, cuda_path._gsplat = cams.device, gsplat_stand_in(calls)  # as _gsplat_for leaves them on CUDA
    out = cuda_path(Fixed(g), cams, shading="lambertian", with_normals=True)
    assert calls == [dict(colors=torch.Size([3, 60, 7]), width=20, height=12, near=0.1, eps2d=0.3, packed=False,
                          mode=("classic", "RGB"), dtype=torch.float32)]
    assert torch_path.opacity.amax() > 0.5  # the images are not empty
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(getattr(out, key), getattr(torch_path, key), atol=2e-5), key


def test_the_rasterizer_choice_follows_the_device_and_says_so_once(monkeypatch, caplog):
    """renderer.rasterizer: an unknown value and gsplat on the CPU are one-line errors; auto on the CPU is torch;
    on CUDA, auto takes gsplat when it loads, and falls back to torch with one warning when it does not, while
    rasterizer=gsplat then refuses in one line with the reason."""
    from perpneg3d.errors import ConfigError
    from perpneg3d.renderer import gsplat_rasterizer
    from perpneg3d.renderer.nerfacc_cuda import Probe

    with pytest.raises(ConfigError, match=r"^renderer.rasterizer='splat': use auto, torch, gsplat$"):
        GaussianRenderer(SolidBackground(), DiffuseMaterial(), rasterizer="splat")
    with pytest.raises(ConfigError, match="^renderer.rasterizer=gsplat needs CUDA \\(the Gaussians are on cpu\\)"):
        GaussianRenderer(SolidBackground(), DiffuseMaterial(), rasterizer="gsplat")._gsplat_for(torch.device("cpu"))
    assert GaussianRenderer(SolidBackground(), DiffuseMaterial())._gsplat_for(torch.device("cpu")) is None
    cuda, loaded = torch.device("cuda", 0), object()
    monkeypatch.setattr(gsplat_rasterizer, "probe", lambda: Probe(True, "loaded", 0.0, loaded))
    assert GaussianRenderer(SolidBackground(), DiffuseMaterial())._gsplat_for(cuda) is loaded
    assert GaussianRenderer(SolidBackground(), DiffuseMaterial(), rasterizer="torch")._gsplat_for(cuda) is None
    monkeypatch.setattr(gsplat_rasterizer, "probe", lambda: Probe(False, "gsplat is not installed (pip install -e .[gsplat])"))
    auto = GaussianRenderer(SolidBackground(), DiffuseMaterial())
    with caplog.at_level("WARNING"):
        assert auto._gsplat_for(cuda) is None and auto._gsplat_for(cuda) is None
    warned = [r.getMessage() for r in caplog.records if "gsplat unavailable" in r.getMessage()]
    assert warned == ["gsplat unavailable (gsplat is not installed (pip install -e .[gsplat])): Gaussians are "
                      "splatted in torch, more slowly (pip install -e .[gsplat])"]
    with pytest.raises(ConfigError, match=r"^renderer.rasterizer=gsplat: gsplat is not installed .*; or use renderer.rasterizer=auto$"):
        GaussianRenderer(SolidBackground(), DiffuseMaterial(), rasterizer="gsplat")._gsplat_for(cuda)


def test_the_stable_diffusion_gaussian_preset_trains_with_its_schedule(tmp_path, tiny_sd_path):
    """experiment=gs with the tiny random Stable Diffusion: its render sizes step at its milestones (scaled down
    here), the Gaussians densify from the SD gradients, and the run writes its summary and mesh."""
    from helpers import compose_train
    from perpneg3d.training.checkpoint import latest_valid_checkpoint
    from perpneg3d.training.run import train

    cfg = compose_train(["experiment=gs", f"guidance.denoiser.pretrained_model_name_or_path={tiny_sd_path}",
                         "geometry.num_points=200", "geometry.densify_every=2", "geometry.densify_from=2",
                         "geometry.grad_threshold=1e-9", "geometry.max_points=300", "cameras.heights=[8,16,24]",
                         "cameras.widths=[8,16,24]", "cameras.resolution_milestones=[2,4]", "trainer.max_steps=5",
                         "trainer.val_every=5", "trainer.ckpt_every=5", "trainer.val_resolution=16",
                         "trainer.turntable_frames=2", "trainer.turntable_resolution=16", "trainer.progress=false",
                         "export.resolution=24", "evaluate_janus=false"], tmp_path)
    assert cfg.cameras.distance_range == [2.5, 2.5] and cfg.geometry.densify_every == 2
    cameras = instantiate_cameras(cfg)
    assert [cameras.sample(step, torch.Generator().manual_seed(0)).height for step in (1, 2, 4)] == [8, 16, 24]
    run = train(cfg)
    state = latest_valid_checkpoint(run)[1]
    assert state["step"] == 5 and 200 < state["geometry"]["means"].shape[0] <= 300  # densified, never above the cap
    assert (run / "mesh.glb").is_file() and json.loads((run / "metrics.json").read_text())["steps"] == 5


def instantiate_cameras(cfg):
    from perpneg3d.config import instantiate

    return instantiate(cfg.cameras)
