"""View emphasis in score space (issue 28): eps(prompt) + w (eps(view) - eps(prompt)) on every view-conditioned
prediction inside the Perp-Neg combination, one more block in the same batched call; the embedding-space form
only where it is exact (the toy prior), refused with Stable Diffusion and DeepFloyd IF."""
import pytest
import torch

from perpneg3d.errors import ConfigError
from perpneg3d.guidance.perpneg import combine, guided_eps
from perpneg3d.prompts import ViewPrompts
from perpneg3d.prompts.views import VIEWS

AZIMUTH = torch.tensor([0.0, 70.0, 180.0])
ELEVATION = torch.tensor([10.0, 20.0, 0.0])


def by_hand(u, pos, negs, weights, p, w, scale):
    """The product of experts on each view prediction, then Perp-Neg, written out sample by sample."""
    out = []
    for b in range(u.shape[0]):
        d_pos = (p[b] + w * (pos[b] - p[b])) - u[b]
        total = d_pos.clone()
        for k in range(negs.shape[1]):
            d_neg = (p[b] + w * (negs[b, k] - p[b])) - u[b]
            perp = d_neg - (d_neg * d_pos).sum() / (d_pos * d_pos).sum() * d_pos
            total = total - weights[b, k] * perp
        out.append(u[b] + scale * total)
    return torch.stack(out)


def test_combine_applies_the_product_of_experts_before_the_projection():
    g = torch.Generator().manual_seed(0)
    u, pos, p = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    negs = torch.randn(2, 2, 4, 3, 3, generator=g, dtype=torch.float64)
    weights = torch.tensor([[1.5, 0.2], [0.0, 3.0]], dtype=torch.float64)
    got = combine(u, pos, negs, weights, 7.5, "perpneg", eps_prompt=p, emphasis=4.0)
    assert torch.allclose(got.double(), by_hand(u, pos, negs, weights, p, 4.0, 7.5), atol=1e-5)
    # cfg (no negatives): eps_u + s (eps_p + w (eps_pos - eps_p) - eps_u)
    cfg = combine(u, pos, None, None, 7.5, "cfg", eps_prompt=p, emphasis=4.0)
    assert torch.allclose(cfg.double(), u + 7.5 * (p + 4.0 * (pos - p) - u), atol=1e-5)
    # w = 0 is the prompt alone: the view words count for nothing, in the positive and the negatives
    alone = combine(u, pos, negs, weights, 7.5, "cebm", eps_prompt=p, emphasis=0.0)
    assert torch.allclose(alone.double(), u + 7.5 * ((p - u) - weights.sum(1).view(2, 1, 1, 1) * (p - u)), atol=1e-5)


class Counting:
    """A linear stand-in denoiser that records each eps call's rows."""

    num_train_timesteps = 1000

    def __init__(self, dim):
        self.calls = []
        self.proj = torch.randn(dim, 4, generator=torch.Generator().manual_seed(1))

    def eps(self, x, t, emb):
        self.calls.append(emb.shape[0])
        return x * 0.5 + (emb.float().flatten(1) @ self.proj).view(-1, 4, 1, 1)

    def embed(self, texts):  # one fixed vector per text
        return torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(sum(map(ord, text))))
                            for text in texts])


def test_one_batched_call_with_the_prompt_block_last_and_w_1_unchanged():
    den = Counting(6)
    plain = ViewPrompts("a corgi").bind(den)
    one = ViewPrompts("a corgi", score_emphasis=1.0).bind(den)
    base, same = plain(AZIMUTH, ELEVATION), one(AZIMUTH, ELEVATION)
    assert torch.equal(base.text_emb, same.text_emb) and base.text_emb.shape[0] == (2 + 2) * 3 and same.emphasis == 1.0
    emph = ViewPrompts("a corgi", score_emphasis=3.0).bind(den)
    batch = emph(AZIMUTH, ELEVATION)
    assert batch.text_emb.shape[0] == (2 + 2 + 1) * 3 and batch.emphasis == 3.0
    assert torch.equal(batch.text_emb[:12], base.text_emb)  # the other blocks as without emphasis
    assert torch.equal(batch.text_emb[12:], den.embed(["a corgi"]).expand(3, -1))  # the prompt alone, per camera
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([100, 500, 900])
    den.calls.clear()
    got = guided_eps(den, x, t, batch.text_emb, batch.neg_weights, 7.5, "perpneg", emphasis=3.0)
    assert den.calls == [15]
    eps = den.eps(x.repeat(5, 1, 1, 1), t.repeat(5), batch.text_emb).view(5, 3, 4, 2, 2)
    want = by_hand(eps[0].double(), eps[1].double(), eps[2:4].transpose(0, 1).double(), batch.neg_weights.double(),
                   eps[4].double(), 3.0, 7.5)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.equal(guided_eps(den, x, t, base.text_emb, base.neg_weights, 7.5, "perpneg"),
                       guided_eps(den, x, t, same.text_emb, same.neg_weights, 7.5, "perpneg", emphasis=same.emphasis))


@pytest.mark.parametrize("prior", ["tiny_sd", "tiny_if"])
def test_real_encoders_keep_every_token_state_and_get_the_formula(prior, request):
    den = request.getfixturevalue(prior)
    prompts = ViewPrompts("a zoomed out DSLR photo of a corgi standing", score_emphasis=4.0).bind(den)
    batch = prompts(AZIMUTH, ELEVATION)
    texts = prompts.texts()
    emb = den.embed(texts)  # the encoder's own states, padding and prompt tokens included, are what the UNet gets
    uncond, views, alone = emb[0], emb[1:1 + len(VIEWS)], emb[-1]
    blocks = batch.text_emb.view(5, 3, *emb.shape[1:])
    assert torch.equal(blocks[0], uncond.expand_as(blocks[0])) and torch.equal(blocks[4], alone.expand_as(blocks[4]))
    assert torch.equal(blocks[2][0], views[VIEWS.index("front")]) and torch.equal(blocks[3][0], views[VIEWS.index("side")])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *den.latent_shape(32, 32), generator=g).to(emb.dtype)
    t = torch.tensor([50, 400, 800])
    got = guided_eps(den, x, t, batch.text_emb, batch.neg_weights, 7.5, "perpneg", emphasis=4.0)
    with torch.no_grad():
        eps = den.eps(x.repeat(5, 1, 1, 1), t.repeat(5), batch.text_emb).float().view(5, 3, *x.shape[1:])
    want = by_hand(eps[0].double(), eps[1].double(), eps[2:4].transpose(0, 1).double(), batch.neg_weights.double(),
                   eps[4].double(), 4.0, 7.5)
    assert torch.allclose(got.double(), want, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("prior", ["tiny_sd", "tiny_if"])
def test_embedding_space_emphasis_is_refused_with_a_real_encoder(prior, request):
    den = request.getfixturevalue(prior)
    with pytest.raises(ConfigError) as err:
        ViewPrompts("a corgi", view_emphasis=8.0).bind(den)
    assert str(err.value) == (
        f"prompts.view_emphasis=8.0 weights text embeddings, which weights the view words only for a bag-of-words "
        f"encoder (the toy prior's), not {type(den).__name__}'s: use prompts.score_emphasis=8.0 (the same weighting "
        f"on the noise predictions, any prior)")


def test_both_forms_at_once_are_refused():
    with pytest.raises(ConfigError, match=r"^prompts.view_emphasis=8.0 and prompts.score_emphasis=2.0 both weight"):
        ViewPrompts("a corgi", view_emphasis=8.0, score_emphasis=2.0)


def test_clip_structured_toy_encoder_has_clips_token_layout():
    """structure=clip: [<bos>, words, <eos>, padding] states, each the unit-norm causal sum of the tokens up to it
    plus its position; a text and the same text with view words share exactly the states before the view words,
    and differ at every later one, the padding included."""
    from perpneg3d.toy.text import ToyTextEncoder

    enc = ToyTextEncoder(structure="clip", max_length=8)
    prompt, view = enc(["a toy dog", "a toy dog, side view"])
    assert prompt.shape == (8, 67) and torch.allclose(prompt.norm(dim=-1), torch.ones(8))
    words = [enc._word_vector(t) for t in ("<bos>", "a", "toy", "dog", "<eos>")]
    by_hand = torch.stack([sum(words[:min(i, 4) + 1]) + enc.positions[i] for i in range(8)])
    assert torch.allclose(prompt, by_hand / by_hand.norm(dim=-1, keepdim=True), atol=1e-6)
    differs = (view - prompt).norm(dim=-1) > 1e-6
    assert differs.tolist() == [False] * 4 + [True] * 4  # shared prefix: <bos> a toy dog
    assert not (enc(["a toy dog side view and more words than fit"])[0] - enc(["a toy dog side view and more"])[0]).any()
    # the read-out is not linear in the states: extrapolating states is not extrapolating features
    w = 8.0
    assert not torch.allclose(enc.readout((prompt + w * (view - prompt))[None]),
                              enc.readout(prompt[None]) + w * (enc.readout(view[None]) - enc.readout(prompt[None])),
                              atol=1e-2)


def test_the_clip_structured_encoder_catches_embedding_space_emphasis():
    """The same toy world with the CLIP-structured encoder: at w = 1 the view prompts' caption priors match the
    bag-of-words world's (view shares within 0.02); extrapolating the conditioning by w = 8 moves the side share
    much less there, and costs object mass, which the bag-of-words world cannot show; the option is refused."""
    from hydra.utils import instantiate

    from perpneg3d.config import compose_config
    from perpneg3d.toy.prior import ToyPrior
    from perpneg3d.toy.text import ToyTextEncoder

    bag = instantiate(compose_config("train", ["experiment=toy"]).guidance.denoiser)
    encoder = dict(bag.text_encoder.__dict__)
    clip = ToyPrior(bag.dataset, ToyTextEncoder(encoder["dim"], encoder["object_weight"], encoder["view_weight"],
                                                encoder["other_weight"], structure="clip"), tau=bag.tau)
    data = bag.dataset
    mine = data.object_idx == data.objects.index("dog")

    def shares(prior, w):
        base, side = prior.embed(["a toy dog", "a toy dog, side view"]).split(1)
        p = prior.log_prior(base + w * (side - base))[0].exp()
        return p[mine].sum().item(), (p[mine & (data.view_idx == 1)].sum() / p[mine].sum()).item(), prior

    bag1, clip1 = shares(bag, 1.0), shares(clip, 1.0)
    assert abs(bag1[1] - clip1[1]) < 0.02 and bag1[0] > 0.999 and clip1[0] > 0.999
    bag8, clip8 = shares(bag, 8.0), shares(clip, 8.0)
    assert bag8[1] > 0.6 and clip8[1] < 0.45 and bag8[0] > 0.999 and clip8[0] < 0.99
    with pytest.raises(ConfigError, match=r"not ToyPrior with text_encoder.structure=clip's: use prompts.score_emphasis=8.0"):
        ViewPrompts("a toy dog", view_emphasis=8.0).bind(clip8[2])
    assert ViewPrompts("a toy dog", view_emphasis=8.0).bind(bag8[2])._emb.shape == (5, 67)


def test_the_2d_sampler_adds_the_prompts_block_and_combines_with_the_emphasis():
    """eval_view_fidelity's methods take `emphasis`: the sampler's texts get the prompt last, each step's one call
    has (3+K) blocks, and one step equals guided_eps with that emphasis (a one-step DDIM from known noise)."""
    from perpneg3d.evaluation.view_fidelity import cell_texts
    from perpneg3d.guidance.ddim_sampler import sample
    from perpneg3d.toy.prior import linear_alphas_cumprod

    assert cell_texts("a toy dog", "side", "perpneg", 4.0) == [
        "", "a toy dog, side view", "a toy dog, front view", "a toy dog, back view", "a toy dog"]
    assert cell_texts("a toy dog", "side", "perpneg") == cell_texts("a toy dog", "side", "perpneg", 4.0)[:-1]

    class Tiny(Counting):
        alphas_cumprod, image_size = linear_alphas_cumprod(), 2

        def latent_shape(self, h, w):
            return (4, 2, 2)

        def decode(self, x):
            return x

    den = Tiny(6)
    emb = den.embed(cell_texts("a toy dog", "side", "perpneg", 4.0))
    weights = torch.tensor([1.0, 2.0])
    got = sample(den, emb, weights, 3, scale=7.5, steps=1, generator=torch.Generator().manual_seed(0), progress=False,
                 emphasis=4.0)
    assert den.calls == [15]
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 1, dtype=torch.long)  # DDIM with one step of 1000 (steps_offset=1) runs t = 1
    eps = guided_eps(den, x, t, emb.repeat_interleave(3, 0), weights.expand(3, 2), 7.5, "perpneg", emphasis=4.0)
    abar, prev = den.alphas_cumprod[1], den.alphas_cumprod[0]  # DDIM steps from t = 1 to abar_0 (set_alpha_to_one off)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert torch.allclose(got, prev.sqrt() * x0 + (1 - prev).sqrt() * eps, atol=1e-4)
