"""Why toy runs fail the Janus benchmark: three diagnoses, each rerunnable (issue 21; docs/janus.md).

    python scripts/diagnose_janus.py                                  # all three parts
    python scripts/diagnose_janus.py parts=[classifier] objects=[cat]

prior:       per object of the toy prior's data set: pixel colour, image cover, and the colour of the CFG
             direction at high noise (what "a toy <object>" adds to the unconditional model).
classifier:  the toy view classifier's accuracy per object and view on ground-truth renders at random
             azimuths, elevations 0-30 and distances 1.8-2.1 (not its reference grid).
reconstruct: the toy preset's field, renderer and cameras fitted to ground-truth renders of each object from all
             azimuths (photometric loss, no guidance); then the Janus metrics. If an object cannot be
             reconstructed with views the classifier labels right, the defect is not in the guidance.
views:       does a view prompt's posterior follow its view? For a noisy ground-truth front render of each object (what
             every camera sees when the field is a column that looks the same from all azimuths), the toy prior's
             posterior mass on the object's front, side and back images under "a toy <object>, <view> view", at
             prompts.view_emphasis 1 and the emphases in `view_emphases`, at the timesteps `view_timesteps`.
layout:      toy-preset runs traced from step 0 every `layout_every` steps: per azimuth (0, 45, ..., 315) the
             classifier's label of the render and the SDS gradient's norm; the density's extent along x and y.
Writes diagnosis.md, diagnosis.json and pictures (reconstruct.png, layout_<object>_<seed>.png) into out_dir.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from perpneg3d.cameras import CameraBatch, look_at, orbit_cameras, spherical_position
from perpneg3d.config import compose_config, instantiate, run_script
from perpneg3d.errors import require
from perpneg3d.evaluation.janus import janus_metrics
from perpneg3d.evaluation.layout import density_extent, sds_norm_per_view
from perpneg3d.images import make_grid, save_png
from perpneg3d.prompts import ViewPrompts
from perpneg3d.prompts.views import VIEWS, view_labels
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer.orbit import render_rgb
from perpneg3d.toy.objects import render_objects

AZIMUTHS = torch.arange(8) * 45.0


def toy_parts(cfg, obj: str, seed: int = 0):
    """(run config, trainer, cameras, prompts, geometry, renderer, guidance) of the toy preset for one object."""
    run = compose_config("train", list(cfg.overrides) + [f'prompt="a toy {obj}"', f"seed={seed}"])
    torch.manual_seed(seed)
    return (run, instantiate(run.trainer), instantiate(run.cameras), instantiate(run.prompts), instantiate(run.geometry),
            instantiate(run.renderer), instantiate(run.guidance))


def classifier_part(cfg, out: Path) -> dict:
    classifier = toy_parts(cfg, cfg.objects[0])[-1].denoiser.view_classifier()
    g = torch.Generator().manual_seed(0)
    n, result = int(cfg.classifier_views), {}
    for obj in cfg.objects:
        az = torch.rand(n, generator=g) * 360 - 180
        el = torch.rand(n, generator=g) * 30
        dist = 1.8 + 0.3 * torch.rand(n, generator=g)
        eye = spherical_position(az, el, dist)
        cams = CameraBatch(look_at(eye, torch.zeros_like(eye)), torch.full((n,), 40.0), az, el, dist, eye, 32, 32)
        pred = classifier(render_objects([obj] * n, cams, supersample=2))
        truth = view_labels(az, torch.zeros_like(az))
        ok = pred.object_idx == classifier.object_index(f"a toy {obj}")
        per_view = {VIEWS[v]: float(((pred.view_idx == truth) & ok)[truth == v].float().mean()) for v in range(3)}
        confusion = {VIEWS[v]: {VIEWS[p]: int(((pred.view_idx == p) & ok & (truth == v)).sum()) for p in range(3)}
                     for v in range(3)}
        result[obj] = dict(object_recognised=float(ok.float().mean()), view_accuracy=per_view, confusion=confusion)
    return result


@torch.no_grad()
def prior_part(cfg, out: Path) -> dict:
    """Per object of the toy prior's data set: its images, the mean colour of its pixels (those not white), the
    share of the image it covers, and the mean colour of the CFG direction x0(object, side view) - x0(unconditional)
    for a noisy render of a grey disk at t = 900, with the posterior mass the object gets there."""
    guidance = toy_parts(cfg, cfg.objects[0])[-1]
    prior, data = guidance.denoiser, guidance.denoiser.dataset
    images, r = data.images, data.resolution

    def colour_and_cover(x):
        ink = (1 - x).sum(1, keepdim=True) > 0.15
        return ((x * ink).sum((0, 2, 3)) / ink.sum((0, 2, 3))).tolist(), float(ink.float().mean())

    yy, xx = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    disk = torch.where(((yy - r / 2) ** 2 + (xx - r / 2) ** 2) < (r / 5) ** 2, 0.5, 1.0).expand(1, 3, r, r)
    t = torch.tensor([900, 900])
    abar = prior.alphas_cumprod[t[:1]].cpu()
    noisy = abar.sqrt() * (disk * 2 - 1) + (1 - abar).sqrt() * torch.randn(disk.shape, generator=torch.Generator().manual_seed(0))
    result = {"all": dict(zip(("colour", "cover"), colour_and_cover(images)), images=len(images))}
    for i, obj in enumerate(data.objects):
        colour, cover = colour_and_cover(images[data.object_idx == i])
        w, x0 = prior.posterior(noisy.repeat(2, 1, 1, 1).to(prior.device), t, prior.embed([f"a toy {obj}, side view", ""]))
        direction = (x0[0] - x0[1]).view(3, r, r).cpu()
        mass = float(w[0].cpu()[data.object_idx == i].sum())
        result[obj] = dict(images=int((data.object_idx == i).sum()), colour=colour, cover=cover,
                           cfg_direction_colour=direction.mean((1, 2)).tolist(), posterior_mass=mass)
    return result


def views_part(cfg, out: Path) -> dict:
    """Posterior mass on front / side / back images of the object per prompt view, emphasis and timestep, for
    `view_noise_draws` noisy versions of the object's ground-truth front render (azimuth 0, elevation 15)."""
    guidance = toy_parts(cfg, cfg.objects[0])[-1]
    prior, data = guidance.denoiser, guidance.denoiser.dataset
    g = torch.Generator().manual_seed(0)
    n, result = int(cfg.view_noise_draws), {}
    front = orbit_cameras(torch.tensor([0.0]), 15.0, sum(data.distance_range) / 2, data.fovy_deg, data.resolution)
    for obj in cfg.objects:
        mine = data.object_idx == data.objects.index(obj)
        x0 = prior.encode(render_objects([obj], front, supersample=2))
        for emphasis in cfg.view_emphases:
            emb = ViewPrompts(f"a toy {obj}", view_emphasis=float(emphasis)).bind(prior)._emb
            for view in ("front", "side", "back"):
                shares = {}
                for t in cfg.view_timesteps:
                    abar = prior.alphas_cumprod[int(t)].cpu()
                    noise = torch.randn(n, *x0.shape[1:], generator=g)
                    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                    w, _ = prior.posterior(x_t.to(prior.device), torch.full((n,), int(t)),
                                           emb[1 + VIEWS.index(view)].expand(n, -1))
                    w = w.mean(0).cpu()
                    shares[int(t)] = [float(w[mine & (data.view_idx == v)].sum()) for v in range(3)]
                result[f"{obj}|{view}|{float(emphasis):g}"] = shares
    return result


def reconstruct_part(cfg, out: Path) -> dict:
    result, strips = {}, []
    for obj in cfg.objects:
        run, trainer, cameras, prompts, geometry, renderer, guidance = toy_parts(cfg, obj)
        classifier = guidance.denoiser.view_classifier()
        optimizer = trainer.make_optimizer(geometry, renderer)
        rng = RandomStreams.seeded(0)
        t0 = time.perf_counter()
        for step in range(int(cfg.reconstruct_steps)):
            geometry.update_step(step)
            renderer.update(step, geometry)
            cams = cameras.sample(step, rng.device)
            target = render_objects([obj] * cams.batch_size, cams, supersample=2).permute(0, 2, 3, 1)
            rendered = renderer(geometry, cams, shading="albedo", rng=rng)
            loss = torch.nn.functional.mse_loss(rendered.rgb, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        cam = dict(classifier.camera)
        janus = janus_metrics(geometry, renderer, classifier, f"a toy {obj}", **cam)
        level = float(run.export.threshold) if run.export.threshold != "auto" else 5.0
        result[obj] = dict(photometric_mse=float(loss.detach()), seconds=round(time.perf_counter() - t0, 1),
                           view_acc=janus["view_acc"], view_acc_aligned=janus["view_acc_aligned"],
                           janus_free=janus["janus_free"], front_share=janus["front_share"],
                           side_views_labelled_side=side_share(janus), extent=density_extent(geometry, level))
        strips.append(render_rgb(geometry, renderer, AZIMUTHS, torch.full_like(AZIMUTHS, 15.0), cam["distance"],
                                 cam["fovy_deg"], cam["resolution"]))
    save_png(make_grid(torch.cat(strips), nrow=len(AZIMUTHS), upscale=2), out / "reconstruct.png")
    return result


def side_share(janus: dict) -> float:
    """Share of the strip's side azimuths (45 < |a| < 135) that the classifier labels side (object recognised)."""
    az = torch.tensor(janus["azimuth_deg"])
    side = (az.abs() > 45) & (az.abs() < 135)
    pred = torch.tensor(janus["predicted_view"])
    ok = torch.tensor(janus["object_ok"])
    return float(((pred == VIEWS.index("side")) & ok)[side].float().mean())


def layout_part(cfg, out: Path) -> dict:
    result = {}
    for spec in cfg.layout_runs:
        obj, seed = spec.split(":")
        run, trainer, cameras, prompts, geometry, renderer, guidance = toy_parts(cfg, obj, int(seed))
        classifier = guidance.denoiser.view_classifier()
        state = trainer.start(geometry, renderer, guidance, prompts, cameras, int(seed))
        cam = dict(classifier.camera)
        trace, frames = [], []
        for step in range(1, int(cfg.layout_steps) + 1):  # traced after the step (the occupancy grid is set)
            trainer.train_step(step - 1, state)
            if step % int(cfg.layout_every) == 0 or step == 1:
                rgb = render_rgb(geometry, renderer, AZIMUTHS, torch.full_like(AZIMUTHS, 15.0), cam["distance"],
                                 cam["fovy_deg"], cam["resolution"])
                pred = classifier(rgb)
                norms = sds_norm_per_view(guidance, state.prompts, geometry, renderer, AZIMUTHS, 15.0, cam["distance"],
                                          cam["fovy_deg"], cam["resolution"], step)
                ok = pred.object_idx == classifier.object_index(run.prompt)
                labels = [VIEWS[v] if o else "?" for v, o in zip(pred.view_idx.tolist(), ok.tolist())]
                trace.append(dict(step=step, labels=labels, predicted_azimuth=pred.azimuth_deg.tolist(),
                                  sds_norm=[round(x, 3) for x in norms.tolist()], extent=density_extent(geometry, 5.0)))
                frames.append(rgb)
        result[spec] = trace
        save_png(make_grid(torch.cat(frames), nrow=len(AZIMUTHS), upscale=2), out / f"layout_{obj}_{seed}.png")
    return result


def section(title: str, columns: list[str], rows: list[list]) -> list[str]:
    """A markdown section: its title, a table of `columns` and `rows` (cells already formatted), a blank line."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def triple(values, fmt: str = ".3f") -> str:
    return "(" + ", ".join(f"{x:{fmt}}" for x in values) + ")"


def markdown(report: dict) -> str:
    lines = ["# Janus diagnosis (scripts/diagnose_janus.py)", ""]
    if "classifier" in report:
        lines += section("Toy view classifier on ground-truth renders",
                         ["object", "recognised", "front acc", "side acc", "back acc", "side classified as (front/side/back)"],
                         [[obj, f"{r['object_recognised']:.2f}", *(f"{r['view_accuracy'][v]:.2f}" for v in ("front", "side", "back")),
                           "/".join(str(r["confusion"]["side"][v]) for v in ("front", "side", "back"))]
                          for obj, r in report["classifier"].items()])
    if "prior" in report:
        lines += section("The toy prior's objects against its unconditional model",
                         ["object", "images", "pixel colour", "cover", "CFG direction colour at t=900", "posterior mass"],
                         [[obj, r["images"], triple(r["colour"]), f"{r['cover']:.3f}",
                           triple(r["cfg_direction_colour"], "+.3f") if obj != "all" else "-",
                           f"{r['posterior_mass']:.3f}" if obj != "all" else "-"] for obj, r in report["prior"].items()])
    if "views" in report:
        steps = next(iter(report["views"].values())).keys()
        lines += section("View prompts' posterior on a noisy front render: mass on front / side / back images",
                         ["object", "prompt", "view_emphasis", *(f"t={t}" for t in steps)],
                         [[*key.split("|")[:1], f"{key.split('|')[1]} view", key.split("|")[2],
                           *("/".join(f"{x:.2f}" for x in shares) for shares in r.values())]
                          for key, r in report["views"].items()])
    if "reconstruct" in report:
        lines += section("Photometric reconstruction (no guidance)",
                         ["object", "mse", "view_acc", "aligned", "Janus-free", "side views labelled side", "extent x / y / z"],
                         [[obj, f"{r['photometric_mse']:.4f}", f"{r['view_acc']:.2f}", f"{r['view_acc_aligned']:.2f}",
                           r["janus_free"], f"{r['side_views_labelled_side']:.2f}",
                           " / ".join(f"{r['extent'][a]:.2f}" for a in "xyz")] for obj, r in report["reconstruct"].items()])
    for spec, trace in report.get("layout", {}).items():
        lines += section(f"Layout trace {spec} (azimuths {', '.join(str(int(a)) for a in AZIMUTHS.tolist())})",
                         ["step", "labels", "SDS norm per azimuth", "extent x / y"],
                         [[row["step"], " ".join(row["labels"]), " ".join(f"{x:.2f}" for x in row["sds_norm"]),
                           f"{row['extent']['x']:.2f} / {row['extent']['y']:.2f}"] for row in trace])
    return "\n".join(lines)


PARTS = {"classifier": classifier_part, "prior": prior_part, "views": views_part, "reconstruct": reconstruct_part,
         "layout": layout_part}  # in the order they run


def main(cfg) -> None:
    unknown = sorted(set(cfg.parts) - set(PARTS))
    require(not unknown, f"parts={list(cfg.parts)}: {unknown} unknown; use {', '.join(PARTS)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, part in PARTS.items():
        if name in cfg.parts:
            report[name] = part(cfg, out)
            print(markdown({name: report[name]}), flush=True)
    (out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    (out / "diagnosis.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote diagnosis.md, diagnosis.json and pictures to {out}")


if __name__ == "__main__":
    run_script("diagnose_janus", main)
