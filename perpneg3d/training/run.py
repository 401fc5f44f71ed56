"""Wires a composed config into a training run: components in order, the run folder, resume, outputs."""
from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from perpneg3d.config import compose_config, instantiate
from perpneg3d.contracts import HasViewClassifier, device_of
from perpneg3d.errors import require
from perpneg3d.prompts import validate_prompt
from perpneg3d.run_dir import check_writable, new_run_dir
from perpneg3d.threads import apply_threads
from perpneg3d.training.checkpoint import latest_valid_checkpoint, resolve_resume
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


def prepare_run_dir(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, Path, dict | None]:
    """(config, run folder, checkpoint state or None): resume=... and a requeued sweep job rebuild the
    run from its own config.yaml (resume_config); otherwise a fresh folder and `cfg` as given."""
    if cfg.resume:
        run_dir, path, state = resolve_resume(str(cfg.resume))
        check_writable(run_dir)
        cfg = resumed_config(cfg, run_dir, overrides, lambda o: compose_config("train", o))
        log.info("resuming from %s (step %d)", path, state["step"])
        return cfg, run_dir, state
    job_dir = hydra_job_dir()
    if job_dir is not None:  # sweep job: Hydra's folder; a requeued job finds its own checkpoints there
        job_dir.mkdir(parents=True, exist_ok=True)
        check_writable(job_dir)
        found = latest_valid_checkpoint(job_dir)
        if found is not None:
            cfg = requeued_config(cfg, job_dir)
            log.info("requeued job: resuming from %s", found[0])
        return cfg, job_dir, (found[1] if found else None)
    return cfg, new_run_dir(Path(cfg.out_dir) / (cfg.name or slug(cfg.prompt))), None


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


def train(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Run (or resume) one training job; returns its run folder. overrides: the command line's
    (default: Hydra's, under train.py); None outside Hydra, when a resume compares all of `cfg`."""
    validate_prompt(cfg.prompt)
    require(isinstance(cfg.seed, int), f"seed={cfg.seed!r} must be an integer")
    cfg, run_dir, state = prepare_run_dir(cfg, overrides if overrides is not None else command_line_overrides())
    apply_threads(cfg.get("threads", "auto"))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    trainer = instantiate(cfg.trainer)
    cameras = instantiate(cfg.cameras)
    prompts = instantiate(cfg.prompts)
    guidance = instantiate(cfg.guidance)
    geometry = instantiate(cfg.geometry)
    renderer = instantiate(cfg.renderer)
    exporter = instantiate(cfg.export) if cfg.get("export") and "_target_" in cfg.export else None
    prompts.bind(guidance.denoiser)  # embeds the view texts once, now: a bad prompt fails before step 0
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    log.info("run folder %s | geometry %s | renderer %s | device %s", run_dir, geometry.encoding.implementation,
             renderer.backend, device_of(guidance.denoiser))
    try:
        metrics = trainer.fit(geometry, renderer, guidance, prompts, cameras, run_dir, seed=cfg.seed, state=state,
                              writer=writer, evaluate=janus_evaluator(cfg, guidance.denoiser, cameras, run_dir),
                              export=exporter)
    except Preempted as stopped:
        print(f"interrupted: checkpoint saved; resume with: python train.py resume={run_dir}", flush=True)
        if stopped.signum == signal.SIGINT:
            raise SystemExit(130)  # the shell's code for a Ctrl-C
        return run_dir
    finally:
        writer.close()
    janus = metrics.get("janus")
    summary = f" | front_share {janus['front_share']:.2f} view_acc_aligned {janus['view_acc_aligned']:.2f}" if janus else ""
    print(f"done: {run_dir} ({metrics['seconds_per_step'] * 1000:.0f} ms/step){summary}")
    return run_dir
