"""Wires a composed config into a training run: components in order, the run folder, resume, outputs."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from perpneg3d.config import compose_config, instantiate
from perpneg3d.contracts import HasViewClassifier, device_of
from perpneg3d.errors import ExportError, require
from perpneg3d.prompts import validate_prompt
from perpneg3d.run_dir import RunLock, check_writable, new_run_dir, write_atomic
from perpneg3d.threads import apply_threads
from perpneg3d.training.checkpoint import latest_valid_checkpoint, resolve_resume, run_dir_of, set_aside_later
from perpneg3d.training.preemption import Preempted
from perpneg3d.training.resume_config import requeued_config, resumed_config

log = logging.getLogger(__name__)


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


def command_line_overrides() -> list[str] | None:
    """The overrides train.py was given (Hydra's task overrides), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def prepare_run_dir(cfg: DictConfig, overrides: list[str] | None, lock: RunLock,
                    into: Path | None = None) -> tuple[DictConfig, Path, dict | None]:
    """(config, run folder, checkpoint state or None): resume=... and a requeued sweep job rebuild the
    run from its own config.yaml (resume_config); otherwise a fresh folder and `cfg` as given. `into`: a
    fixed folder (the refine stage of then_refine), treated as a sweep job's. The run folder is locked
    (`lock`) before anything in it is read or moved."""
    if cfg.resume:
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
        return cfg, run_dir, state
    job_dir = into if into is not None else hydra_job_dir()
    if job_dir is not None:  # sweep job: Hydra's folder; a requeued job finds its own checkpoints there
        job_dir.mkdir(parents=True, exist_ok=True)
        check_writable(job_dir)
        lock.acquire(job_dir)
        found = latest_valid_checkpoint(job_dir)
        if found is not None:
            cfg = requeued_config(cfg, job_dir)
            log.info("requeued job: resuming from %s", found[0])
        return cfg, job_dir, (found[1] if found else None)
    run_dir = new_run_dir(Path(cfg.out_dir) / (cfg.name or slug(cfg.prompt)))
    lock.acquire(run_dir)
    return cfg, run_dir, None


def describe(geometry) -> str:
    """The geometry's class and, for a hash grid, its implementation (tcnn or torch), for the run's first log line."""
    field = getattr(geometry, "color_field", geometry)
    encoding = getattr(field, "encoding", None)
    return type(geometry).__name__ + (f" ({encoding.implementation})" if encoding is not None else "")


def janus_evaluator(cfg: DictConfig, denoiser, cameras, run_dir: Path):
    """Closure computing Janus metrics at the end of training, when a view classifier is at hand."""
    if cfg.evaluate_janus is False or (cfg.evaluate_janus == "auto" and not isinstance(denoiser, HasViewClassifier)):
        return None
    from perpneg3d.evaluation.classifiers import classifier_for
    from perpneg3d.evaluation.janus import classifier_camera, janus_metrics

    classifier = classifier_for(denoiser, cfg.prompt)
    cam = classifier_camera(classifier, cameras)

    def evaluate(geometry, renderer):
        return janus_metrics(geometry, renderer, classifier, cfg.prompt, strip_path=run_dir / "janus_strip.png", **cam)

    return evaluate


def export_command(cfg: DictConfig, run_dir: Path, fixes: tuple[str, ...] = ()) -> str:
    """The scripts/export.py command that exports this run as it was configured (the export.* values
    that differ from the script's defaults), with `fixes` (export.key=value) on top."""
    from perpneg3d.training.resume_config import leaves

    default = leaves(compose_config("export", [])["export"])
    wanted = {k: v for k, v in leaves(cfg.export).items() if default.get(k) != v}
    wanted.update(f.removeprefix("export.").split("=", 1) for f in fixes)
    shown = [f"export.{k}=" + (f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v))
             for k, v in sorted(wanted.items())]
    return " ".join(["python scripts/export.py", f"run={run_dir}", *shown])


def train(cfg: DictConfig, overrides: list[str] | None = None, into: Path | None = None) -> Path:
    """Run (or resume) one training job; returns its run folder (with then_refine, the refine stage's).
    overrides: the command line's (default: Hydra's, under train.py); None outside Hydra, when a resume
    compares all of `cfg`. into: train in this folder (resuming what it holds) instead of a new one."""
    overrides = overrides if overrides is not None else command_line_overrides()
    if cfg.get("refine") and not cfg.get("resume"):  # a new second-stage run: the source run's config plus the stage's
        from perpneg3d.training.refine import refine_config

        cfg = refine_config(cfg, overrides or [])
    validate_prompt(cfg.prompt)
    require(isinstance(cfg.seed, int), f"seed={cfg.seed!r} must be an integer")
    with RunLock() as lock:
        cfg, run_dir, state = prepare_run_dir(cfg, overrides, lock, into)
        finished = state is not None and state["step"] >= cfg.trainer.max_steps and (run_dir / "metrics.json").is_file()
        if cfg.get("then_refine") and finished:  # a requeued two-stage job whose first stage is done
            log.info("%s finished its first stage earlier: on to the refine stage", run_dir)
        else:
            run_dir = _train_in(cfg, run_dir, state)
    if cfg.get("then_refine") and not cfg.get("refine"):
        return refine_after(run_dir, list(cfg.get("refine_overrides") or []))
    return run_dir


def refine_after(run_dir: Path, overrides: list[str]) -> Path:
    """then_refine: the refine stage of a finished run in <run>/refine (resumed if it holds checkpoints, so a
    requeued sweep job finishes both stages): the stage's config with `overrides` (refine_overrides)."""
    return train(OmegaConf.create({"refine": str(run_dir), "resume": None}), overrides, into=run_dir / "refine")


def _train_in(cfg: DictConfig, run_dir: Path, state: dict | None) -> Path:
    """Build the parts and train in the locked run folder (train())."""
    apply_threads(cfg.get("threads", "auto"))
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    trainer = instantiate(cfg.trainer)  # the cheap parts first: a bad option fails before a prior loads
    cameras = instantiate(cfg.cameras)
    prompts = instantiate(cfg.prompts)
    geometry = instantiate(cfg.geometry)
    renderer = instantiate(cfg.renderer)
    exporter = instantiate(cfg.export) if cfg.get("export") and "_target_" in cfg.export else None
    if cfg.get("refine") and state is None:
        from perpneg3d.training.refine import initialise

        initialise(geometry, renderer, cfg)
    guidance = instantiate(cfg.guidance)
    prompts.bind(guidance.denoiser)  # embeds the view texts once, now: a bad prompt fails before step 0
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: a resumed run's events replace those an interrupted or abandoned history logged after it
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state["step"] + 1 if state else None)
    log.info("run folder %s | geometry %s | renderer %s | device %s", run_dir, describe(geometry), renderer.backend,
             device_of(guidance.denoiser))
    try:
        metrics = trainer.fit(geometry, renderer, guidance, prompts, cameras, run_dir, seed=cfg.seed, state=state,
                              writer=writer, evaluate=janus_evaluator(cfg, guidance.denoiser, cameras, run_dir),
                              export=exporter)
    except ExportError as err:
        raise ExportError(f"training finished and metrics.json is written, but the export failed: {err}; export "
                          f"again with: {export_command(cfg, run_dir, err.overrides)}") from None
    except Preempted as stopped:
        print(f"interrupted: checkpoint saved; resume with: python train.py resume={run_dir}", flush=True)
        # not finished, and nobody requeued it (submitit exits inside the hand-over when it does): the
        # shell's code for that signal, so a script or scheduler never takes the run for a finished one
        raise SystemExit(128 + stopped.signum)
    finally:
        writer.close()
    janus = metrics.get("janus")
    summary = f" | front_share {janus['front_share']:.2f} view_acc_aligned {janus['view_acc_aligned']:.2f}" if janus else ""
    print(f"done: {run_dir} ({metrics['seconds_per_step'] * 1000:.0f} ms/step){summary}")
    return run_dir
