"""Issue 21's Janus mechanisms beyond re-weighting (docs/method.md, "Janus mechanisms"): each is a config option,
off by default, and does exactly what its formula says."""
import pytest
import torch

from perpneg3d.cameras import RandomCameras
from perpneg3d.geometry import ImplicitVolume
from perpneg3d.prompts import ViewPrompts
from perpneg3d.prompts.views import VIEWS
from perpneg3d.toy.text import ToyTextEncoder


def zero_field(**kwargs) -> ImplicitVolume:
    """A field whose MLPs output 0, so density = softplus(density_shift + blob(x)) exactly."""
    field = ImplicitVolume(radius=1.0, n_levels=2, log2_hashmap_size=8, finest_resolution=32, implementation="torch",
                           blob_scale=10.0, blob_std=0.4, density_shift=-1.0, **kwargs)
    for p in field.density_mlp.parameters():
        torch.nn.init.zeros_(p)
    return field


def test_ellipsoid_blob_follows_its_radii_and_the_ball_is_unchanged():
    softplus = torch.nn.functional.softplus
    ell = zero_field(blob_radii=(0.5, 0.3, 0.4))
    # on each axis at half its radius: blob = 10 * (1 - 0.5) = 5 -> softplus(4)
    pts = torch.tensor([[0.25, 0, 0], [0, 0.15, 0], [0, 0, -0.2], [0.5, 0.3, 0.0]])
    expect = softplus(torch.tensor([4.0, 4.0, 4.0, 10 * (1 - 2 ** 0.5) - 1]))
    assert torch.allclose(ell.density(pts), expect, atol=1e-5)
    ball = zero_field()  # blob_radii null: the ball of radius blob_std, |x| / 0.4
    assert torch.allclose(ball.density(pts[:1]), softplus(torch.tensor([10 * (1 - 0.25 / 0.4) - 1])), atol=1e-5)
    assert ball.state_dict().keys() == ell.state_dict().keys()  # checkpoints load either way


def test_azimuth_curriculum_widens_from_the_front_view():
    cams = RandomCameras(batch_size=4, progressive_until=99)
    g = torch.Generator().manual_seed(0)
    assert cams.sample(0, g).azimuth_deg.abs().max().item() == 0.0  # step 0: the front view only
    assert cams.azimuth_range_at(50) == (-90.0, 90.0)  # r = 50 / 100
    half = torch.cat([cams.sample(50, g).azimuth_deg for _ in range(50)])
    assert half.abs().max() <= 90.0 and half.abs().max() > 80.0
    assert cams.azimuth_range_at(100) == (-180.0, 180.0) == cams.azimuth_range_at(10_000)
    assert RandomCameras().azimuth_range_at(0) == (-180.0, 180.0)  # 0: no curriculum


class ToyEmbedder:
    """The toy prior's text side alone: a bag-of-words encoder, so it declares contracts.LinearTextEmbedding (the
    embedding-space emphasis is refused for a prior that does not: tests/test_emphasis.py)."""

    linear_text_embedding = True

    def __init__(self):
        self.encoder = ToyTextEncoder()

    def embed(self, texts):
        return self.encoder(texts)


def test_view_emphasis_weights_the_view_words_of_the_toy_encoder():
    """The toy encoder sums word vectors, so e(prompt) + w (e(view text) - e(prompt)) must equal the sum with the
    words "side" and "view" counted w times: computed here from single words, not with the formula."""
    enc = ToyTextEncoder()
    w = 8.0
    prompts = ViewPrompts("a toy cat", view_emphasis=w).bind(ToyEmbedder())
    words = enc(["a", "toy", "cat", "side", "view"])
    expect = words[:3].sum(0) + w * words[3:].sum(0)
    assert torch.allclose(prompts._emb[1 + VIEWS.index("side")], expect, atol=1e-6)
    assert torch.equal(prompts._emb[0], enc([""])[0])  # the unconditional text is not touched
    plain = ViewPrompts("a toy cat").bind(ToyEmbedder())
    assert plain.texts() == ViewPrompts("a toy cat").texts() and len(plain.texts()) == 1 + len(VIEWS)
    assert torch.equal(plain._emb, enc(plain.texts()))  # w = 1: exactly the texts' embeddings


def test_view_emphasis_moves_the_toy_priors_mass_to_the_named_view():
    """What the mechanism is for: with the caption prior of the toy preset's data set, "a toy cat, side view" puts
    about the data set's 25% of its cat mass on side views at w = 1, and the majority at w = 8 (docs/janus.md)."""
    from hydra.utils import instantiate

    from perpneg3d.config import compose_config

    prior = instantiate(compose_config("train", ["experiment=toy"]).guidance.denoiser)
    data = prior.dataset
    cat, side = data.objects.index("cat"), 1
    shares = []
    for w in (1.0, 4.0, 8.0):
        emb = ViewPrompts("a toy cat", view_emphasis=w).bind(prior)._emb[1 + VIEWS.index("side")]
        p = prior.log_prior(emb[None])[0].exp()
        mine = data.object_idx == cat
        shares.append((p[mine & (data.view_idx == side)].sum() / p[mine].sum()).item())
    assert shares[0] < 0.3 and shares[0] < shares[1] < shares[2] and shares[2] > 0.5


@pytest.mark.parametrize("method", ["x2_emph8", "x2_window", "x2_progressive", "x2_ellipsoid", "x2_score8"])
def test_each_benchmark_mechanism_builds_and_is_off_in_the_preset(method):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from perpneg3d.config import CONFIG_DIR, compose_config

    bench = OmegaConf.load(CONFIG_DIR / "bench_janus.yaml")
    cfg = compose_config("train", ["experiment=toy", *bench.method_overrides[method]])
    preset = compose_config("train", ["experiment=toy"])
    assert preset.prompts.view_emphasis == 1.0 == preset.prompts.score_emphasis and preset.cameras.progressive_until == 0
    assert preset.geometry.blob_radii is None
    changed = {k for k in ("prompts", "cameras", "geometry", "guidance") if cfg[k] != preset[k]}
    assert len(changed) == 1  # one mechanism each
    key = changed.pop()
    instantiate(cfg[key], **({"denoiser": None} if key == "guidance" else {}))
