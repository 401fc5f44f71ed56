"""Coarse vs refined meshes on the toy benchmark's objects and seeds (issue 20's table).

    python scripts/bench_refine.py                               # 3 objects x 6 seeds: toy run, then its refine
    python scripts/bench_refine.py seeds=[0,1,2] launcher=submitit_local

Each (object) is one `train.py -m seed=... then_refine=true` sweep, so every job runs both stages into
<out_dir>/<object>/<seed>/ (coarse) and .../refine/ (refined); finished jobs are reused, interrupted ones
resume. For each run both meshes are compared as exported: the coarse run's marching-cubes surface (its own
export settings) and the refined DMTet surface, each rendered by the same rasterizer with the coarse colour
field and scored by the toy view classifier (Janus metrics on the meshes, not on the volume), plus mesh
quality (perpneg3d.evaluation.mesh_quality). Writes bench.md, bench.csv, bench.json and montage.png.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench_janus import prepare, wilson
from perpneg3d.config import instantiate, run_script
from perpneg3d.errors import ConfigError, require
from perpneg3d.evaluation.classifiers import DEFAULT_CLIP
from perpneg3d.evaluation.janus import classifier_camera, janus_metrics, outcome
from perpneg3d.evaluation.mesh_quality import MeshSurface, mesh_quality
from perpneg3d.gallery import write_gallery
from perpneg3d.images import make_grid, save_png
from perpneg3d.renderer import MeshRenderer, SolidBackground
from perpneg3d.renderer.orbit import render_rgb
from perpneg3d.training.run_loading import load_run, view_classifier_from_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("coarse", "refined")
QUALITY = ("components", "non_manifold_edges", "watertight", "faces", "mean_normal_angle_deg")


def launch(out: Path, obj: str, seeds: list[int], overrides: list[str], refine_overrides: list[str], launcher: str) -> None:
    args = [sys.executable, str(ROOT / "train.py"), "-m", f"seed={','.join(map(str, seeds))}", f'prompt="a toy {obj}"',
            *overrides, "then_refine=true", f"hydra.sweep.dir={out / obj}", "hydra.sweep.subdir=${seed}"]
    if refine_overrides:
        args.append("refine_overrides=[" + ",".join(f'"{o}"' for o in refine_overrides) + "]")
    if launcher != "basic":
        args.append(f"hydra/launcher={launcher}")
    print(f"{obj}: seeds {seeds}, coarse then refine ({launcher})", flush=True)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"the runs of '{obj}' failed ({(done.stderr.strip().splitlines() or ['?'])[-1]}): see {out / obj}")


@torch.no_grad()
def compare(coarse_dir: Path) -> tuple[list[dict], torch.Tensor]:
    """Rows (coarse, refined) of one job, and their renders at azimuth 0, 90, 180, -90 [2*4,3,H,W]."""
    cfg, volume, _, cameras, _, _ = load_run(coarse_dir)
    rcfg, surface, _, _, _, refine_dir = load_run(coarse_dir / "refine")
    exporter = instantiate(cfg.export)
    coarse_mesh, _ = exporter.extract(volume)
    refined_mesh, _ = exporter.extract(surface)
    classifier = view_classifier_from_config(cfg, cfg.prompt, DEFAULT_CLIP)
    cam = classifier_camera(classifier, cameras)
    renderer = MeshRenderer(SolidBackground(tuple(cfg.renderer.background.get("color", (1.0, 1.0, 1.0)))),
                            instantiate(cfg.renderer.material), rasterizer="torch")
    rows, renders = [], []
    azimuth = torch.tensor([0.0, 90.0, 180.0, -90.0])
    for stage, mesh in zip(STAGES, (coarse_mesh, refined_mesh)):
        shown = MeshSurface.from_trimesh(mesh, volume if stage == "coarse" else surface.color_field, float(volume.radius))
        janus = janus_metrics(shown, renderer, classifier, cfg.prompt, **cam)
        metrics = json.loads(((coarse_dir if stage == "coarse" else refine_dir) / "metrics.json").read_text())
        rows.append(dict(stage=stage, prompt=cfg.prompt, seed=cfg.seed, front_share=janus["front_share"],
                         view_acc=janus["view_acc"], view_acc_aligned=janus["view_acc_aligned"],
                         object_acc=janus["object_acc"], **outcome(janus),
                         texture=texture_of(cfg if stage == "coarse" else rcfg), seconds_per_step=metrics["seconds_per_step"],
                         steps=metrics["steps"], **mesh_quality(mesh)))
        renders.append(render_rgb(shown, renderer, azimuth, torch.full_like(azimuth, 15.0), cam["distance"],
                                  cam["fovy_deg"], cam["resolution"]))
    return rows, torch.cat(renders)


def texture_of(cfg) -> str:
    """How a run's export carries colour: vertex colours, or a UV texture of its size."""
    return f"{cfg.export.texture_size}px uv" if cfg.export.texture == "uv" else "vertex colours"


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | Janus-free (95% CI) | oriented (95% CI) | components (mean) | non-manifold edges (mean) | "
             "watertight | faces (mean) | normal angle deg (mean) | texture | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        n = len(mine)
        cells = [stage]
        for key in ("janus_free", "oriented"):
            k = sum(r[key] for r in mine)
            lo, hi = wilson(k, n)
            cells.append(f"{k}/{n} ({lo:.2f}-{hi:.2f})")
        mean = lambda key: sum(float(r[key]) for r in mine) / max(n, 1)  # noqa: E731
        cells += [f"{mean('components'):.1f}", f"{mean('non_manifold_edges'):.1f}",
                  f"{sum(r['watertight'] for r in mine)}/{n}", f"{mean('faces'):.0f}", f"{mean('mean_normal_angle_deg'):.1f}",
                  mine[0]["texture"] if mine else "-", f"{mean('seconds_per_step'):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = {(r["prompt"], r["seed"]): {} for r in rows}
    for r in rows:
        pairs[(r["prompt"], r["seed"])][r["stage"]] = r
    fixes = sum(1 for p in pairs.values() if p["refined"]["oriented"] and not p["coarse"]["oriented"])
    breaks = sum(1 for p in pairs.values() if p["coarse"]["oriented"] and not p["refined"]["oriented"])
    lines += ["", f"refined vs coarse (correctly oriented, paired): {fixes} fixed, {breaks} broken", "",
              "| prompt | seed | stage | front_share | view_acc | view_acc_aligned | Janus-free | components | "
              "non-manifold | watertight | faces | normal angle |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['seed']} | {r['stage']} | {r['front_share']:.2f} | {r['view_acc']:.2f} | "
                     f"{r['view_acc_aligned']:.2f} | {'yes' if r['janus_free'] else 'no'} | {r['components']} | "
                     f"{r['non_manifold_edges']} | {'yes' if r['watertight'] else 'no'} | {r['faces']} | "
                     f"{r['mean_normal_angle_deg']:.1f} |")
    return "\n".join(lines)


def main(cfg) -> None:
    out, objects, seeds = prepare(cfg)
    for obj in objects:
        missing = [s for s in seeds if not (out / obj / str(s) / "refine" / "metrics.json").is_file()]
        if missing:
            launch(out, obj, missing, list(cfg.overrides), list(cfg.refine_overrides), cfg.launcher)
        unfinished = [s for s in missing if not (out / obj / str(s) / "refine" / "metrics.json").is_file()]
        require(not unfinished, f"the '{obj}' jobs with seeds {unfinished} did not finish both stages: see the job logs "
                                f"under {out / obj}, then re-run the benchmark to resume them")
    rows, tiles = [], []
    for obj in objects:
        for s in seeds:
            pair, renders = compare(out / obj / str(s))
            rows += pair
            tiles.append(renders)
            print(f"{obj} seed {s}: " + " | ".join(f"{r['stage']} oriented={r['oriented']} components={r['components']} "
                                                     f"non-manifold={r['non_manifold_edges']}" for r in pair), flush=True)
    text = markdown(rows)
    print(text)
    (out / "bench.md").write_text(text + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.json").write_text(json.dumps(dict(rows=rows, config=OmegaConf.to_container(cfg)), indent=2))
    # montage: a column per run; rows: coarse at 0, 90, 180, -90, then refined at the same azimuths
    grid = torch.stack(tiles)  # [runs, 8, 3, H, W]
    save_png(make_grid(grid.transpose(0, 1).reshape(-1, *grid.shape[2:]), nrow=len(tiles),
                       upscale=max(1, 64 // grid.shape[-1])), out / "montage.png")
    print(f"wrote bench.md, bench.csv, bench.json and montage.png to {out}")
    print(f"gallery: {write_gallery(out)}")  # every run to look at, bench.md on top


if __name__ == "__main__":
    run_script("bench_refine", main)
