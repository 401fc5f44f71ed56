"""The multi-view toy prior (issue 29): with one view per group and a flat camera kernel it is the toy prior
exactly; a view is drawn from the images near its camera; a group's views share one object and other groups are
untouched; and it trains through train.py's path with experiment=toy_mv."""
from __future__ import annotations

import json

import pytest
import torch

from perpneg3d.cameras import orbit_cameras
from perpneg3d.cameras.camera_batch import wrap_azimuth
from perpneg3d.errors import ConfigError
from perpneg3d.toy.dataset import ToyDataset
from perpneg3d.toy.multiview import ToyMultiViewPrior, camera_angles
from perpneg3d.toy.prior import ToyPrior


@pytest.fixture(scope="module")
def dataset():
    return ToyDataset(num_images=300)


def test_camera_angles_invert_the_orbit():
    az, el = torch.tensor([0.0, 90.0, -135.0, 170.0]), torch.tensor([0.0, 15.0, 30.0, 5.0])
    got_az, got_el = camera_angles(orbit_cameras(az, el, 2.0, 40.0, 8).c2w)
    assert torch.allclose(got_az, az, atol=1e-4) and torch.allclose(got_el, el, atol=1e-4)


def test_one_view_and_a_flat_kernel_is_the_toy_prior(dataset):
    plain = ToyPrior(dataset, device="cpu")
    multi = ToyMultiViewPrior(dataset, device="cpu", views_per_group=1, azimuth_width=1e9, elevation_width=1e9)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 3, 32, 32, generator=g), torch.tensor([50, 200, 500, 800, 950])
    emb = plain.embed(["a toy dog", "a toy cat, back view", "", "a toy car", "a toy dog, side view"])
    cams = orbit_cameras(torch.tensor([0.0, 80.0, 160.0, -100.0, 30.0]), 10.0, 2.0, 40.0, 32).c2w
    assert torch.allclose(multi.eps_views(x, t, emb, cams), plain.eps(x, t, emb), atol=1e-5)
    with pytest.raises(ConfigError, match="conditions every image on its camera"):
        multi.eps(x, t, emb)


def test_a_view_is_drawn_near_its_camera(dataset):
    """At high noise the posterior is about the prior: each camera puts > 90 % of its weight on the images within
    45 degrees of it, though only 15 % of the data are back views and the caption names none (the toy prior
    without cameras: under 20 % on the back, its share of the data)."""
    prior = ToyMultiViewPrior(dataset, device="cpu")
    cams = orbit_cameras(torch.tensor([180.0, 270.0, 0.0, 90.0]), 15.0, 2.0, 40.0, 32).c2w
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t, emb = torch.full((4,), 990), prior.embed(["a toy dog"] * 4)
    w, _ = prior.posterior_views(x, t, emb, cams)
    for row, azimuth in enumerate((180.0, -90.0, 0.0, 90.0)):
        near = wrap_azimuth(dataset.azimuth_deg.float() - azimuth).abs() < 45
        assert w[row, near].sum() > 0.9, row
    back = wrap_azimuth(dataset.azimuth_deg.float() - 180.0).abs() < 45
    assert ToyPrior(dataset, device="cpu").posterior(x, t, emb)[0][0, back].sum() < 0.2


def test_a_groups_views_share_one_object_and_other_groups_are_untouched(dataset):
    """Two groups, no text: view 0 of group 0 is a lightly noised cat image (t = 100); the group's other three views,
    at t = 990 (nearly no evidence of their own), then put >= 99 % of their weight on cat images; group 1 is
    bit-identical to itself alone."""
    prior = ToyMultiViewPrior(dataset, device="cpu")
    cat = int(torch.nonzero(dataset.object_idx == dataset.objects.index("cat"))[0])
    azimuth = float(dataset.azimuth_deg[cat])
    cams = orbit_cameras(wrap_azimuth(torch.tensor([0.0, 90.0, 180.0, 270.0] * 2) + azimuth),
                         float(dataset.elevation_deg[cat]), 2.0, 40.0, 32).c2w
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 32, 32, generator=g)
    t = torch.tensor([100, 990, 990, 990] + [600] * 4)
    abar = prior.alphas_cumprod[100]
    x[0] = abar.sqrt() * (dataset.images[cat] * 2 - 1) + (1 - abar).sqrt() * torch.randn(3, 32, 32, generator=g)
    emb = prior.embed([""] * 8)
    w, _ = prior.posterior_views(x, t, emb, cams)
    cats = dataset.object_idx == dataset.objects.index("cat")
    assert (w[1:4][:, cats].sum(-1) > 0.99).all()
    alone, _ = prior.posterior_views(x[4:], t[4:], emb[4:], cams[4:])
    assert torch.equal(w[4:], alone)
    assert torch.allclose(w.sum(-1), torch.ones(8), atol=1e-5)
    with pytest.raises(ValueError, match="6 images do not form groups of 4 views"):
        prior.posterior_views(x[:6], t[:6], emb[:6], cams[:6])


def test_experiment_toy_mv_trains_through_train_py(tmp_path):
    from helpers import TINY_TOY, compose_train
    from perpneg3d.training.run import train

    tiny = [o for o in TINY_TOY if o != "experiment=toy"]
    cfg = compose_train(["experiment=toy_mv", *tiny, "trainer.max_steps=4", "evaluate_janus=false", "~export"], tmp_path)
    assert cfg.cameras.views_per_group == 4 and cfg.cameras.batch_size == 4 and cfg.prompts.template == "{prompt}"
    run = train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["nonfinite_steps"] == 0
