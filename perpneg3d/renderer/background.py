"""Backgrounds composited behind the object: a solid colour or a small neural environment map."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from perpneg3d.random_streams import RandomStreams
from perpneg3d.validation import NonNegativeInt, PositiveInt, Probability, Unit, validated


class SolidBackground(nn.Module):
    """A constant colour (white by default: the toy world's renders are on white)."""

    @validated("renderer.background")
    def __init__(self, color: tuple[Unit, Unit, Unit] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("color", torch.tensor(list(color), dtype=torch.float32), persistent=False)

    def forward(self, dirs: Tensor, rng: RandomStreams | None = None) -> Tensor:
        """dirs [...,3] -> rgb [...,3]."""
        return self.color.expand(*dirs.shape[:-1], 3)


class NeuralEnvironmentMap(nn.Module):
    """rgb = sigmoid(MLP(frequency-encoded view direction)); during training, with probability
    `random_aug_prob` the whole batch gets a random solid colour instead, so the background cannot
    explain the object (threestudio's random_aug)."""

    @validated("renderer.background")
    def __init__(self, n_frequencies: NonNegativeInt = 3, width: PositiveInt = 32, hidden_layers: NonNegativeInt = 1,
                 random_aug_prob: Probability = 0.5):
        super().__init__()
        self.n_frequencies, self.random_aug_prob = n_frequencies, random_aug_prob
        layers, dim = [], 3 + 6 * n_frequencies
        for _ in range(hidden_layers):
            layers += [nn.Linear(dim, width), nn.ReLU(inplace=True)]
            dim = width
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, 3))

    def forward(self, dirs: Tensor, rng: RandomStreams | None = None) -> Tensor:
        """dirs [...,3] -> rgb [...,3]; the augmentation is decided on the host stream (no device sync)
        and its colour drawn on the device stream."""
        if self.training and rng is not None and torch.rand(1, generator=rng.host).item() < self.random_aug_prob:
            color = torch.rand(3, generator=rng.device, device=rng.device.device).to(dirs.device)
            return color.expand(*dirs.shape[:-1], 3)
        freqs = 2.0 ** torch.arange(self.n_frequencies, device=dirs.device, dtype=dirs.dtype) * torch.pi
        angles = dirs.unsqueeze(-1) * freqs  # [...,3,F]
        enc = torch.cat([dirs, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)
        return torch.sigmoid(self.mlp(enc))
