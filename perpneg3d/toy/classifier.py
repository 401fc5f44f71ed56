"""Nearest-neighbour view classifier of the toy world: object, azimuth and view label of an image."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.cameras import orbit_cameras
from perpneg3d.contracts import ViewPrediction  # noqa: F401  (re-exported: what classify() returns)
from perpneg3d.errors import ConfigError
from perpneg3d.prompts.views import view_labels
from perpneg3d.toy.dataset import cached_or_built, default_cache_dir
from perpneg3d.toy.objects import base_name, check_objects, render_objects
from perpneg3d.toy.text import object_of


def normalised_features(rgb: Tensor, size: int) -> Tensor:
    """Blur- and contrast-robust features [B, 3*size*size]: area-downsampled ink (1 - rgb),
    mean-removed and unit-normalised per image, so cosine similarity ignores brightness and blur."""
    x = F.interpolate(rgb.float().clamp(0, 1), (size, size), mode="area") if rgb.shape[-1] != size else rgb.float()
    ink = (1 - x).flatten(1)
    ink = ink - ink.mean(1, keepdim=True)
    return F.normalize(ink, dim=1)


class ToyViewClassifier:
    """Compares an image with clean renders of every object at azimuths every `azimuth_step_deg`
    and the given elevations; returns the best match's object, azimuth and view label."""

    def __init__(
        self,
        objects: Sequence[str] = ("dog", "cat", "car"),
        resolution: int = 32,
        azimuth_step_deg: float = 2.5,
        elevations: Sequence[float] = (0.0, 10.0, 20.0, 30.0),
        distance: float = 1.95,
        fovy_deg: float = 40.0,
        feature_size: int = 16,
        min_similarity: float = 0.85,
        cache_dir: str | None = None,
    ):
        self.objects = check_objects(objects)
        self.feature_size, self.min_similarity = feature_size, min_similarity
        self.camera = dict(distance=distance, fovy_deg=fovy_deg, resolution=resolution)  # how references were rendered
        az = torch.arange(-180.0 + azimuth_step_deg, 180.0 + 1e-6, azimuth_step_deg)
        grid_az, grid_el = (g.flatten() for g in torch.meshgrid(az, torch.tensor(list(elevations), dtype=torch.float32), indexing="ij"))
        self.ref_azimuth = grid_az.repeat(len(self.objects))
        self.ref_object = torch.arange(len(self.objects)).repeat_interleave(len(grid_az))
        params = dict(objects=self.objects, resolution=resolution, step=azimuth_step_deg, elevations=list(elevations),
                      distance=distance, fovy=fovy_deg, size=feature_size, version=1)
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        path = (default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()) / f"classifier_{key}.pt"
        def build() -> dict:
            cams = orbit_cameras(grid_az.repeat(len(self.objects)), grid_el.repeat(len(self.objects)), distance, fovy_deg, resolution)
            names = [self.objects[i] for i in self.ref_object.tolist()]
            return {"features": normalised_features(render_objects(names, cams, supersample=2), feature_size)}

        self.ref_features = cached_or_built(path, build)["features"]

    def object_index(self, prompt: str) -> int:
        """Index of the object the prompt names (synonyms included)."""
        name = object_of(prompt)
        bases = [base_name(o) for o in self.objects]
        if name not in bases:
            raise ConfigError(f"prompt {prompt!r} names none of the toy objects {', '.join(bases)}")
        return bases.index(name)

    def __call__(self, rgb: Tensor) -> ViewPrediction:
        """rgb [B,3,H,W] in [0,1] (any size; resized) -> ViewPrediction."""
        sims = normalised_features(rgb.detach().cpu(), self.feature_size) @ self.ref_features.T
        best_sim, best = sims.max(1)
        obj = self.ref_object[best].clone()
        obj[best_sim < self.min_similarity] = -1
        az = self.ref_azimuth[best]
        return ViewPrediction(obj, az, view_labels(az, torch.zeros_like(az)), best_sim)
