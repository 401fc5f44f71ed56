"""The second stage's start: `python train.py refine=<run>` refines a finished run's surface with DMTet.

Its config is built with the run plan (training/plan.py: refine_config): the source run's own config.yaml
(prompt, prompts and their weights, prior, cameras, seed, export) with the stage's values on top
(configs/stage/<source's refine_stage>.yaml: DMTet geometry whose colour field is the source's geometry, the
rasterizing renderer with the source's material and background, the refine trainer, the prior's native image
size), then the command line's overrides. The run records `refine: <source folder>`; resuming it follows the
resume rules of any run. Its first step starts from the source's level set (initialise(), here).
"""
from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from perpneg3d.config import instantiate
from perpneg3d.cameras import orbit_cameras
from perpneg3d.renderer.orbit import render_views
from perpneg3d.saved_config import source_folder, stage_of  # noqa: F401  (their old import path)
from perpneg3d.training.plan import OWN_GROUPS, refine_config, staged_config, with_overrides  # noqa: F401  (idem)

log = logging.getLogger(__name__)
SEARCH_SCALES = 2.0 ** torch.linspace(-3, 1, 17, device="cpu")  # silhouette_level's candidates (x the export level)


def initialise(geometry, renderer, cfg: DictConfig) -> float:
    """Put the source run's surface and colour field into a fresh refine geometry; returns the density level
    used: geometry.init_level, a number, "export" (the source's export threshold, auto included, as its own
    export meshes it) or "silhouette" (silhouette_level())."""
    from perpneg3d.training.run_loading import load_run

    from perpneg3d.export.mesh import MeshExporter

    source_cfg, volume, source_renderer, _, step, source_dir = load_run(cfg.refine)
    exporter = instantiate(source_cfg.export) if "_target_" in (source_cfg.get("export") or {}) else MeshExporter()
    export_level = exporter.level(volume)[1]
    level = geometry.init_level
    if level == "export":
        level = export_level
    # the grid's box holds the largest surface considered: the silhouette search's lowest level, or the level
    geometry.fit_grid(volume, float(export_level * SEARCH_SCALES[0]) if level == "silhouette" else float(level))
    density = geometry.grid_density(volume)
    if level == "silhouette":
        level = silhouette_level(geometry, renderer, volume, source_renderer, density, export_level, cfg.cameras)
    geometry.initialise_from(volume, float(level), density)
    box = geometry.bbox.tolist()
    log.info("refine: DMTet from %s at step %d, density level %.3g (export level %.3g), grid box %s", source_dir,
             step, level, export_level, " x ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(*box)))
    return float(level)


@torch.no_grad()
def silhouette_level(geometry, renderer, volume, volume_renderer, density, export_level: float, cameras_cfg,
                     views: int = 12, resolution: int = 64) -> float:
    """The density level whose surface's silhouettes best match the coarse renders: the intersection over
    union of the mesh's coverage and the volume's opacity > 0.5, over `views` azimuths at the camera
    distribution's middle distance, field of view and elevation, for levels from 1/8 to 2 times the export
    level. The export's auto level is where a ray's opacity passes 0.5 pointwise; on a soft coarse field thin
    parts (ears, legs) stay below it and would start the refinement cut off (docs/method.md)."""
    azimuth = torch.arange(views) * (360.0 / views)
    elevation = torch.full_like(azimuth, float(sum(cameras_cfg.elevation_range)) / 2)
    distance, fovy = float(sum(cameras_cfg.distance_range)) / 2, float(sum(cameras_cfg.fovy_range)) / 2
    args = (azimuth, elevation, distance, fovy, resolution)
    target = torch.cat([o.opacity for o in render_views(volume, volume_renderer, *args)]) > 0.5
    cameras = orbit_cameras(*args).to(density.device)
    best = (-1.0, export_level)
    for level in (export_level * SEARCH_SCALES).tolist():
        geometry.initialise_from(volume, level, density)
        covered = renderer.coverage(geometry, cameras) > 0.5
        iou = float((covered & target).sum() / (covered | target).sum().clamp_min(1))
        best = max(best, (iou, level))
    log.info("refine: silhouette IoU %.3f at density level %.3g", *best)
    return best[1]
