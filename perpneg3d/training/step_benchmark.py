"""Time training steps by phase, for scripts/benchmark_step.py and scripts/gpu_check.py.

A configuration is composed exactly as train.py composes it (plus overrides), then `measure()` runs
warm-up steps and timed steps through Trainer.train_step and reports ms per step (whole steps, one
synchronisation), ms per phase (a second pass that synchronises at each phase edge), it/s and peak
memory (CUDA: allocator peaks after warm-up; CPU: the process's peak RSS).
"""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from perpneg3d.config import CONFIG_DIR, instantiate
from perpneg3d.contracts import device_of
from perpneg3d.training.timing import PhaseTimer, TimedDenoiser

PHASES = ("render", "prompts", "encode", "denoiser", "guidance_other", "backward", "optimizer", "step")


@dataclass
class StepSetup:
    """Everything one training step needs, built from a composed config."""

    trainer: object
    cameras: object
    prompts: object
    guidance: object
    geometry: object
    renderer: object
    device: torch.device


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def refine_config(overrides: list[str]):
    """A refine stage's config without a source run: `overrides` must name a stage (stage=refine, ...). The
    first-stage config the other overrides compose stands for the source run (training/refine.py assembles it
    as a refine run's); the DMTet is a sphere of geometry.init_radius. Its step costs what a refine of a real run
    costs (the mesh's size aside). geometry.* and trainer.* overrides apply to the stage's."""
    from omegaconf import OmegaConf

    from perpneg3d.training.plan import staged_config, with_overrides

    own = ("stage=", "geometry.", "trainer.")
    stage = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")][-1]
    source = OmegaConf.to_container(compose_train([o for o in overrides if not o.startswith(own)]), resolve=True)
    return with_overrides(staged_config(source, stage), stage, [o for o in overrides if o.startswith(own)], "benchmark")


def build_setup(overrides: list[str], denoiser=None, cfg=None) -> StepSetup:
    """Instantiate a run's components (denoiser: use this object instead of the configured one; cfg: this
    composed config instead of composing `overrides`)."""
    cfg = compose_train(overrides) if cfg is None else cfg
    torch.manual_seed(0)
    trainer, cameras, prompts = instantiate(cfg.trainer), instantiate(cfg.cameras), instantiate(cfg.prompts)
    guidance = instantiate(cfg.guidance, denoiser=denoiser) if denoiser is not None else instantiate(cfg.guidance)
    geometry, renderer = instantiate(cfg.geometry), instantiate(cfg.renderer)
    device = device_of(guidance.denoiser)
    geometry.to(device).train()
    renderer.to(device).train()
    return StepSetup(trainer, cameras, prompts, guidance, geometry, renderer, device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return dict(peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                    peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
    return dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def settle(device: torch.device) -> None:
    """After warm-up: collect garbage, and on CUDA return cached blocks and restart the peak-memory count, so the
    figures that follow are the timed steps' own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def whole_steps_ms(setup: StepSetup, run, first: int, steps: int) -> float:
    """ms per training step over `steps` steps, timed as a whole: on CUDA two events around them and one
    synchronisation at the end (a synchronisation per phase would stall a launch-bound step)."""
    if setup.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for step in range(first, first + steps):
            setup.trainer.train_step(step, run)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        setup.trainer.train_step(step, run)
    return 1000 * (time.perf_counter() - t0) / steps


def measure(setup: StepSetup, steps: int, warmup: int, phases: bool = True) -> dict:
    """warmup untimed steps, then `steps` steps timed whole (ms["step"], it/s), then (phases) `steps` more with
    a synchronising timer at each phase edge, for the split by phase (render, prompts, encode, denoiser,
    guidance_other, backward, optimizer; their sum is ms["step_phased"]); peak memory over the timed steps."""
    timer = PhaseTimer()
    guidance = setup.guidance
    real_denoiser = guidance.denoiser
    run = setup.trainer.start(setup.geometry, setup.renderer, guidance, setup.prompts, setup.cameras, seed=0)
    for step in range(warmup):
        setup.trainer.train_step(step, run)
    settle(setup.device)
    step_ms = whole_steps_ms(setup, run, warmup, steps)
    ms = {}
    if phases:
        guidance.denoiser = TimedDenoiser(real_denoiser, timer)
        try:
            for step in range(warmup + steps, warmup + 2 * steps):
                with timer.phase("step"):
                    setup.trainer.train_step(step, run, timer)
        finally:
            guidance.denoiser = real_denoiser
        ms = {k: 1000 * v / steps for k, v in timer.seconds.items()}
        ms["guidance_other"] = ms.get("guidance", 0) - ms.get("encode", 0) - ms.get("denoiser", 0)
        ms["step_phased"] = ms.pop("step")
    ms["step"] = step_ms
    from perpneg3d.training.run import describe

    return dict(ms=ms, its=1000 / step_ms, device=str(setup.device), geometry=describe(setup.geometry),
                renderer=setup.renderer.backend, skipped_steps=run.counters["nonfinite_steps"], **peak_memory_mb(setup.device))
