"""The run plan: what kind of start a train.py call is, decided once, and everything that start needs.

plan_run() reads the command line's config and the disk once (the run folder, its checkpoint and config.yaml,
a refine run's source), claims and locks the run folder, and returns a RunPlan. Everything after it (threads,
components, training, export, the refine stage that follows) reads the plan and decides nothing again.

Kinds of start (docs/architecture.md, "The run plan"):
  fresh    a new folder (outputs/<name>/<timestamp>), or a sweep job's folder that holds no checkpoint yet
  resume   resume=<run or checkpoint>: the run's own config.yaml with the safe changes (saved_config.py)
  requeue  a sweep job's folder (or then_refine's <run>/refine) that holds a checkpoint: its own config.yaml
Any of them may be the refine stage (refine=<source>: the config is built here, from the source run's
config.yaml, the stage file and the overrides) and may have a refine stage following it (then_refine).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from perpneg3d.checkpoint import latest_valid_checkpoint, resolve_resume, run_dir_of, set_aside_later
from perpneg3d.config import CONFIG_DIR, compose_config
from perpneg3d.errors import require
from perpneg3d.prompts import validate_prompt
from perpneg3d.run_dir import RunLock, check_writable, new_run_dir
from perpneg3d.saved_config import (apply_changes, leaves, load_saved_config, requested_changes, requeued_config,
                                    resumed_config, source_folder, stage_of)

log = logging.getLogger(__name__)
KINDS = ("fresh", "resume", "requeue")
OWN_GROUPS = ("geometry", "renderer", "trainer")  # a stage's own config groups, replacing the source's whole


@dataclass(frozen=True)
class RunPlan:
    """One start of train(): built by plan_run(), read by everything after it."""

    kind: str                              # fresh | resume | requeue (KINDS)
    cfg: DictConfig                        # the config the run trains with (written to its config.yaml)
    run_dir: Path                          # the run folder, claimed and locked
    state: dict | None = None              # the checkpoint the run continues from (resume, requeue)
    checkpoint: Path | None = None         # that checkpoint's file
    source: Path | None = None             # a refine run's source run folder
    trains: bool = True                    # False: a requeued two-stage job whose first stage is done
    then_refine: list[str] | None = None   # a refine stage follows in <run_dir>/refine, with these overrides

    @property
    def stage(self) -> str:
        return "refine" if self.source is not None else "first"

    @property
    def initialises(self) -> bool:
        """Whether the run starts from its source's surface (a refine run with no checkpoint of its own)."""
        return self.source is not None and self.state is None


def plan_run(cfg: DictConfig, overrides: list[str] | None, lock: RunLock, into: Path | None = None) -> RunPlan:
    """The plan of train(cfg): `overrides` the command line's (None: a config built in Python, every key of
    which counts as given), `into` a fixed folder (then_refine's <run>/refine), treated as a sweep job's. The
    run folder is locked (`lock`) before anything in it is read or moved."""
    if cfg.get("refine") and not cfg.get("resume"):  # a new second-stage run: the source run's config plus the stage's
        cfg = refine_config(cfg, overrides or [])
    validate_prompt(cfg.prompt)
    require(isinstance(cfg.seed, int), f"seed={cfg.seed!r} must be an integer")
    if cfg.resume:
        kind, cfg, run_dir, checkpoint, state = "resume", *_resume(cfg, overrides, lock)
    else:
        kind, cfg, run_dir, checkpoint, state = "fresh", cfg, None, None, None
        job_dir = into if into is not None else hydra_job_dir()
        if job_dir is not None:  # sweep job: Hydra's folder; a requeued job finds its own checkpoints there
            job_dir.mkdir(parents=True, exist_ok=True)
            check_writable(job_dir)
            lock.acquire(job_dir)
            run_dir, found = job_dir, latest_valid_checkpoint(job_dir)
            if found is not None:
                kind, cfg, (checkpoint, state) = "requeue", requeued_config(cfg, job_dir), found
                log.info("requeued job: resuming from %s", checkpoint)
        else:
            run_dir = new_run_dir(Path(cfg.out_dir) / (cfg.name or slug(cfg.prompt)))
            lock.acquire(run_dir)
    finished = state is not None and state["step"] >= cfg.trainer.max_steps and (run_dir / "metrics.json").is_file()
    second = bool(cfg.get("then_refine")) and not cfg.get("refine")
    return RunPlan(kind, cfg, run_dir, state, checkpoint, Path(cfg.refine) if cfg.get("refine") else None,
                   trains=not (cfg.get("then_refine") and finished),
                   then_refine=list(cfg.get("refine_overrides") or []) if second else None)


def _resume(cfg: DictConfig, overrides: list[str] | None, lock: RunLock):
    """resume=: (config, run folder, checkpoint file, state): the run's own config.yaml with the safe changes;
    a later history than the checkpoint's is set aside (set_aside_later)."""
    if not Path(str(cfg.resume)).expanduser().exists():
        resolve_resume(str(cfg.resume))  # raises its one line: no such run folder or checkpoint
    run_dir = run_dir_of(str(cfg.resume))
    check_writable(run_dir)
    lock.acquire(run_dir)
    run_dir, path, state = resolve_resume(str(cfg.resume))
    cfg = resumed_config(cfg, run_dir, overrides, lambda o: compose_config("train", o))
    require(cfg.trainer.max_steps >= state["step"],
            f"trainer.max_steps={cfg.trainer.max_steps} is below the checkpoint's step {state['step']} ({path}): "
            f"resume with trainer.max_steps={state['step']} or more, or from an earlier checkpoint")
    moved = set_aside_later(run_dir, state["step"])
    if moved is not None:
        print(f"resuming from step {state['step']}: the later checkpoints and validation images were moved to "
              f"{moved}", flush=True)
    log.info("resuming from %s (step %d)", path, state["step"])
    return cfg, run_dir, path, state


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "run"


def hydra_job_dir() -> Path | None:
    """The job folder Hydra made for this job in a multirun (sweep) launch, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None


def refine_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A new refine run's config: the source run's config.yaml (prompt, prompts and their weights, prior,
    cameras, seed, export) with the stage's values on top (staged_config), then the command line's overrides,
    which may change anything (a refine run is a new run). It records `refine: <source folder>`."""
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
    out.trainer = dict(staged["trainer"], learning_rates=colour_field_rates(source["geometry"],
                                                                             staged["trainer"]["learning_rates"]))
    if "_target_" not in (source.get("export") or {}):  # a source trained with ~export: the refine run exports
        out.export = staged["export"]
    own = OmegaConf.load(CONFIG_DIR / "stage" / f"{stage}.yaml")  # the keys the stage file itself sets
    own.pop("defaults", None)
    composed = leaves(staged_cfg)
    stage_changes = {k: composed[k] for k in leaves(own) if k.split(".")[0] not in OWN_GROUPS}
    return apply_changes(out, stage_changes, f"stage={stage}")


HASH_GRID_COLOUR_RATES = ("geometry.color_encoding", "geometry.color_density_mlp", "geometry.color_albedo_mlp")


def colour_field_rates(source_geometry: dict, rates: dict) -> dict:
    """The refine trainer's learning rates for the colour field the source run leaves: the stage files name the
    hash grid's groups; a Gaussian source's colour field learns its colours at the rate the stage gives the hash
    grid's albedo MLP, and keeps its means, scales, rotations and opacities (the surface is the DMTet's now, and
    moving the Gaussians would only blur the colours they hold)."""
    from hydra.utils import get_class

    from perpneg3d.geometry.gaussians import GaussianCloud

    if not issubclass(get_class(source_geometry["_target_"]), GaussianCloud):
        return rates
    out = {k: v for k, v in rates.items() if k not in HASH_GRID_COLOUR_RATES}
    out.update({"geometry.color_means": 0.0, "geometry.color_scales": 0.0, "geometry.color_rotations": 0.0,
                "geometry.color_opacities": 0.0,
                "geometry.color_colors": rates.get("geometry.color_albedo_mlp", 0.0)})
    return out


def with_overrides(cfg: DictConfig, stage: str, overrides: list[str], where: str) -> DictConfig:
    """`cfg` with what the command line's overrides (other than refine= and stage=) ask for, read against the
    stage's composed config (so that the stage's keys, geometry.grid_resolution, ... can be set)."""
    user = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("refine", "stage")]
    if not user:
        return cfg
    return apply_changes(cfg, requested_changes(user, lambda o: compose_config("train", [f"stage={stage}"] + o)), where)
