"""The Perp-Neg combination of denoiser outputs: the only copy in perpneg3d.

Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", eq. (4)-(5) and Algorithm 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from perpneg3d.contracts import MultiView
from perpneg3d.errors import ConfigError

MODES = ("cfg", "negprompt", "cebm", "perpneg")


def perpendicular(d_neg: Tensor, d_pos: Tensor, eps: float = 1e-12) -> Tensor:
    """Part of each negative direction perpendicular to the positive one, per sample.

    d_neg [B,K,...], d_pos [B,...]; the inner product runs over all non-batch dims:
    ``perp_k = d_neg_k - <d_neg_k, d_pos> / max(||d_pos||^2, eps) * d_pos``.
    A zero d_pos leaves d_neg unchanged (the projection coefficient is 0, not NaN).
    """
    batch, k = d_neg.shape[:2]
    pos = d_pos.reshape(batch, 1, -1)
    neg = d_neg.reshape(batch, k, -1)
    coef = (neg * pos).sum(-1, keepdim=True) / (pos * pos).sum(-1, keepdim=True).clamp_min(eps)
    return (neg - coef * pos).reshape(d_neg.shape)


def combine(
    eps_uncond: Tensor,
    eps_pos: Tensor,
    eps_neg: Tensor | None,
    neg_weights: Tensor | None,
    scale: float,
    mode: str = "perpneg",
    *,
    neg_factor: Tensor | None = None,
    alignment: bool = False,
    eps_prompt: Tensor | None = None,
    emphasis: float = 1.0,
) -> Tensor:
    """Combine unconditional, positive and K negative noise predictions into one.

    Shapes: eps_uncond, eps_pos [B,...]; eps_neg [B,K,...]; neg_weights [B,K]; K may be 0
    (eps_neg/neg_weights None or empty). With d_c = eps_c - eps_uncond and w = scale:

    - ``cfg``:       eps_uncond + w * d_pos
    - ``negprompt``: eps_neg_k + w * (eps_pos - eps_neg_k), k the sample's most weighted negative
                     (eps_uncond when K = 0 or all its weights are 0). With view negatives, a
                     camera's own view gets weight 0, so a front camera pushes away from the side,
                     never from its own positive (which would cancel the scale).
    - ``cebm``:      eps_uncond + w * (d_pos - sum_k w_k d_neg_k)
    - ``perpneg``:   eps_uncond + w * (d_pos - sum_k w_k perp(d_neg_k, d_pos))

    Positive w_k push away from negative k in every mode. Computed in float32; returns float32.

    Adaptive weights (docs/method.md, "Adaptive negative weights"), both off by default:
    neg_factor [B] multiplies every w_k of a sample (the timestep ramp, time_factor());
    alignment=True (cebm, perpneg) scales w_k by ||perp(d_neg_k, d_pos)|| / ||d_neg_k||, the share of
    the negative direction that survives the projection, so a negative almost parallel to the
    positive does not get its full weight on a tiny residual.

    View emphasis in score space (docs/method.md, "View emphasis"): with eps_prompt [B,...], the prediction
    for the prompt without view words, every view-conditioned prediction (the positive and each negative) is
    first replaced by eps_prompt + emphasis * (eps_c - eps_prompt), the score of p(x | prompt)^(1 - w)
    p(x | view text)^w; the combination above then runs on those. The unconditional prediction is untouched.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown guidance mode '{mode}': use one of {', '.join(MODES)}")
    eps_uncond, eps_pos = eps_uncond.float(), eps_pos.float()
    if eps_uncond.shape != eps_pos.shape:
        raise ValueError(f"eps_uncond {tuple(eps_uncond.shape)} and eps_pos {tuple(eps_pos.shape)} differ")
    batch = eps_pos.shape[0]
    num_neg = 0 if eps_neg is None else eps_neg.shape[1]
    if num_neg:
        if eps_neg.shape[0] != batch or eps_neg.shape[2:] != eps_pos.shape[1:]:
            raise ValueError(f"eps_neg {tuple(eps_neg.shape)} does not match eps_pos {tuple(eps_pos.shape)} as [B,K,...]")
        if neg_weights is None or tuple(neg_weights.shape) != (batch, num_neg):
            got = None if neg_weights is None else tuple(neg_weights.shape)
            raise ValueError(f"neg_weights must be [B,K] = {(batch, num_neg)}, got {got}")
        eps_neg = eps_neg.float()
    if eps_prompt is not None:
        eps_prompt = eps_prompt.float()
        eps_pos = eps_prompt + emphasis * (eps_pos - eps_prompt)
        if num_neg:
            eps_neg = eps_prompt.unsqueeze(1) + emphasis * (eps_neg - eps_prompt.unsqueeze(1))

    if mode == "negprompt":
        base = eps_uncond
        if num_neg:
            w = neg_weights.float()
            pick = w.argmax(1).view(batch, 1, *([1] * (eps_pos.dim() - 1))).expand(batch, 1, *eps_pos.shape[1:])
            chosen = eps_neg.gather(1, pick).squeeze(1)  # gather, not a mask: no host sync
            has_neg = (w.amax(1) > 0).view(batch, *([1] * (eps_pos.dim() - 1)))
            base = torch.where(has_neg, chosen, eps_uncond)
        return base + scale * (eps_pos - base)
    d_pos = eps_pos - eps_uncond
    if mode == "cfg" or num_neg == 0:
        return eps_uncond + scale * d_pos
    d_neg = eps_neg - eps_uncond.unsqueeze(1)
    if mode == "perpneg":
        d_neg = perpendicular(d_neg, d_pos)
    w = neg_weights.float()
    if neg_factor is not None:
        w = w * neg_factor.float().reshape(batch, 1)
    if alignment:
        raw = eps_neg - eps_uncond.unsqueeze(1)
        perp = d_neg if mode == "perpneg" else perpendicular(raw, d_pos)
        w = w * perp.flatten(2).norm(dim=-1) / raw.flatten(2).norm(dim=-1).clamp_min(1e-12)
    w_neg = w.reshape(batch, num_neg, *([1] * (d_pos.dim() - 1)))
    return eps_uncond + scale * (d_pos - (w_neg * d_neg).sum(1))


def time_factor(t: Tensor, num_train_timesteps: int, ramp: tuple[float, float] | None,
                gain: float = 1.0) -> Tensor | None:
    """gain * f(t), f(t) = clamp((t/T - t_lo) / (t_hi - t_lo), 0, 1): negatives at full weight while t is
    high (the layout, the view, is decided there) and faded at low t (details); f = 1 when ramp is None.
    None (no factor at all) when ramp is None and gain is 1."""
    if ramp is None:
        return None if gain == 1.0 else torch.full(t.shape, float(gain), device=t.device)
    t_lo, t_hi = ramp
    return gain * ((t.float() / num_train_timesteps - t_lo) / max(t_hi - t_lo, 1e-12)).clamp(0, 1)


def guided_eps(denoiser, x_t: Tensor, t: Tensor, text_emb: Tensor, neg_weights: Tensor | None, scale: float,
               mode: str = "perpneg", neg_time_ramp: tuple[float, float] | None = None,
               alignment: bool = False, neg_gain: float = 1.0, emphasis: float = 1.0, c2w: Tensor | None = None,
               with_positive: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Every prompt of a step in one batched denoiser call, split into blocks and combined.

    x_t [B,...] noisy latents, t [B] timesteps, text_emb [(2+K)*B, ...] in the block layout
    [uncond | pos | neg_1 .. neg_K] (each block the B samples in order), neg_weights [B,K], each
    multiplied by neg_gain * f(t) (time_factor). emphasis != 1 (score-space view emphasis, combine()):
    text_emb has one more block, the prompt without view words, last: [(3+K)*B, ...].
    A MultiView denoiser (MVDream) gets the samples' cameras c2w [B,4,4], the same for every block, so each
    block keeps its groups of views together. Used by score distillation (sds.py) and the 2D sampler
    (ddim_sampler.py) alike. Returns the combined eps [B,...] in float32; with_positive: and the positive
    prompt's own eps [B,...] (no guidance; the x0-reconstruction loss rescales by it), from the same call.
    """
    batch = x_t.shape[0]
    num_blocks = text_emb.shape[0] // batch
    extra = int(emphasis != 1.0)  # the prompt's block
    if num_blocks < 2 + extra or num_blocks * batch != text_emb.shape[0]:
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {batch} samples: need ({2 + extra}+K)*B")
    reps = (num_blocks,) + (1,) * (x_t.dim() - 1)
    if isinstance(denoiser, MultiView):
        if c2w is None:
            raise ConfigError(f"{type(denoiser).__name__} conditions every image on its camera: it guides training "
                              "(SDS), not 2D sampling without cameras")
        eps_all = denoiser.eps_views(x_t.repeat(reps), t.repeat(num_blocks), text_emb, c2w.repeat(num_blocks, 1, 1))
    else:
        eps_all = denoiser.eps(x_t.repeat(reps), t.repeat(num_blocks), text_emb)
    eps_all = eps_all.float().reshape(num_blocks, batch, *x_t.shape[1:])
    num_neg = num_blocks - 2 - extra
    eps_neg = eps_all[2:2 + num_neg].transpose(0, 1) if num_neg else None
    factor = time_factor(t, denoiser.num_train_timesteps, neg_time_ramp, neg_gain)
    combined = combine(eps_all[0], eps_all[1], eps_neg, neg_weights if num_neg else None, scale, mode,
                       neg_factor=factor, alignment=alignment, eps_prompt=eps_all[-1] if extra else None,
                       emphasis=emphasis)
    return (combined, eps_all[1]) if with_positive else combined
