"""The refine stage's tetrahedral grid on a real source run: the whole box against the box fitted to the surface.

    python scripts/bench_tet_grid.py outputs/toy/<timestamp>                       # grids of 128 and 256 cells
    python scripts/bench_tet_grid.py outputs/toy/<timestamp> --resolutions 64 128 --steps 5

For each resolution, with geometry.fit_margin=null (the grid over [-radius, radius]^3, as before issue 27) and
with the default margin (the source surface's box plus 10 % per side): grid vertices and tetrahedra, the grid's
memory (tet indices, vertices, sdf and offsets), the cell size on the object, the surface it starts from (faces),
and the refine stage's step (ms per whole step, the source's own refine stage with its prior) and the process's
peak memory. Each configuration runs in its own process, so every peak is its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(source: str, resolution: int, fitted: bool, steps: int, warmup: int, init_level: str) -> dict:
    """Build the refine run of `source` at this grid, start it from the source surface, time its steps."""
    from omegaconf import OmegaConf

    from perpneg3d.training.refine import initialise, refine_config
    from perpneg3d.training.step_benchmark import build_setup, measure

    overrides = [f"geometry.grid_resolution={resolution}", "trainer.progress=false", f"geometry.init_level={init_level}",
                 "geometry.fit_margin=" + ("0.1" if fitted else "null")]
    cfg = refine_config(OmegaConf.create({"refine": source}), overrides)
    setup = build_setup([], cfg=cfg)
    geometry = setup.geometry
    level = initialise(geometry, setup.renderer, cfg)
    vertices, faces = geometry.mesh()
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    grid_mb = (size(geometry.tets) + size(geometry.unit_vertices) + size(geometry.sdf) + size(geometry.deform)) / 2**20
    extent = (geometry.bbox[1] - geometry.bbox[0]).tolist()
    bench = measure(setup, steps, warmup, phases=False)
    return dict(resolution=resolution, grid="fitted" if fitted else "whole box", level=level,
                vertices=int(geometry.unit_vertices.shape[0]), tets=int(geometry.tets.shape[0]), grid_mb=grid_mb,
                box=[round(e, 3) for e in extent], cell=sum(extent) / 3 / resolution, surface_faces=int(faces.shape[0]),
                step_ms=bench["ms"]["step"], peak_mb=bench["peak_rss_mb" if "peak_rss_mb" in bench else "peak_allocated_mb"],
                device=bench["device"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a finished first-stage run folder")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--init-level", default="silhouette", help="the start level (geometry.init_level): silhouette "
                        "(the default, which searches 17 levels) or export (quicker, for large grids)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "resolution,fitted": a child's own run
    args = parser.parse_args(argv)
    if args.one:
        resolution, fitted = args.one.split(",")
        print(json.dumps(one(args.source, int(resolution), fitted == "1", args.steps, args.warmup, args.init_level)))
        return 0
    print("| grid | cells per side | vertices | tets | grid memory (MB) | box (world units) | cell | surface faces | "
          "step (ms) | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for resolution in args.resolutions:
        for fitted in (False, True):
            done = subprocess.run([sys.executable, __file__, args.source, "--one", f"{resolution},{int(fitted)}",
                                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--init-level",
                                   args.init_level], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {'fitted' if fitted else 'whole box'} | {resolution} | failed: "
                      f"{(done.stderr.strip().splitlines() or ['?'])[-1][:200]} |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {r['grid']} | {r['resolution']} | {r['vertices']:,} | {r['tets']:,} | {r['grid_mb']:.0f} | "
                  f"{' x '.join(f'{e:.2f}' for e in r['box'])} | {r['cell']:.4f} | {r['surface_faces']:,} | "
                  f"{r['step_ms']:.0f} | {r['peak_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    from perpneg3d.errors import reported_errors

    with reported_errors():
        sys.exit(main())
