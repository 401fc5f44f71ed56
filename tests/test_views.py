"""View labels and the Perp-Neg view schedules (docs/method.md, docs/conventions.md)."""
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
    mix = ExponentialSchedule()(t(0, 90, 180, -90))
    w_front, w_side = mix.neg_weights[:, 0], mix.neg_weights[:, 1]
    assert torch.allclose(w_front, t(0.0, 1.574, 1.967, 1.574), atol=2e-3)
    assert torch.allclose(w_side, t(1.574, 0.0, 0.394, 0.0), atol=2e-3)
    assert mix.pos_mix[:, :3].argmax(1).tolist() == [FRONT, SIDE, BACK, SIDE]
    assert torch.allclose(mix.pos_mix.sum(1), torch.ones(4))


def test_threestudio_positive_interpolation():
    mix = ExponentialSchedule()(t(45, 135))
    assert torch.allclose(mix.pos_mix, t([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]).reshape(2, 4))


@pytest.mark.parametrize("edge", [90.0, -90.0, 180.0])
def test_threestudio_schedule_continuity(edge):
    sched = ExponentialSchedule()
    eps = 1e-3
    before, after = t(edge - eps), t(edge + eps)
    a, b = sched(before), sched(after)
    assert torch.allclose(a.neg_weights, b.neg_weights, atol=2e-3)
    assert torch.allclose(a.pos_mix, b.pos_mix, atol=1e-4)


def test_overhead_has_no_negatives():
    mix = ExponentialSchedule()(t(30), torch.tensor([True]))
    assert mix.pos_mix.tolist() == [[0, 0, 0, 1]]
    assert mix.neg_weights.abs().sum() == 0


@pytest.mark.parametrize("threshold", [30.0, 60.0])
def test_one_overhead_threshold_moves_labels_and_weights(threshold):
    """prompts.overhead_min_deg decides both: a camera at elevation 45 is overhead (no negatives) at 30,
    a side camera with negatives at 60."""
    from perpneg3d.prompts import ViewPrompts
    from perpneg3d.toy.text import ToyTextEncoder

    class Embedder:
        def embed(self, texts):
            return ToyTextEncoder()(texts)

    prompts = ViewPrompts("a toy dog", overhead_min_deg=threshold)
    batch = prompts.bind(Embedder())(t(90.0), t(45.0))
    overhead = threshold < 45
    assert batch.labels.tolist() == [OVERHEAD if overhead else SIDE]
    assert (batch.neg_weights.abs().sum() == 0) == overhead


def test_stable_dreamfusion_schedule_values():
    mix = StableDreamfusionSchedule()(t(0, 45, 90, 180))
    front, side = mix.neg_weights[:, 0], mix.neg_weights[:, 1]
    assert torch.allclose(front, t(0.0, 2 * torch.exp(t(-1.0)).item(), 2.0, 2.0), atol=1e-5)
    assert torch.allclose(side, t(2.0, 2 * torch.exp(t(-5.0)).item(), 0.0, 1.0), atol=1e-5)


def test_schedule_vectorised_over_batch():
    az = torch.linspace(-180, 180, 37)
    sched = ExponentialSchedule()
    batched = sched(az).neg_weights
    single = torch.cat([sched(a.reshape(1)).neg_weights for a in az])
    assert torch.allclose(batched, single)


def test_stable_dreamfusion_schedule_on_a_grid_of_azimuths():
    """Hand-computed from stable-dreamfusion's get_pos_neg_text_embeddings (negative_w 2, front decay 2,
    side decay 10). Back half: r = 2 - |a|/90, side weight w/2 exp(-10 r) unless r > 0.8."""
    import math

    az = t(0, 30, 45, 80, 100, 120, 135, 150, 180, -135)
    front_expected = [0.0, 2 * math.exp(-2 * 2 / 3), 2 * math.exp(-1), 2 * math.exp(-2 * 1 / 9)] + [2.0] * 6
    side_expected = [2.0, 0.0 if 1 - 30 / 90 < 0.2 else 2 * math.exp(-10 / 3), 2 * math.exp(-5), 0.0,
                     0.0,  # a=100: r = 0.889 > 0.8
                     math.exp(-10 * (2 - 120 / 90)), math.exp(-5), math.exp(-10 * (2 - 150 / 90)), 1.0, math.exp(-5)]
    mix = StableDreamfusionSchedule()(az)
    assert torch.allclose(mix.neg_weights[:, 0], t(*front_expected), atol=1e-6)
    assert torch.allclose(mix.neg_weights[:, 1], t(*side_expected), atol=1e-6)
    assert abs(mix.neg_weights[6, 1].item() - 0.0067) < 1e-4  # a=135: 0.0067, not exp(-1) = 0.368
