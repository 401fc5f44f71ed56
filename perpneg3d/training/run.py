"""Runs a training job by its plan (training/plan.py): components in order, training, outputs, the refine stage after."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from perpneg3d.config import compose_config, instantiate
from perpneg3d.contracts import HasViewClassifier, device_of
from perpneg3d.errors import ExportError
from perpneg3d.run_dir import RunLock, write_atomic
from perpneg3d.saved_config import leaves
from perpneg3d.threads import apply_threads
from perpneg3d.training.plan import RunPlan, plan_run
from perpneg3d.training.preemption import Preempted

log = logging.getLogger(__name__)


def command_line_overrides() -> list[str] | None:
    """The overrides train.py was given (Hydra's task overrides), or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


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
    default = leaves(compose_config("export", [])["export"])
    wanted = {k: v for k, v in leaves(cfg.export).items() if default.get(k) != v}
    wanted.update(f.removeprefix("export.").split("=", 1) for f in fixes)
    shown = [f"export.{k}=" + (f"[{','.join(map(str, v))}]" if isinstance(v, list) else str(v))
             for k, v in sorted(wanted.items())]
    return " ".join(["python scripts/export.py", f"run={run_dir}", *shown])


def train(cfg: DictConfig, overrides: list[str] | None = None, into: Path | None = None) -> Path:
    """Run (or resume) one training job; returns its run folder (with then_refine, the refine stage's).
    overrides: the command line's (default: Hydra's, under train.py); None outside Hydra, when a resume
    compares all of `cfg`. into: train in this folder (resuming what it holds) instead of a new one.
    What kind of start it is, and what it needs, is decided once (training/plan.py); the rest follows the plan."""
    overrides = overrides if overrides is not None else command_line_overrides()
    with RunLock() as lock:
        plan = plan_run(cfg, overrides, lock, into)
        if plan.trains:
            _train_in(plan)
        else:  # a requeued two-stage job whose first stage is done
            log.info("%s finished its first stage earlier: on to the refine stage", plan.run_dir)
    if plan.then_refine is not None:
        return refine_after(plan)
    return plan.run_dir


def refine_after(plan: RunPlan) -> Path:
    """then_refine: the refine stage of a finished run in <run>/refine (resumed if it holds checkpoints, so a
    requeued sweep job finishes both stages): the stage's config with the plan's refine_overrides."""
    return train(OmegaConf.create({"refine": str(plan.run_dir), "resume": None}), plan.then_refine,
                 into=plan.run_dir / "refine")


def _train_in(plan: RunPlan) -> None:
    """Build the parts and train in the plan's locked run folder (train())."""
    cfg, run_dir, state = plan.cfg, plan.run_dir, plan.state
    apply_threads(cfg.get("threads", "auto"))
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    trainer = instantiate(cfg.trainer)  # the cheap parts first: a bad option fails before a prior loads
    cameras = instantiate(cfg.cameras)
    prompts = instantiate(cfg.prompts)
    geometry = instantiate(cfg.geometry)
    renderer = instantiate(cfg.renderer)
    exporter = instantiate(cfg.export) if cfg.get("export") and "_target_" in cfg.export else None
    if plan.initialises:
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
