"""Defaults that follow threestudio's dreamfusion-sd.yaml, and the formulas behind them (docs/method.md,
"Reference choices")."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import compose_train
from perpneg3d.cameras import RandomCameras
from perpneg3d.geometry import ImplicitVolume


def test_stable_diffusion_defaults_match_threestudio(tmp_path):
    cfg = compose_train([], tmp_path)
    assert cfg.geometry.density_shift == 0.0 and cfg.geometry.finest_resolution == 4096
    assert cfg.geometry.normal_type == "analytic"
    assert dict(cfg.trainer.learning_rates) == {"geometry.encoding": 0.01, "geometry.density_mlp": 0.01,
                                                "geometry.albedo_mlp": 0.01, "renderer.background": 0.001}
    assert cfg.renderer.material.albedo_ratio == 0.25 and cfg.cameras.elevation_sphere_prob == 0.5
    # the encoding built from these keys: 16 levels from 16 to 4096, threestudio's per_level_scale
    from perpneg3d.geometry.hash_grid import HashGridEncoding

    grid = HashGridEncoding(n_levels=cfg.geometry.n_levels, base_resolution=cfg.geometry.base_resolution,
                            finest_resolution=cfg.geometry.finest_resolution, log2_hashmap_size=12,
                            implementation="torch").encoding
    scales = grid.scales + 1  # level l's grid resolution: base * b^l
    assert scales[0].item() == pytest.approx(16) and scales[-1].item() == pytest.approx(4096, rel=1e-5)
    assert (scales[1] / scales[0]).item() == pytest.approx(1.447269237440378, rel=1e-6)


def test_toy_preset_keeps_its_measured_choices(tmp_path):
    cfg = compose_train(["experiment=toy"], tmp_path)
    assert cfg.geometry.density_shift == -1.0 and cfg.cameras.elevation_sphere_prob == 0.0


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_density_is_softplus_of_raw_plus_shift_plus_blob(shift):
    torch.manual_seed(0)
    field = ImplicitVolume(radius=1.0, n_levels=2, log2_hashmap_size=8, finest_resolution=32, implementation="torch",
                           density_shift=shift, blob_scale=10.0, blob_std=0.5)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.1, -0.2], [0.9, 0.0, 0.0]])
    with torch.no_grad():
        raw = field.density_mlp(field.encoding((x + 1.0) / 2.0)).squeeze(-1)  # unit cube of radius 1
        blob = 10.0 * (1 - x.norm(dim=-1) / 0.5)
        assert torch.allclose(field.density(x), F.softplus(raw + shift + blob), atol=1e-6)


@pytest.mark.parametrize("prob, expected", [(0.0, "angle"), (1.0, "sphere"), (0.5, "mix")])
def test_elevation_mixes_uniform_angle_and_uniform_sphere(prob, expected):
    """Mean of sin(elevation) over [-10, 45] degrees: uniform on the sphere (sin uniform) gives
    (sin(-10) + sin(45)) / 2 = 0.2667; uniform in angle gives (cos(-10) - cos(45)) / 0.96 rad = 0.2893."""
    lo, hi = math.radians(-10), math.radians(45)
    sphere = (math.sin(lo) + math.sin(hi)) / 2
    angle = (math.cos(lo) - math.cos(hi)) / (hi - lo)
    target = {"angle": angle, "sphere": sphere, "mix": (angle + sphere) / 2}[expected]
    cams = RandomCameras(elevation_range=(-10.0, 45.0), elevation_sphere_prob=prob)
    el = cams.sample_elevation(200_000, torch.Generator().manual_seed(0))
    assert el.min() >= -10.0 - 1e-4 and el.max() <= 45.0 + 1e-4
    assert torch.sin(torch.deg2rad(el)).mean().item() == pytest.approx(target, abs=0.002)


def test_a_run_saved_before_the_new_options_keeps_its_behaviour():
    """config.yaml of earlier runs has no density_shift / elevation_sphere_prob: building from it must
    give the field and cameras those runs were trained with (shift -1, elevation uniform in angle)."""
    assert ImplicitVolume(n_levels=2, log2_hashmap_size=8, finest_resolution=32).density_shift == -1.0
    assert RandomCameras().elevation_sphere_prob == 0.0
