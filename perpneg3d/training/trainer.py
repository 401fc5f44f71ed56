"""The optimisation loop: cameras -> render -> view prompts -> Perp-Neg SDS -> regularisers -> Adam."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from perpneg3d.contracts import Densifies, Geometry, MultiView, Renderer, Surface, device_of
from perpneg3d.errors import ExportError, NumericalError, PerpNegError, require
from perpneg3d.random_streams import RandomStreams
from perpneg3d.run_dir import write_atomic
from perpneg3d.schedules import ramp
from perpneg3d.checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint
from perpneg3d.training.preemption import Preempted, PreemptionHandler
from perpneg3d.training.progress import Progress
from perpneg3d.training.timing import NULL_TIMER, PhaseTimer
from perpneg3d.training.visuals import render_turntable, validation_grid
from perpneg3d.validation import (
    Elevation,
    NonNegativeFloat,
    OpenProbability,
    PositiveFloat,
    PositiveInt,
    Probability,
    RampValue,
    validated,
)

log = logging.getLogger(__name__)

DEFAULT_LRS = {"geometry.encoding": 0.01, "geometry.density_mlp": 0.01, "geometry.albedo_mlp": 0.01,
               "renderer.background": 0.001}


@dataclass
class RunState:
    """Everything a training step reads and changes (what a checkpoint saves, plus the parts that
    stay fixed: guidance, prompts bound to its denoiser, cameras)."""

    geometry: Geometry
    renderer: Renderer
    guidance: object
    prompts: object
    cameras: object
    optimizer: torch.optim.Optimizer
    rng: RandomStreams
    counters: dict
    run_dir: Path | None = None


def new_counters(device) -> dict:
    """Run counters; nonfinite_entries stays on the device (summed without a sync, read when logging)."""
    return {"nonfinite_steps": 0, "nonfinite_streak": 0, "train_seconds": 0.0,
            "nonfinite_entries": torch.zeros((), dtype=torch.long, device=device)}


def read_metrics(metrics: dict) -> dict[str, float]:
    """Device tensors -> Python floats (logging steps only: each read is a host sync on CUDA)."""
    return {k: float(v) for k, v in metrics.items()}


def write_progress(run_dir: Path, step: int, max_steps: int, metrics: dict, counters: dict) -> None:
    """progress.json: the step a run has reached and its latest losses (for people and cluster scripts)."""
    tmp = run_dir / ".progress.json.tmp"
    tmp.write_text(json.dumps(dict(step=step, max_steps=max_steps, time=time.time(), metrics=metrics,
                                   nonfinite_steps=counters["nonfinite_steps"],
                                   nonfinite_entries=int(counters["nonfinite_entries"]))))
    os.replace(tmp, run_dir / "progress.json")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    write_atomic(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=2, default=float))


class Trainer:
    """Hyper-parameters of a run; fit() trains the given components and writes the run folder."""

    @validated("trainer")
    def __init__(
        self,
        max_steps: PositiveInt = 10000,
        learning_rates: Mapping[str, NonNegativeFloat] | None = None,
        betas: tuple[OpenProbability, OpenProbability] = (0.9, 0.99),
        eps: PositiveFloat = 1e-15,
        lambda_sds: RampValue = 1.0,
        lambda_orient: RampValue = (0, 10.0, 1000.0, 5000),
        lambda_sparsity: RampValue = 1.0,
        lambda_opaque: RampValue = 0.0,
        lambda_z_variance: RampValue = 0.0,
        lambda_normal_consistency: RampValue = 0.0,
        lambda_laplacian: RampValue = 0.0,
        val_every: PositiveInt = 200,
        val_resolution: PositiveInt = 128,
        ckpt_every: PositiveInt = 500,
        keep_checkpoints: PositiveInt = 3,
        log_every: PositiveInt = 10,
        turntable_frames: PositiveInt = 120,
        turntable_fps: PositiveInt = 30,
        turntable_resolution: PositiveInt = 256,
        turntable_elevation: Elevation = 15.0,
        max_nonfinite_steps: PositiveInt = 20,
        nonfinite_skip_share: Probability = 0.5,
        progress: bool = True,
    ):
        self.max_steps, self.lrs = max_steps, dict(learning_rates or DEFAULT_LRS)
        self.betas, self.eps = tuple(betas), eps
        self.lambdas = dict(sds=lambda_sds, orient=lambda_orient, sparsity=lambda_sparsity, opaque=lambda_opaque,
                            z_variance=lambda_z_variance, normal_consistency=lambda_normal_consistency,
                            laplacian=lambda_laplacian)
        self.val_every, self.val_resolution, self.ckpt_every = val_every, val_resolution, ckpt_every
        self.keep_checkpoints, self.log_every = keep_checkpoints, log_every
        self.turntable = dict(frames=turntable_frames, fps=turntable_fps, resolution=turntable_resolution,
                              elevation=turntable_elevation)
        self.max_nonfinite_steps, self.nonfinite_skip_share, self.progress = max_nonfinite_steps, nonfinite_skip_share, progress

    # -- set-up ------------------------------------------------------------------------------
    def make_optimizer(self, geometry: Geometry, renderer: Renderer) -> torch.optim.Optimizer:
        groups = {f"geometry.{k}": v for k, v in geometry.param_groups().items()}
        groups.update({f"renderer.{k}": v for k, v in renderer.param_groups().items()})
        unknown = set(self.lrs) - set(groups)
        require(not unknown, f"trainer.learning_rates has unknown groups {sorted(unknown)}: use {sorted(groups)}")
        params = [{"params": p, "lr": self.lrs.get(name, 0.0), "name": name} for name, p in groups.items() if p]
        return torch.optim.Adam(params, betas=self.betas, eps=self.eps)

    def losses(self, out, sds_loss, step: int, surface: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """SDS plus regularisers (orientation, sparsity, opacity, z-variance; a surface's own, such as normal
        consistency and Laplacian, from `surface`), weighted at `step`."""
        terms = {"sds": sds_loss}
        unknown = set(surface or {}) - set(self.lambdas)
        require(not unknown, f"the geometry's regularisers {sorted(unknown)} have no trainer.lambda_<name>")
        terms.update({k: v for k, v in (surface or {}).items() if ramp(self.lambdas[k], step) > 0})
        if out.orientation is not None and ramp(self.lambdas["orient"], step) > 0:
            terms["orient"] = out.orientation.sum() / (out.opacity > 0).sum().clamp_min(1)
        terms["sparsity"] = (out.opacity ** 2 + 0.01).sqrt().mean()
        opacity = out.opacity.clamp(1e-3, 1 - 1e-3)
        terms["opaque"] = torch.nn.functional.binary_cross_entropy(opacity, opacity.round().detach())
        visible = (out.opacity > 0.5).float()  # a masked mean without boolean indexing (no host sync)
        terms["z_variance"] = (out.z_variance * visible).sum() / visible.sum().clamp_min(1)
        return {k: v * ramp(self.lambdas[k], step) for k, v in terms.items()}

    # -- the loop ----------------------------------------------------------------------------
    def start(self, geometry, renderer, guidance, prompts, cameras, seed: int = 0, run_dir: Path | None = None) -> RunState:
        """A fresh RunState: parts on the denoiser's device, optimiser, seeded random streams, prompts
        bound to the denoiser (their texts embedded once)."""
        if isinstance(guidance.denoiser, MultiView):
            views = guidance.denoiser.views_per_group
            require(getattr(cameras, "views_per_group", 1) == views,
                    f"guidance.denoiser.views_per_group={views} denoises groups of {views} views: set "
                    f"cameras.views_per_group={views} and cameras.batch_size to a multiple of it")
        device = device_of(guidance.denoiser)
        geometry.to(device).train()
        renderer.to(device).train()
        return RunState(geometry, renderer, guidance, prompts.bind(guidance.denoiser), cameras,
                        self.make_optimizer(geometry, renderer), RandomStreams.seeded(seed, device), new_counters(device),
                        None if run_dir is None else Path(run_dir))

    def fit(self, geometry, renderer, guidance, prompts, cameras, run_dir: Path, seed: int = 0,
            state: dict | None = None, writer=None, evaluate=None, export=None) -> dict:
        """Train to max_steps (from `state` when resuming); returns the metrics written to metrics.json."""
        run = self.start(geometry, renderer, guidance, prompts, cameras, seed, run_dir)
        start = self.restore(state, run) if state is not None else 0
        geometry.update_step(start)
        bar = Progress(start, self.max_steps, enabled=self.progress)
        last = {}
        with PreemptionHandler() as stop:
            for step in range(start, self.max_steps):
                t0 = time.perf_counter()
                metrics = self.train_step(step, run)
                run.counters["train_seconds"] += time.perf_counter() - t0
                done = step + 1
                if metrics.get("skipped") and run.counters["nonfinite_streak"] >= self.max_nonfinite_steps:
                    path = self.checkpoint(done, run)
                    raise NumericalError(f"{run.counters['nonfinite_streak']} consecutive steps had NaN/inf in the loss or "
                                         f"gradient (step {done}); last good state saved to {path}: lower the learning "
                                         "rates or guidance_scale, or set guidance.grad_clip")
                logged = done % self.log_every == 0 or done == self.max_steps
                if logged:  # the only place metrics reach the host
                    last = read_metrics(metrics)
                    write_progress(run.run_dir, done, self.max_steps, last, run.counters)
                    if writer is not None:
                        for key, value in last.items():
                            writer.add_scalar(f"train/{key}", value, done)
                bar.advance(done, last.get("loss") if logged else None,
                            1000 * (time.perf_counter() - t0))
                if done % self.val_every == 0 or done == self.max_steps:
                    self.validate(done, geometry, renderer, cameras, run.run_dir, writer)
                if stop.requested:
                    path = self.checkpoint(done, run)
                    bar.close()
                    log.warning("stopped at step %d; checkpoint %s; resume with resume=%s", done, path, run.run_dir)
                    signum = stop.signum
                    stop.hand_over()
                    raise Preempted(str(run.run_dir), signum)
                if done % self.ckpt_every == 0 and done < self.max_steps:
                    self.checkpoint(done, run)
        bar.close()
        self.checkpoint(self.max_steps, run)
        return self.finish(geometry, renderer, cameras, run.run_dir, run.counters, last, evaluate, export)

    def train_step(self, step: int, run: RunState, timer: PhaseTimer = NULL_TIMER) -> dict:
        """One optimisation step (docs/architecture.md has its data flow). Returns device tensors (read
        them on logging steps only); on CUDA its one host synchronisation is the skip decision (docs/gpu.md)."""
        geometry, renderer, guidance, optimizer, rng, counters = (run.geometry, run.renderer, run.guidance, run.optimizer,
                                                                  run.rng, run.counters)
        geometry.update_step(step)
        renderer.update(step, geometry)  # occupancy grid before rendering, as in nerfacc's examples
        cams = run.cameras.sample(step, rng.device)
        shading = renderer.choose_shading(step, rng.host)
        with_normals = ramp(self.lambdas["orient"], step) > 0
        with timer.phase("render"):
            out = renderer(geometry, cams, shading=shading, with_normals=with_normals, rng=rng)
        with timer.phase("prompts"):
            prompt_batch = run.prompts(cams.azimuth_deg, cams.elevation_deg)
        with timer.phase("guidance"):
            sds = guidance(out.rgb, prompt_batch, step, rng.device, cams.c2w)
        surface = None
        if out.mesh is not None and isinstance(geometry, Surface) and \
                any(ramp(self.lambdas[k], step) > 0 for k in ("normal_consistency", "laplacian")):
            surface = geometry.regularizers(*out.mesh)
        terms = self.losses(out, sds.loss, step, surface)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        with timer.phase("backward"):
            loss.backward()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(loss)] + [torch.isfinite(g).all() for g in grads]).all()
        counters["nonfinite_entries"] += sds.nonfinite
        if not bool(finite & (sds.nonfinite_share <= self.nonfinite_skip_share)):  # the step's one sync
            counters["nonfinite_steps"] += 1
            counters["nonfinite_streak"] += 1
            log.warning("step %d: NaN/inf in the loss or gradients, or more than %.0f%% of the SDS gradient; step "
                        "skipped (%d so far)", step, 100 * self.nonfinite_skip_share, counters["nonfinite_steps"])
            optimizer.zero_grad(set_to_none=True)
            return {"skipped": 1.0, "nonfinite_steps": float(counters["nonfinite_steps"])}
        counters["nonfinite_streak"] = 0
        with timer.phase("optimizer"):
            optimizer.step()
            if isinstance(geometry, Densifies):  # Gaussians: statistics every step, clone/split/prune on its schedule
                geometry.densify(step + 1, optimizer)
        metrics = {f"loss_{k}": v.detach() for k, v in terms.items()}
        pixels = max(out.rgb.shape[0] * out.rgb.shape[1] * out.rgb.shape[2], 1)
        metrics.update(loss=loss.detach(), grad_norm=sds.grad_norm, t_mean=sds.t.float().mean(),
                       nonfinite_entries=sds.nonfinite, samples_per_ray=out.num_samples / pixels,
                       opacity=out.opacity.detach().mean())
        return metrics

    # -- checkpoints and outputs --------------------------------------------------------------
    @staticmethod
    def restore(state: dict, run: RunState) -> int:
        """Load a checkpoint into the run's objects (the inverse of checkpoint()); returns its step."""
        run.geometry.load_state_dict(state["geometry"])
        run.renderer.load_state_dict(state["renderer"])
        run.optimizer.load_state_dict(state["optimizer"])
        for param, slots in run.optimizer.state.items():  # Adam moments of a table saved in the other layout
            for key, value in slots.items():
                if torch.is_tensor(value) and value.numel() == param.numel() and value.shape != param.shape:
                    slots[key] = value.reshape(param.shape)
        if isinstance(state["generator"], dict):
            run.rng.load_state_dict(state["generator"])
        else:  # checkpoints of perpneg3d 0.1 held the CPU stream only
            run.rng.host.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            log.warning("checkpoint from an older version: the device random stream restarts from the seed")
        counters = new_counters(run.rng.device.device)
        counters.update({k: v for k, v in state.get("counters", {}).items() if k != "nonfinite_entries"})
        counters["nonfinite_entries"] += int(state.get("counters", {}).get("nonfinite_entries", 0))
        run.counters = counters
        log.info("resumed at step %d", state["step"])
        return int(state["step"])

    def checkpoint(self, step: int, run: RunState) -> Path:
        counters = dict(run.counters, nonfinite_entries=int(run.counters["nonfinite_entries"]))
        state = dict(step=step, geometry=run.geometry.state_dict(), renderer=run.renderer.state_dict(),
                     optimizer=run.optimizer.state_dict(), generator=run.rng.state_dict(), counters=counters)
        path = save_checkpoint(state, checkpoint_path(run.run_dir, step))
        prune_checkpoints(run.run_dir, self.keep_checkpoints)
        return path

    def validate(self, step, geometry, renderer, cameras, run_dir, writer) -> None:
        grid = validation_grid(geometry, renderer, cameras, self.val_resolution, run_dir / "val" / f"step_{step:07d}.png")
        if writer is not None:
            writer.add_image("val/grid", grid, step)

    def finish(self, geometry, renderer, cameras, run_dir, counters, last, evaluate, export) -> dict:
        video = render_turntable(geometry, renderer, cameras, run_dir / "turntable.mp4", **self.turntable)
        metrics = {"steps": self.max_steps, "train_seconds": round(counters["train_seconds"], 2),
                   "seconds_per_step": round(counters["train_seconds"] / max(self.max_steps, 1), 4),
                   "nonfinite_steps": counters["nonfinite_steps"],
                   "nonfinite_entries": int(counters["nonfinite_entries"]), "final": last, "turntable": str(video)}
        if evaluate is not None:
            metrics["janus"] = evaluate(geometry, renderer)
        write_metrics(run_dir, metrics)  # before the export: a refused or failed export keeps the run's summary
        if export is not None:
            try:
                metrics["mesh"] = [str(p) for p in export(geometry, run_dir)]
            except PerpNegError as err:  # train() turns it into the command that exports again
                raise ExportError(str(err), getattr(err, "overrides", ())) from None
            write_metrics(run_dir, metrics)
        return metrics
