"""Denoisers defined outside perpneg3d, plugged in by config `_target_` alone (used by the tests)."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from perpneg3d.toy.prior import linear_alphas_cumprod


class ColourPrior:
    """The exact denoiser of a one-image distribution: a flat colour picked by the text (pixel space).

    eps(x_t) = (x_t - a * x0) / sqrt(1 - abar) with x0 the prompt's colour; SDS pulls renders to it.
    """

    def __init__(self, resolution: int = 16, device: str = "cpu", nan_calls: int = 0):
        """nan_calls: the first nan_calls eps() calls return NaN (-1: all of them), to test fault handling."""
        self.resolution, self.device, self.nan_calls, self.calls = resolution, torch.device(device), nan_calls, 0
        self.num_train_timesteps = 1000
        self.alphas_cumprod = linear_alphas_cumprod(1000)

    def colour(self, text: str) -> torch.Tensor:
        digest = hashlib.sha256(text.encode()).digest()
        return torch.tensor([digest[0], digest[1], digest[2]], dtype=torch.float32) / 255 * 2 - 1

    def embed(self, texts):
        return torch.stack([self.colour(t) for t in texts])

    def encode(self, rgb):
        return F.interpolate(rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False) * 2 - 1

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)

    def latent_shape(self, height, width):
        return (3, self.resolution, self.resolution)

    def eps(self, latents_t, t, text_emb):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = (latents_t - abar.sqrt() * text_emb.view(-1, 3, 1, 1)) / (1 - abar).sqrt()
        self.calls += 1
        if self.nan_calls < 0 or self.calls <= self.nan_calls:
            return torch.full_like(out, float("nan"))
        return out
