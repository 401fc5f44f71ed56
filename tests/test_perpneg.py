"""combine(): hand-computed values and the properties the paper relies on."""
import pytest
import torch

from perpneg3d.errors import ConfigError
from perpneg3d.guidance.perpneg import MODES, combine, perpendicular


def one(*vals):
    return torch.tensor([vals], dtype=torch.float32)


CASES = {
    # eps_u=[1,2], eps_pos=[3,2] (d_pos=[2,0]), eps_neg=[2,5] (d_neg=[1,3], perp=[0,3]), w=0.5, scale=3
    "cfg": [7.0, 2.0],
    "negprompt": [5.0, -4.0],
    "cebm": [5.5, -2.5],
    "perpneg": [7.0, -2.5],
}


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed_values(mode):
    out = combine(one(1, 2), one(3, 2), one(2, 5).unsqueeze(1), torch.tensor([[0.5]]), 3.0, mode)
    assert torch.allclose(out, one(*CASES[mode]))


def test_hand_computed_two_negatives():
    # d_pos = [1,0,0]; d_neg1 = [1,1,0] -> perp [0,1,0]; d_neg2 = [-2,0,1] -> perp [0,0,1]
    eps_u = torch.zeros(1, 3)
    eps_neg = torch.tensor([[[1.0, 1, 0], [-2, 0, 1]]])
    out = combine(eps_u, torch.tensor([[1.0, 0, 0]]), eps_neg, torch.tensor([[2.0, 3.0]]), 2.0, "perpneg")
    assert torch.allclose(out, torch.tensor([[2.0, -4.0, -6.0]]))
    cebm = combine(eps_u, torch.tensor([[1.0, 0, 0]]), eps_neg, torch.tensor([[2.0, 3.0]]), 2.0, "cebm")
    assert torch.allclose(cebm, 2 * torch.tensor([[1 - 2 + 6, -2.0, -3.0]]))


def random_case(batch=3, k=2, shape=(4, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, *shape, generator=g)
    p = u + torch.randn(batch, *shape, generator=g)
    n = u.unsqueeze(1) + torch.randn(batch, k, *shape, generator=g)
    w = torch.rand(batch, k, generator=g) * 3
    return u.to(dtype), p.to(dtype), n.to(dtype), w


def test_residual_orthogonal_to_positive_per_sample():
    u, p, n, w = random_case()
    scale = 7.5
    out = combine(u, p, n, w, scale, "perpneg")
    d_pos = p - u
    residual = (out - u) / scale - d_pos  # = -sum_k w_k perp_k
    inner = (residual * d_pos).flatten(1).sum(1)
    assert residual.flatten(1).norm(dim=1).min() > 1.0  # not trivially zero
    assert torch.allclose(inner, torch.zeros(3), atol=1e-3)
    perp = perpendicular(n - u.unsqueeze(1), d_pos)
    assert torch.allclose((perp * d_pos.unsqueeze(1)).flatten(2).sum(-1), torch.zeros(3, 2), atol=1e-3)


@pytest.mark.parametrize("mode", ["perpneg", "cebm"])
def test_no_negatives_or_zero_weights_is_cfg(mode):
    u, p, n, w = random_case()
    cfg = combine(u, p, None, None, 7.5, "cfg")
    assert torch.allclose(cfg, u + 7.5 * (p - u))
    assert torch.allclose(combine(u, p, None, None, 7.5, mode), cfg)
    assert torch.allclose(combine(u, p, n[:, :0], w[:, :0], 7.5, mode), cfg)
    assert torch.allclose(combine(u, p, n, torch.zeros_like(w), 7.5, mode), cfg)


def test_negative_equal_to_positive_leaves_cfg():
    u, p, _, _ = random_case()
    n = torch.stack([p, 2 * p - u], dim=1)  # both parallel to d_pos
    out = combine(u, p, n, torch.full((3, 2), 2.0), 7.5, "perpneg")
    assert torch.allclose(out, combine(u, p, None, None, 7.5, "cfg"), atol=1e-4)
    # CEBM removes the concept itself in that case
    assert not torch.allclose(combine(u, p, n, torch.full((3, 2), 2.0), 7.5, "cebm"), out, atol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_batch_permutation_equivariance(mode):
    u, p, n, w = random_case(batch=5, k=3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = combine(u, p, n, w, 5.0, mode)
    out_perm = combine(u[perm], p[perm], n[perm], w[perm], 5.0, mode)
    assert torch.allclose(out[perm], out_perm, atol=1e-5)


def test_projection_is_per_sample():
    u, p, n, w = random_case(batch=2)
    both = combine(u, p, n, w, 3.0)
    first = combine(u[:1], p[:1], n[:1], w[:1], 3.0)
    assert torch.allclose(both[:1], first, atol=1e-5)


def test_fp16_and_zero_positive_direction_stay_finite():
    u, p, n, w = random_case(dtype=torch.float16)
    out = combine(u, p, n, w, 100.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    zero_pos = combine(u, u.clone(), n, w, 100.0)  # d_pos = 0
    assert torch.isfinite(zero_pos).all()
    d_neg = (n.float() - u.float().unsqueeze(1))
    expected = u.float() - 100.0 * (w.reshape(3, 2, 1, 1, 1) * d_neg).sum(1)
    assert torch.allclose(zero_pos, expected, atol=1e-2)


def test_bad_inputs():
    u, p, n, w = random_case()
    with pytest.raises(ConfigError, match="unknown guidance mode 'nope'"):
        combine(u, p, n, w, 1.0, "nope")
    with pytest.raises(ValueError, match="neg_weights must be"):
        combine(u, p, n, w[:, :1], 1.0)


def test_negprompt_with_view_negatives_keeps_the_scale_on_front_cameras():
    """A front camera's positive is the front embedding, which is also negative 0 (weight 0 there):
    negprompt must push away from the side negative (weight 1.57), not cancel against its own positive."""
    eps_u, eps_pos = one(0, 0), one(1, 2)
    eps_neg = torch.stack([one(1, 2), one(4, -1)], 1)  # [front (== positive), side]
    out = combine(eps_u, eps_pos, eps_neg, torch.tensor([[0.0, 1.574]]), 3.0, "negprompt")
    assert torch.allclose(out, one(4, -1) + 3 * (one(1, 2) - one(4, -1)))  # [-5, 8], not eps_pos
    # a side camera (front weighted) picks the front negative; all weights 0 (overhead): plain CFG
    out = combine(eps_u, eps_pos, eps_neg, torch.tensor([[1.574, 0.0]]), 3.0, "negprompt")
    assert torch.allclose(out, one(1, 2))  # its front negative equals this positive in this made-up case
    assert torch.allclose(combine(eps_u, eps_pos, eps_neg, torch.zeros(1, 2), 3.0, "negprompt"), one(3, 6))
    # per sample in one batch: the two cases above side by side
    both = combine(torch.zeros(2, 2), torch.tensor([[1.0, 2], [1, 2]]), torch.cat([eps_neg, eps_neg]),
                   torch.tensor([[0.0, 1.574], [0.0, 0.0]]), 3.0, "negprompt")
    assert torch.allclose(both, torch.tensor([[-5.0, 8.0], [3.0, 6.0]]))


def test_time_factor_hand_values():
    from perpneg3d.guidance.perpneg import time_factor

    t = torch.tensor([0, 200, 500, 600, 999])
    assert torch.allclose(time_factor(t, 1000, (0.2, 0.6)), torch.tensor([0.0, 0.0, 0.75, 1.0, 1.0]))
    assert time_factor(t, 1000, None) is None
    # a gain multiplies the ramp; without a ramp it is a constant factor per sample
    assert torch.allclose(time_factor(t, 1000, (0.2, 0.6), 2.0), torch.tensor([0.0, 0.0, 1.5, 2.0, 2.0]))
    assert torch.equal(time_factor(t, 1000, None, 3.0), torch.full((5,), 3.0))


def test_gain_through_guided_eps_equals_scaled_weights():
    """guided_eps with neg_gain g is Perp-Neg with every view weight multiplied by g, and g = 1 is the paper's."""
    from perpneg3d.guidance.perpneg import guided_eps

    class Linear:  # eps = x * t/1000 + the embedding's first 4 entries: each block points elsewhere
        num_train_timesteps = 1000

        def eps(self, x, t, emb):
            return x * (t.float() / 1000).view(-1, 1) + emb[:, :4]

    torch.manual_seed(0)
    x, t, emb = torch.randn(2, 4), torch.tensor([300, 800]), torch.randn(8, 5)
    w = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    run = lambda weights, **kw: guided_eps(Linear(), x, t, emb, weights, 7.5, "perpneg", **kw)  # noqa: E731
    # gain 1 is the paper's Perp-Neg, written out: u + s (d_pos - sum_k w_k perp(d_k, d_pos)) per sample
    eps = Linear().eps(x.repeat(4, 1), t.repeat(4), emb)
    u, pos, negs = eps[:2], eps[2:4], eps[4:].view(2, 2, 4).transpose(0, 1)  # negs [B, K, 4]
    d_pos, d_neg = pos - u, negs - u.unsqueeze(1)
    perp = d_neg - (d_neg * d_pos.unsqueeze(1)).sum(-1, keepdim=True) / (d_pos ** 2).sum(-1).view(2, 1, 1) * d_pos.unsqueeze(1)
    paper = u + 7.5 * (d_pos - (w.unsqueeze(-1) * perp).sum(1))
    assert torch.allclose(run(w, neg_gain=1.0), paper, atol=1e-5)
    assert torch.allclose(run(w, neg_gain=2.0), run(w * 2))
    assert not torch.allclose(run(w, neg_gain=2.0), run(w), atol=1e-3)
    # with the ramp [0.2, 0.6]: t=300 -> f = 0.25, t=800 -> f = 1; gain 2 gives factors 0.5 and 2
    assert torch.allclose(run(w, neg_gain=2.0, neg_time_ramp=(0.2, 0.6)), run(w * torch.tensor([[0.5], [2.0]])))


def test_adaptive_weights_reduce_to_perpneg_when_off_and_scale_by_hand():
    u, p, n, w = random_case()
    plain = combine(u, p, n, w, 7.5, "perpneg")
    # off means the paper's formula, written out here per sample over all non-batch dims
    d_pos, d_neg = (p - u).flatten(1), (n - u.unsqueeze(1)).flatten(2)
    coef = (d_neg * d_pos.unsqueeze(1)).sum(-1) / (d_pos ** 2).sum(-1, keepdim=True)
    perp = d_neg - coef.unsqueeze(-1) * d_pos.unsqueeze(1)
    paper = (u.flatten(1) + 7.5 * (d_pos - (w.unsqueeze(-1) * perp).sum(1))).view_as(u)
    assert torch.allclose(combine(u, p, n, w, 7.5, "perpneg", neg_factor=None, alignment=False), paper, atol=1e-4)
    assert torch.allclose(combine(u, p, n, w, 7.5, "perpneg", neg_factor=torch.ones(3)), plain)
    # neg_factor 0: no negatives at all (plain CFG); 0.5: the same as halving the weights
    assert torch.allclose(combine(u, p, n, w, 7.5, "perpneg", neg_factor=torch.zeros(3)), combine(u, p, None, None, 7.5, "cfg"))
    half = torch.tensor([0.5, 0.5, 0.5])
    assert torch.allclose(combine(u, p, n, w, 7.5, "perpneg", neg_factor=half), combine(u, p, n, w * 0.5, 7.5, "perpneg"))


def test_alignment_scales_each_negative_by_its_surviving_share():
    # d_pos = [1, 0]; d_neg = [1, 1] -> perp [0, 1], surviving share 1/sqrt(2); w = 2, scale 3
    out = combine(one(0, 0), one(1, 0), one(1, 1).unsqueeze(1), torch.tensor([[2.0]]), 3.0, "perpneg", alignment=True)
    assert torch.allclose(out, one(3, -3 * 2 / 2 ** 0.5))
    # a negative parallel to the positive survives with share 0: plain CFG
    par = combine(one(0, 0), one(1, 0), one(2, 0).unsqueeze(1), torch.tensor([[5.0]]), 3.0, "perpneg", alignment=True)
    assert torch.allclose(par, one(3, 0))
    # cebm with alignment: d_neg kept whole, weight scaled by the same share
    cebm = combine(one(0, 0), one(1, 0), one(1, 1).unsqueeze(1), torch.tensor([[2.0]]), 3.0, "cebm", alignment=True)
    assert torch.allclose(cebm, 3 * (one(1, 0) - 2 / 2 ** 0.5 * one(1, 1)))
