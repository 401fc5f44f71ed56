"""The offline toy prior: the exact posterior-mean denoiser of a captioned image set (pixel space).

Under the VP process x_t = a x_0 + sqrt(v) n (a = sqrt(abar_t), v = 1 - abar_t), with data points
x_i, caption prior pi_i(p) = softmax_i(<e(p), e(c_i)> / tau) and optional Gaussian smoothing
x_0 | i ~ N(x_i, s^2 I):

    log w_i = log pi_i - ||x_t - a x_i||^2 / (2 (a^2 s^2 + v))             (posterior over i)
    E[x_0 | x_t] = sum_i w_i (x_i + k (x_t - a x_i)),  k = a s^2 / (a^2 s^2 + v)
    eps = (x_t - a E[x_0 | x_t]) / sqrt(v)

Closed form, vectorised over the batch and the data set, log-sum-exp stable, deterministic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.devices import resolve_device
from perpneg3d.errors import ConfigError
from perpneg3d.toy.dataset import ToyDataset
from perpneg3d.toy.objects import base_name
from perpneg3d.toy.text import SYNONYMS, ToyTextEncoder, object_of
from perpneg3d.validation import NonNegativeFloat, PositiveFloat, PositiveInt, validated


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class ToyPrior:
    """Implements the denoiser interface on a ToyDataset; `latents` are images in [-1, 1]."""

    @validated("guidance.denoiser")
    def __init__(
        self,
        dataset: ToyDataset,
        text_encoder: ToyTextEncoder | None = None,
        tau: PositiveFloat = 0.1,
        smoothing: NonNegativeFloat = 0.0,
        num_train_timesteps: PositiveInt = 1000,
        device: str = "auto",
        chunk_size: PositiveInt = 512,
    ):
        if tau <= 0 or smoothing < 0:
            raise ConfigError(f"toy prior needs tau > 0 and smoothing >= 0, got tau={tau}, smoothing={smoothing}")
        self.dataset, self.tau, self.smoothing, self.chunk_size = dataset, tau, smoothing, chunk_size
        self.text_encoder = text_encoder or ToyTextEncoder()
        self.device = resolve_device(device)
        self.image_size = dataset.resolution
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = linear_alphas_cumprod(num_train_timesteps).to(self.device)
        self.scheduler_config = dict(
            num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        )
        x = (dataset.images * 2 - 1).flatten(1).to(self.device)  # [M, D]
        self.mean = x.mean(0)
        self.data = x
        self.data_centered = x - self.mean
        self.data_sqnorm = (self.data_centered ** 2).sum(1)
        self.caption_emb = self.text_encoder.readout(self.text_encoder(dataset.captions)).to(self.device)  # [M, E]
        self.known = [base_name(o) for o in dataset.objects]

    @property
    def linear_text_embedding(self) -> bool:
        """With the bag-of-words encoder log_prior is linear in the text embedding (a dot product with the
        captions' before the softmax) and the embedding a sum of words: contracts.LinearTextEmbedding. With the
        CLIP-structured encoder neither holds."""
        return bool(getattr(self.text_encoder, "bag_of_words", False))

    # -- denoiser interface ---------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """[N, E] toy text embeddings; a non-empty text must name an object of this world."""
        for text in texts:
            if text.strip() and object_of(text) not in self.known:
                names = ", ".join(f"{o} ({', '.join(SYNONYMS[o][1:4])}...)" for o in self.known)
                raise ConfigError(f"prompt {text!r} names no object the toy prior knows: use one of {names}")
        return self.text_encoder(list(texts)).to(self.device)

    def encode(self, rgb: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        if tuple(rgb.shape[-2:]) != size:
            rgb = F.interpolate(rgb, size, mode="bilinear", align_corners=False, antialias=True)
        return rgb * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def log_prior(self, text_emb: Tensor) -> Tensor:
        """log pi_i(prompt) [N, M]: soft caption matching of the encoder's read-out features."""
        feature = self.text_encoder.readout(text_emb.float().to(self.device))
        return torch.log_softmax(feature @ self.caption_emb.T / self.tau, dim=-1)

    def log_joint(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """log pi_i - ||x_t - a x_i||^2 / (2 (a^2 s^2 + v)) [N, M], up to a constant per row."""
        x = latents_t.float().flatten(1)
        abar = self.alphas_cumprod[t.to(self.device)].float().unsqueeze(1)  # [N,1]
        a, v = abar.sqrt(), 1 - abar
        var = a * a * self.smoothing ** 2 + v
        xc = x - a * self.mean
        return self.log_prior(text_emb) + (a * (xc @ self.data_centered.T) - 0.5 * a * a * self.data_sqnorm) / var

    def posterior_mean(self, w: Tensor, latents_t: Tensor, t: Tensor) -> Tensor:
        """E[x_0 | x_t] [N, D] for posterior weights w [N, M]: sum_i w_i (x_i + k (x_t - a x_i))."""
        abar = self.alphas_cumprod[t.to(self.device)].float().unsqueeze(1)
        a = abar.sqrt()
        k = a * self.smoothing ** 2 / (a * a * self.smoothing ** 2 + 1 - abar)
        return (1 - a * k) * (w @ self.data) + k * latents_t.float().flatten(1)

    def posterior(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior weights w [N, M] over the data set and E[x_0 | x_t] [N, D]."""
        w = torch.softmax(self.log_joint(latents_t, t, text_emb), dim=-1)
        return w, self.posterior_mean(w, latents_t, t)

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        return self.chunked_eps(self.posterior, self.chunk_size, latents_t, t, text_emb)

    def chunked_eps(self, posterior, chunk: int, latents_t: Tensor, t: Tensor, *rows: Tensor) -> Tensor:
        """eps = (x_t - a E[x_0 | x_t]) / sqrt(v) from posterior(x_t, t, *rows) -> (w, x0), `chunk` rows at a time."""
        out = []
        for xs, ts, *rs in zip(latents_t.split(chunk), t.split(chunk), *(r.split(chunk) for r in rows)):
            _, x0 = posterior(xs, ts, *rs)
            abar = self.alphas_cumprod[ts.to(self.device)].float().unsqueeze(1)
            out.append((xs.float().flatten(1) - abar.sqrt() * x0) / (1 - abar).sqrt())
        return torch.cat(out).reshape(latents_t.shape)

    # -- evaluation hook ------------------------------------------------------------------
    def view_classifier(self):
        """The nearest-neighbour view classifier of this toy world (for eval and Janus metrics)."""
        from perpneg3d.toy.classifier import ToyViewClassifier

        return ToyViewClassifier(self.dataset.objects, resolution=self.image_size, fovy_deg=self.dataset.fovy_deg,
                                 distance=sum(self.dataset.distance_range) / 2)
