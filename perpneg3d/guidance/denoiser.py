"""The denoiser interface every guidance consumer is written against (DESIGN.md).

Stable Diffusion (latent space) and the offline toy prior (pixel space) both implement it, and so
can any class from outside the package: a config's ``_target_`` names it, no registry involved.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """An epsilon-prediction diffusion model with text conditioning (VP process).

    Attributes:
        num_train_timesteps: T, the number of training timesteps.
        alphas_cumprod: [T] float32, alpha-bar_t of the forward process.
        device: where eps() runs and embeddings live.
    """

    num_train_timesteps: int
    alphas_cumprod: Tensor

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Text embeddings [N, ...] for N strings (cached per string)."""

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> latents [B,C,h,w]; differentiable w.r.t. rgb."""

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B,C,h,w] -> rgb [B,3,H,W] in [0,1] (2D sampling and previews only)."""

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """Predicted noise [N,C,h,w] for noisy latents [N,C,h,w], integer timesteps [N], embeddings [N,...]."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of height x width pixels."""


def add_noise(denoiser: Denoiser, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward VP process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per sample t [B]."""
    abar = denoiser.alphas_cumprod.to(latents.device)[t].float()
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return (abar.sqrt().view(shape) * latents + (1 - abar).sqrt().view(shape) * noise).to(latents.dtype)
