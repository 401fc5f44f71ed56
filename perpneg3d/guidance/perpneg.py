"""The Perp-Neg combination of denoiser outputs: the only copy in perpneg3d.

Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", eq. (4)-(5) and Algorithm 1.
"""
from __future__ import annotations

from torch import Tensor

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
) -> Tensor:
    """Combine unconditional, positive and K negative noise predictions into one.

    Shapes: eps_uncond, eps_pos [B,...]; eps_neg [B,K,...]; neg_weights [B,K]; K may be 0
    (eps_neg/neg_weights None or empty). With d_c = eps_c - eps_uncond and w = scale:

    - ``cfg``:       eps_uncond + w * d_pos
    - ``negprompt``: eps_neg_0 + w * (eps_pos - eps_neg_0)   (eps_uncond if K = 0)
    - ``cebm``:      eps_uncond + w * (d_pos - sum_k w_k d_neg_k)
    - ``perpneg``:   eps_uncond + w * (d_pos - sum_k w_k perp(d_neg_k, d_pos))

    Positive w_k push away from negative k in every mode. Computed in float32; returns float32.
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

    if mode == "negprompt":
        base = eps_neg[:, 0] if num_neg else eps_uncond
        return base + scale * (eps_pos - base)
    d_pos = eps_pos - eps_uncond
    if mode == "cfg" or num_neg == 0:
        return eps_uncond + scale * d_pos
    d_neg = eps_neg - eps_uncond.unsqueeze(1)
    if mode == "perpneg":
        d_neg = perpendicular(d_neg, d_pos)
    w_neg = neg_weights.float().reshape(batch, num_neg, *([1] * (d_pos.dim() - 1)))
    return eps_uncond + scale * (d_pos - (w_neg * d_neg).sum(1))
