"""A seeded, captioned set of toy renders with web-like biases (mostly front views, few view words)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Sequence

import torch
from pydantic import Field
from torch import Tensor

from perpneg3d.cameras import CameraBatch, look_at, spherical_position
from perpneg3d.cameras.camera_batch import wrap_azimuth
from perpneg3d.errors import ConfigError
from perpneg3d.toy.objects import base_name, check_objects, render_objects
from perpneg3d.validation import ElevationRange, Fov, PositiveInt, PositiveRange, Probability, validated

log = logging.getLogger(__name__)
DATA_VERSION = 1  # bump when rendering or captioning changes: it is part of the cache key
HORIZONTAL_VIEWS = ("front", "side", "back")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PERPNEG3D_CACHE", "~/.cache/perpneg3d")).expanduser() / "toy"


def load_cached(path: Path):
    """A cached tensor dict, or None when absent or unreadable (a truncated cache is rebuilt, never trusted)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        log.warning("cache %s unreadable (%s); rebuilding", path, err)
        return None


def save_cached(data: dict, path: Path) -> None:
    """Write a cache file atomically; failing to cache only costs a rebuild next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache %s (%s); it will be rebuilt next time", path, err)


def cached_or_built(path: Path, build) -> dict:
    """The cache at `path`, else build() written there. Processes that need the same file at once (the jobs of
    a sweep, the workers of the test suite) build it once: the others wait on a lock file beside it."""
    data = load_cached(path)
    if data is not None:
        return data
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except (ImportError, OSError):  # no POSIX locks or a read-only cache: build here
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = load_cached(path)  # built by the process that held the lock
        if data is None:
            data = build()
            save_cached(data, path)
        return data
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def sample_azimuths(view_idx: Tensor, g: torch.Generator) -> Tensor:
    """Uniform azimuth inside each label's range: front |a|<45, side 45..135 (either sign), back >135."""
    u = torch.rand(len(view_idx), generator=g)
    sign = torch.where(torch.rand(len(view_idx), generator=g) < 0.5, -1.0, 1.0)
    az = torch.stack([-45 + 90 * u, sign * (45 + 90 * u), 135 + 90 * u]).gather(0, view_idx.view(1, -1))[0]
    return wrap_azimuth(az)


class ToyDataset:
    """num_images renders of the given objects with captions, built once and cached on disk.

    Views are drawn with `view_probs` (front, side, back); a share `view_caption_prob` of captions
    names a view ("a toy dog, back view"), and a share `wrong_view_prob` of those names a wrong one.
    Fields: images [M,3,R,R] in [0,1], captions, object_idx, view_idx, azimuth_deg, elevation_deg [M].
    """

    @validated("guidance.denoiser.dataset")
    def __init__(
        self,
        objects: Sequence[str] = ("dog", "cat", "car"),
        num_images: PositiveInt = 3000,
        resolution: Annotated[int, Field(ge=8)] = 32,
        view_probs: tuple[Probability, Probability, Probability] = (0.6, 0.25, 0.15),
        view_caption_prob: Probability = 0.33,
        wrong_view_prob: Probability = 0.2,
        elevation_range: ElevationRange = (0.0, 30.0),
        distance_range: PositiveRange = (1.8, 2.1),
        fovy_deg: Fov = 40.0,
        supersample: PositiveInt = 2,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        self.objects = check_objects(objects)
        if num_images < 1 or resolution < 4:
            raise ConfigError(f"toy dataset needs num_images >= 1 and resolution >= 4, got {num_images}, {resolution}")
        if len(view_probs) != 3 or abs(sum(view_probs) - 1) > 1e-6:
            raise ConfigError(f"view_probs {list(view_probs)} must be 3 numbers (front, side, back) summing to 1")
        self.params = dict(
            version=DATA_VERSION, objects=self.objects, num_images=num_images, resolution=resolution,
            view_probs=list(view_probs), view_caption_prob=view_caption_prob, wrong_view_prob=wrong_view_prob,
            elevation_range=list(elevation_range), distance_range=list(distance_range), fovy_deg=fovy_deg,
            supersample=supersample, seed=seed,
        )
        self.resolution, self.fovy_deg = resolution, fovy_deg
        self.distance_range, self.elevation_range = tuple(distance_range), tuple(elevation_range)
        key = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]
        path = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"toy_{key}.pt"
        data = cached_or_built(path, self._build)
        self.images = data["images"].float() / 255.0
        self.captions = data["captions"]
        for name in ("object_idx", "view_idx", "caption_view", "azimuth_deg", "elevation_deg"):
            setattr(self, name, data[name])

    def __len__(self) -> int:
        return len(self.captions)

    def _build(self) -> dict:
        p, g = self.params, torch.Generator().manual_seed(self.params["seed"])
        m = p["num_images"]
        object_idx = torch.randint(len(self.objects), (m,), generator=g)
        view_idx = torch.multinomial(torch.tensor(p["view_probs"]), m, replacement=True, generator=g)
        azimuth = sample_azimuths(view_idx, g)
        elevation = p["elevation_range"][0] + (p["elevation_range"][1] - p["elevation_range"][0]) * torch.rand(m, generator=g)
        lo, hi = p["distance_range"]
        distance = lo + (hi - lo) * torch.rand(m, generator=g)
        named = torch.rand(m, generator=g) < p["view_caption_prob"]
        wrong = torch.rand(m, generator=g) < p["wrong_view_prob"]
        shift = torch.randint(1, 3, (m,), generator=g)  # a wrong label: one of the two other views
        caption_view = torch.where(wrong, (view_idx + shift) % 3, view_idx)
        caption_view = torch.where(named, caption_view, torch.full_like(caption_view, -1))
        captions = [
            f"a toy {base_name(self.objects[o])}" + (f", {HORIZONTAL_VIEWS[v]} view" if v >= 0 else "")
            for o, v in zip(object_idx.tolist(), caption_view.tolist())
        ]
        eye = spherical_position(azimuth, elevation, distance)
        cams = CameraBatch(look_at(eye, torch.zeros_like(eye)), torch.full((m,), float(p["fovy_deg"])), azimuth,
                           elevation, distance, eye, p["resolution"], p["resolution"])
        log.info("rendering %d toy images at %dx%d (cached afterwards)", m, p["resolution"], p["resolution"])
        images = render_objects([self.objects[o] for o in object_idx.tolist()], cams, p["supersample"])
        return dict(images=(images * 255 + 0.5).to(torch.uint8), captions=captions, object_idx=object_idx,
                    view_idx=view_idx, caption_view=caption_view, azimuth_deg=azimuth, elevation_deg=elevation)
