"""View labels and the Perp-Neg view schedules of DESIGN.md."""
import pytest
import torch

from perpneg3d.prompts import ExponentialSchedule, StableDreamfusionSchedule, view_labels, wrap_azimuth
from perpneg3d.prompts.views import BACK, FRONT, OVERHEAD, SIDE


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_wrap_azimuth():
    assert torch.allclose(wrap_azimuth(t(0, 180, -180, 190, -190, 540, 359)), t(0, 180, 180, -170, 170, 180, -1))


def test_labels_at_thresholds():
    az = t(0, 44.9, 45, -45, 90, 135, 135.1, -135.1, 180, 10)
    el = t(0, 0, 0, 0, 0, 0, 0, 0, 60, 60.1)
    expected = [FRONT, FRONT, SIDE, SIDE, SIDE, SIDE, BACK, BACK, BACK, OVERHEAD]
    assert view_labels(az, el).tolist() == expected


def test_threestudio_schedule_values():
    mix = ExponentialSchedule()(t(0, 90, 180, -90), t(0, 0, 0, 0))
    w_front, w_side = mix.neg_weights[:, 0], mix.neg_weights[:, 1]
    assert torch.allclose(w_front, t(0.0, 1.574, 1.967, 1.574), atol=2e-3)
    assert torch.allclose(w_side, t(1.574, 0.0, 0.394, 0.0), atol=2e-3)
    assert mix.pos_mix[:, :3].argmax(1).tolist() == [FRONT, SIDE, BACK, SIDE]
    assert torch.allclose(mix.pos_mix.sum(1), torch.ones(4))


def test_threestudio_positive_interpolation():
    mix = ExponentialSchedule()(t(45, 135), t(0, 0))
    assert torch.allclose(mix.pos_mix, t([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]).reshape(2, 4))


@pytest.mark.parametrize("edge", [90.0, -90.0, 180.0])
def test_threestudio_schedule_continuity(edge):
    sched = ExponentialSchedule()
    eps = 1e-3
    before, after = t(edge - eps), t(edge + eps)
    a, b = sched(before, t(0)), sched(after, t(0))
    assert torch.allclose(a.neg_weights, b.neg_weights, atol=2e-3)
    assert torch.allclose(a.pos_mix, b.pos_mix, atol=1e-4)


def test_overhead_has_no_negatives():
    mix = ExponentialSchedule()(t(30), t(75))
    assert mix.pos_mix.tolist() == [[0, 0, 0, 1]]
    assert mix.neg_weights.abs().sum() == 0


def test_stable_dreamfusion_schedule_values():
    mix = StableDreamfusionSchedule()(t(0, 45, 90, 180), t(0, 0, 0, 0))
    front, side = mix.neg_weights[:, 0], mix.neg_weights[:, 1]
    assert torch.allclose(front, t(0.0, 2 * torch.exp(t(-1.0)).item(), 2.0, 2.0), atol=1e-5)
    assert torch.allclose(side, t(2.0, 2 * torch.exp(t(-5.0)).item(), 0.0, 1.0), atol=1e-5)


def test_schedule_vectorised_over_batch():
    az = torch.linspace(-180, 180, 37)
    sched = ExponentialSchedule()
    batched = sched(az, torch.zeros(37)).neg_weights
    single = torch.cat([sched(a.reshape(1), torch.zeros(1)).neg_weights for a in az])
    assert torch.allclose(batched, single)
