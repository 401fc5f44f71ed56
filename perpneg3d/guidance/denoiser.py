"""The denoiser interface (perpneg3d.contracts.Denoiser, docs/architecture.md) and the forward process.

Stable Diffusion (latent space) and the offline toy prior (pixel space) both implement it, and so
can any class from outside the package: a config's ``_target_`` names it, no registry involved.
"""
from __future__ import annotations

from torch import Tensor

from perpneg3d.contracts import Denoiser  # noqa: F401  (re-exported: the contract lives in contracts.py)


def add_noise(denoiser: Denoiser, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward VP process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per sample t [B]."""
    abar = denoiser.alphas_cumprod.to(latents.device)[t].float()
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return (abar.sqrt().view(shape) * latents + (1 - abar).sqrt().view(shape) * noise).to(latents.dtype)
