"""The second stage's run: `python train.py refine=<run>` refines a finished run's surface with DMTet.

Its config is the source run's own config.yaml (prompt, prompts and their weights, prior, cameras, seed,
export) with the stage's values on top (configs/stage/<source's refine_stage>.yaml: DMTet geometry whose colour
field is the source's geometry, the rasterizing renderer with the source's material and background, the refine
trainer, the prior's native image size), then the command line's overrides, which may change anything (a
refine run is a new run). The run records `refine: <source folder>`; resuming it follows the resume rules of
any run. Its first step starts from the source's level set (initialise()).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from perpneg3d.config import CONFIG_DIR, compose_config, instantiate
from perpneg3d.errors import ConfigError
from perpneg3d.renderer.orbit import render_views
from perpneg3d.training.checkpoint import latest_valid_checkpoint, run_dir_of
from perpneg3d.training.resume_config import apply_changes, leaves, load_saved_config, requested_changes

log = logging.getLogger(__name__)
OWN_GROUPS = ("geometry", "renderer", "trainer")  # the stage's own, replacing the source's whole
SEARCH_SCALES = 2.0 ** torch.linspace(-3, 1, 17, device="cpu")  # silhouette_level's candidates (x the export level)


def source_folder(refine: str) -> Path:
    """The run folder refine= names (a folder or one of its checkpoints), checked to have a config and a checkpoint."""
    source = run_dir_of(str(refine))
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"refine={refine}: no config.yaml in {source}: pass a run folder written by train.py")
    if Path(refine).expanduser().is_dir() and latest_valid_checkpoint(source) is None:
        raise ConfigError(f"refine={refine}: no readable checkpoint in {source / 'ckpts'}: refine a run that has trained")
    earlier = load_saved_config(source).get("refine")
    if earlier:
        raise ConfigError(f"refine={refine} is itself a refine run (of {earlier}): refine that run, or resume this one "
                          f"with resume={refine} trainer.max_steps=<more>")
    return source


def stage_of(refine: str, overrides: list[str]) -> str:
    """The stage config: stage=<name> from the command line, else the source run's refine_stage."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")]
    if given:
        return given[-1]
    return str(load_saved_config(source_folder(refine)).get("refine_stage", "refine"))


def refine_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The refine run's config (module docstring): source config.yaml + stage + command-line changes."""
    source_dir = source_folder(str(cfg.refine))
    source = OmegaConf.to_container(load_saved_config(source_dir), resolve=True)
    stage = stage_of(str(cfg.refine), overrides)
    out = staged_config(source, stage)
    out.refine, out.resume, out.then_refine, out.refine_overrides = str(source_dir.resolve()), None, False, []
    out.name = f"{source.get('name') or source_dir.parent.name}_refine"
    out = with_overrides(out, stage, overrides, f"refine={cfg.refine}")
    log.info("refine of %s with stage=%s", source_dir, stage)
    return out


def staged_config(source: dict, stage: str) -> DictConfig:
    """A first-stage config (resolved) turned into its refine stage's: the stage's geometry (the source's as its
    colour field), renderer (the source's material and background) and trainer whole, and the other keys the
    stage file sets (configs/stage/<stage>.yaml) on top of the source's."""
    staged_cfg = compose_config("train", [f"stage={stage}"])
    staged = OmegaConf.to_container(staged_cfg, resolve=True)
    out = OmegaConf.create(source)
    out.geometry = dict(staged["geometry"], color_field=source["geometry"], radius=source["geometry"]["radius"])
    out.renderer = dict(staged["renderer"], material=source["renderer"]["material"],
                        background=source["renderer"]["background"])
    out.trainer = staged["trainer"]
    if "_target_" not in (source.get("export") or {}):  # a source trained with ~export: the refine run exports
        out.export = staged["export"]
    own = OmegaConf.load(CONFIG_DIR / "stage" / f"{stage}.yaml")  # the keys the stage file itself sets
    own.pop("defaults", None)
    composed = leaves(staged_cfg)
    stage_changes = {k: composed[k] for k in leaves(own) if k.split(".")[0] not in OWN_GROUPS}
    return apply_changes(out, stage_changes, f"stage={stage}")


def with_overrides(cfg: DictConfig, stage: str, overrides: list[str], where: str) -> DictConfig:
    """`cfg` with what the command line's overrides (other than refine= and stage=) ask for, read against the
    stage's composed config (so that the stage's keys, geometry.grid_resolution, ... can be set)."""
    user = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("refine", "stage")]
    if not user:
        return cfg
    return apply_changes(cfg, requested_changes(user, lambda o: compose_config("train", [f"stage={stage}"] + o)), where)


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
    best = (-1.0, export_level)
    for level in (export_level * SEARCH_SCALES).tolist():
        geometry.initialise_from(volume, level, density)
        covered = torch.cat([o.opacity for o in render_views(geometry, renderer, *args)]) > 0.5
        iou = float((covered & target).sum() / (covered | target).sum().clamp_min(1))
        best = max(best, (iou, level))
    log.info("refine: silhouette IoU %.3f at density level %.3g", *best)
    return best[1]
