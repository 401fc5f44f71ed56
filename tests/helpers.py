"""Shared test helpers: composing train.py configs with small, fast settings."""
from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from perpneg3d.config import CONFIG_DIR

# The toy preset shrunk to seconds: 16x16 renders, a small hash grid, a 300-image toy world.
TINY_TOY = [
    "experiment=toy", "guidance.denoiser.dataset.num_images=300", "geometry.n_levels=4", "geometry.log2_hashmap_size=12",
    "geometry.finest_resolution=64", "geometry.start_level=4", "renderer.num_samples_per_ray=16", "cameras.heights=[16]",
    "cameras.widths=[16]", "trainer.max_steps=6", "trainer.val_every=3", "trainer.ckpt_every=3",
    "trainer.val_resolution=16", "trainer.turntable_frames=4", "trainer.turntable_resolution=16",
    "export.resolution=24", "trainer.progress=false",
]

# the Gaussian toy preset (experiment=toy_gs) at the same tiny size
TINY_GAUSSIANS = [
    "experiment=toy_gs", "guidance.denoiser.dataset.num_images=300", "geometry.num_points=256",
    "cameras.heights=[16]", "cameras.widths=[16]", "trainer.max_steps=6", "trainer.val_every=3", "trainer.ckpt_every=3",
    "trainer.val_resolution=16", "trainer.turntable_frames=4", "trainer.turntable_resolution=16", "trainer.progress=false",
    "export.resolution=24",
]


TESTS = Path(__file__).resolve().parent


def subprocess_env(**extra) -> dict:
    """The environment for a child Python: tests/ and the repository first, then any PYTHONPATH that
    was already set (a project installed with pip --target lives there: overwriting it breaks)."""
    paths = [str(TESTS), str(TESTS.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


def compose_train(overrides: list[str], out_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides) + [f"out_dir={out_dir}"])


def batched_and_single_eps(denoiser, x, t, texts):
    """A denoiser's eps for len(texts) samples in one call, and the same samples called one at a time."""
    import torch

    emb = denoiser.embed(texts)
    with torch.no_grad():
        batched = denoiser.eps(x, t, emb)
        single = torch.cat([denoiser.eps(x[i:i + 1], t[i:i + 1], emb[i:i + 1]) for i in range(len(texts))])
    return batched, single
