"""The offline toy world: data, the closed-form prior, the classifier, determinism."""
import pytest
import torch
import torch.nn.functional as F

from perpneg3d.cameras import CameraBatch, look_at, spherical_position
from perpneg3d.errors import ConfigError
from perpneg3d.guidance.ddim_sampler import sample
from perpneg3d.prompts.views import view_labels
from perpneg3d.toy.classifier import ToyViewClassifier
from perpneg3d.toy.dataset import ToyDataset
from perpneg3d.toy.objects import render_objects
from perpneg3d.toy.prior import ToyPrior


@pytest.fixture(scope="module")
def small_world():
    return ToyDataset(num_images=300, seed=3)


@pytest.fixture(scope="module")
def prior(small_world):
    return ToyPrior(small_world, device="cpu")


def test_dataset_is_seeded_and_cached_by_parameters(tmp_path):
    a = ToyDataset(num_images=120, seed=5, cache_dir=str(tmp_path / "a"))
    b = ToyDataset(num_images=120, seed=5, cache_dir=str(tmp_path / "b"))
    c = ToyDataset(num_images=120, seed=6, cache_dir=str(tmp_path / "a"))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert len(list((tmp_path / "a").glob("toy_*.pt"))) == 2  # a parameter change is a new cache entry
    again = ToyDataset(num_images=120, seed=5, cache_dir=str(tmp_path / "a"))
    assert torch.equal(again.images, a.images)


def test_dataset_mimics_web_captions():
    # the default world's 3000 draws of view and caption (they come before any rendering), rendered at 8 px
    data = ToyDataset(resolution=8, supersample=1)
    shares = torch.bincount(data.view_idx, minlength=3).float() / len(data)
    assert torch.allclose(shares, torch.tensor([0.6, 0.25, 0.15]), atol=0.03)
    named = data.caption_view >= 0
    assert abs(named.float().mean() - 0.33) < 0.03
    wrong = (data.caption_view[named] != data.view_idx[named]).float().mean()
    assert abs(wrong - 0.2) < 0.04
    assert data.captions[0].startswith("a toy ") and data.images.shape == (3000, 3, 8, 8)


def test_denoiser_matches_a_per_item_reference(small_world, prior):
    idx = torch.arange(0, 300, 15)  # 20 items, computed the slow, obvious way in float64
    x = (small_world.images * 2 - 1).flatten(1).double()
    emb = prior.embed(["a toy dog, side view"])
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 3, 32, 32, generator=g)
    t = torch.tensor([500])
    abar = prior.alphas_cumprod[500].double()
    sub = ToyPrior.__new__(ToyPrior)
    sub.__dict__.update(prior.__dict__)
    sub.data, sub.caption_emb = prior.data[idx], prior.caption_emb[idx]
    sub.mean = sub.data.mean(0)
    sub.data_centered = sub.data - sub.mean
    sub.data_sqnorm = (sub.data_centered ** 2).sum(1)
    logp = torch.log_softmax((emb.double() @ prior.caption_emb[idx].double().T) / prior.tau, -1)[0]
    logits = torch.stack([logp[i] - ((x_t.double().flatten() - abar.sqrt() * x[j]) ** 2).sum() / (2 * (1 - abar))
                          for i, j in enumerate(idx.tolist())])
    w = torch.softmax(logits, 0)
    x0 = (w[:, None] * x[idx]).sum(0)
    eps_ref = (x_t.double().flatten() - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert torch.allclose(sub.eps(x_t, t, emb).double().flatten(), eps_ref, atol=1e-3)


def test_at_small_t_the_denoiser_returns_the_noise(small_world, prior):
    g = torch.Generator().manual_seed(1)
    x0 = small_world.images[[7, 42]] * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 0])
    abar = prior.alphas_cumprod[0]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps = prior.eps(x_t, t, prior.embed(["a toy dog", ""]))
    assert torch.allclose(eps, noise, atol=1e-3)


def test_posterior_weights_sum_to_one_and_empty_prompt_is_unconditional(prior):
    emb = prior.embed(["", "a toy cat, back view"])
    assert emb[0].abs().sum() == 0
    logp = prior.log_prior(emb)
    assert torch.allclose(logp[0], torch.full_like(logp[0], -torch.log(torch.tensor(300.0))))  # uniform
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    w, _ = prior.posterior(x_t, torch.tensor([900, 300]), emb)
    assert torch.allclose(w.sum(1), torch.ones(2)) and (w >= 0).all()
    cat = torch.tensor([c.startswith("a toy cat") for c in prior.dataset.captions])
    w_hi, _ = prior.posterior(x_t, torch.tensor([999, 999]), emb)
    assert w_hi[1, cat].sum() > 0.99 and abs(w_hi[0, cat].sum() - cat.float().mean()) < 0.1


def test_unknown_object_lists_the_known_ones(prior):
    with pytest.raises(ConfigError, match=r"names no object the toy prior knows: use one of dog .*cat .*car"):
        prior.embed(["a teapot"])
    prior.embed(["a corgi standing, side view"])  # a synonym is fine


def test_same_seed_same_samples(prior):
    emb = prior.embed(["", "a toy car, side view", "a toy car, front view"])
    a = sample(prior, emb, torch.tensor([2.0]), 3, steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    b = sample(prior, emb, torch.tensor([2.0]), 3, steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    c = sample(prior, emb, torch.tensor([2.0]), 3, steps=5, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def held_out(n, seed, names=("dog", "cat", "car")):
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=g) * 360 - 180
    el = torch.rand(n, generator=g) * 30
    dist = 1.8 + 0.3 * torch.rand(n, generator=g)
    obj = torch.randint(len(names), (n,), generator=g)
    eye = spherical_position(az, el, dist)
    cams = CameraBatch(look_at(eye, torch.zeros_like(eye)), torch.full((n,), 40.0), az, el, dist, eye, 32, 32)
    return render_objects([names[i] for i in obj.tolist()], cams, supersample=2), obj, view_labels(az, torch.zeros(n))


def test_classifier_accuracy_on_held_out_renders():
    clf = ToyViewClassifier()
    images, obj, view = held_out(300, seed=11)
    pred = clf(images)
    accuracy = ((pred.object_idx == obj) & (pred.view_idx == view)).float().mean()
    assert accuracy >= 0.95
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    saturated = ((images - 0.5) * 2 + 0.5).clamp(0, 1)
    for variant in (blurred, saturated):
        p = clf(variant)
        assert ((p.object_idx == obj) & (p.view_idx == view)).float().mean() >= 0.9
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xx / 0.5) ** 2 + (yy / 0.4) ** 2 < 1).float()
    blob = 1 - disc * (1 - torch.tensor([0.3, 0.6, 0.3]).view(3, 1, 1))
    assert clf(blob.unsqueeze(0)).object_idx.item() == -1  # a blob is no object


def test_a_variant_world_keeps_the_object_names_of_captions_and_prompts(tmp_path):
    """objects=[dog, "cat:ginger", car]: the same shapes, the cat in ginger (docs/janus.md); captions, prompts and
    the classifier still call it a cat, and its pixels are no longer grey."""
    from perpneg3d.errors import ConfigError
    from perpneg3d.toy.classifier import ToyViewClassifier
    from perpneg3d.toy.dataset import ToyDataset
    from perpneg3d.toy.objects import check_objects

    data = ToyDataset(objects=["dog", "cat:ginger", "car"], num_images=30, resolution=16, cache_dir=str(tmp_path))
    cats = [c for c, o in zip(data.captions, data.object_idx.tolist()) if o == 1]
    assert cats and all(c.startswith("a toy cat") for c in cats)
    cat_images = data.images[data.object_idx == 1]
    ink = (1 - cat_images).sum(1) > 0.15
    red, blue = cat_images[:, 0][ink].mean(), cat_images[:, 2][ink].mean()
    assert red > blue + 0.2  # ginger, not the default world's grey (0.43 vs 0.46)
    classifier = ToyViewClassifier(data.objects, resolution=16, azimuth_step_deg=30.0, cache_dir=str(tmp_path))
    assert classifier.object_index("a toy kitten") == 1
    with pytest.raises(ConfigError, match="one variant per object"):
        check_objects(["cat", "cat:ginger"])


def test_the_held_out_objects_have_a_recognisable_front_side_and_back(tmp_path):
    """The world of the three objects added for issue 21's held-out evaluation: its classifier names object and view
    of random renders as well as the original world's does."""
    names = ("horse", "rabbit", "chair")
    clf = ToyViewClassifier(names, cache_dir=str(tmp_path))
    images, obj, view = held_out(300, seed=12, names=names)
    pred = clf(images)
    assert ((pred.object_idx == obj) & (pred.view_idx == view)).float().mean() >= 0.95
    assert clf.object_index("a toy bunny") == 1 and clf.object_index("an armchair") == 2


def test_held_out_words_leave_the_original_worlds_embeddings_unchanged():
    """Texts of the original world embed exactly as before the held-out objects existed (the figures were taken
    from the encoder of the commit before), zero-padded; held-out objects get their own orthogonal directions."""
    from perpneg3d.toy.text import ToyTextEncoder

    enc = ToyTextEncoder()
    x = enc(["a toy cat, side view", "a toy dog"]).double()
    assert x.shape == (2, 67) and torch.equal(x[:, 64:], torch.zeros(2, 3, dtype=torch.float64))
    assert x[:, :64].sum().item() == pytest.approx(1.9674980611307546, abs=1e-12)
    assert (x[:, :64] ** 2).sum().item() == pytest.approx(2.053687142877568, abs=1e-12)
    assert x[0, 8].item() == pytest.approx(-0.002382921986281872, abs=1e-12)
    horse, rabbit, dog = enc(["horse", "bunny", "dog"])
    assert horse[64] == 1.0 and rabbit[65] == 1.0 and horse @ dog == 0 and horse @ rabbit == 0


def _build_slowly(path, log):
    import time

    from perpneg3d.toy.dataset import cached_or_built

    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(3.0)  # longer than the two processes' start-up differs: without the lock both would build
        return {"x": torch.arange(3)}

    return cached_or_built(path, build)["x"].tolist()


def test_processes_that_need_the_same_cache_file_build_it_once(tmp_path):
    """Two processes (two sweep jobs, two test workers) asking for a missing cache file at once: one builds it, the
    other waits on the lock and reads it."""
    import multiprocessing

    path, log = tmp_path / "cache" / "toy_x.pt", tmp_path / "log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(_build_slowly, [(path, log), (path, log)])
    assert got == [[0, 1, 2], [0, 1, 2]] and log.read_text() == "built\n"
