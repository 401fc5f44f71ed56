"""Shading of volume samples: albedo, lambertian with a point light, or textureless."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.errors import require
from perpneg3d.validation import NonNegativeFloat, NonNegativeInt, Probability, validated

SHADINGS = ("albedo", "lambertian", "textureless")


class DiffuseMaterial:
    """threestudio's diffuse-with-point-light: ambient-only (albedo) warm-up for `ambient_only_steps`,
    then per step albedo with probability `albedo_ratio`, else textureless with probability
    `textureless_prob`, else lambertian. color = albedo * (ambient + diffuse * max(0, n.l))."""

    @validated("renderer.material")
    def __init__(self, ambient_light_color: NonNegativeFloat = 0.1, diffuse_light_color: NonNegativeFloat = 0.9,
                 ambient_only_steps: NonNegativeInt = 1000, albedo_ratio: Probability = 0.25,
                 textureless_prob: Probability = 0.5, train_shadings: tuple = SHADINGS):
        require(all(s in SHADINGS for s in train_shadings), f"material.train_shadings={list(train_shadings)}: use {SHADINGS}")
        self.ambient, self.diffuse = ambient_light_color, diffuse_light_color
        self.ambient_only_steps, self.albedo_ratio, self.textureless_prob = ambient_only_steps, albedo_ratio, textureless_prob
        self.train_shadings = tuple(train_shadings)

    def choose_shading(self, step: int, generator: torch.Generator) -> str:
        """One shading for a whole training step (always drawn, so the random stream is the same)."""
        u = torch.rand(2, generator=generator).tolist()
        if step < self.ambient_only_steps or self.train_shadings == ("albedo",):
            return "albedo"
        if u[0] < self.albedo_ratio:
            return "albedo"
        return "textureless" if u[1] < self.textureless_prob else "lambertian"

    @staticmethod
    def needs_normals(shading: str) -> bool:
        return shading != "albedo"

    def shade(self, albedo: Tensor, normals: Tensor | None, points: Tensor, light_positions: Tensor, shading: str) -> Tensor:
        """Per-sample rgb [N,3]; light_positions [N,3] (each sample's camera light)."""
        require(shading in SHADINGS, f"shading={shading!r}: use one of {SHADINGS}")
        if shading == "albedo":
            return albedo
        light_dir = F.normalize(light_positions - points, dim=-1)
        light = self.ambient + self.diffuse * (normals * light_dir).sum(-1, keepdim=True).clamp_min(0)
        return light.expand_as(albedo) if shading == "textureless" else albedo * light
