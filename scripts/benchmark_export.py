"""Mesh export time and peak memory per grid resolution and texture mode, on a trained run.

    python scripts/benchmark_export.py --run outputs/toy/<timestamp> --resolutions 256 512 --textures vertex uv

Each case runs in a fresh child process, so its peak resident memory is its own (not the largest of
the cases before it); the table also shows the estimate MeshExporter checks before it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from perpneg3d.errors import reported_errors


def one_case(run: str, resolution: int, texture: str, formats: list[str]) -> dict:
    """Child process: export once, report seconds, faces and peak RSS."""
    import torch
    import trimesh

    from perpneg3d.export import MeshExporter
    from perpneg3d.training.run_loading import load_run

    _, geometry, _, _, step, _ = load_run(run)
    with tempfile.TemporaryDirectory() as out:
        exporter = MeshExporter(formats=formats, resolution=resolution, texture=texture)
        t0 = time.perf_counter()
        paths = exporter(geometry, out)
        seconds = time.perf_counter() - t0
        faces = len(trimesh.load(paths[0], force="mesh").faces)
    return dict(step=step, seconds=seconds, faces=faces, threads=torch.get_num_threads(),
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder written by train.py")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--textures", nargs="+", default=["vertex", "uv"], choices=["vertex", "uv"])
    parser.add_argument("--formats", nargs="+", default=None, help="default: glb (vertex), obj (uv)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        formats = args.formats or (["obj"] if args.child[1] == "uv" else ["glb"])
        print(json.dumps(one_case(args.run, int(args.child[0]), args.child[1], formats)))
        return 0
    from perpneg3d.export.mesh import estimate_peak_bytes

    print(f"run {args.run}; each case in its own process")
    print("| resolution | texture | seconds | faces | peak RSS MB | estimate MB |\n|---|---|---|---|---|---|")
    for texture in args.textures:
        for res in args.resolutions:
            cmd = [sys.executable, __file__, "--run", args.run, "--child", str(res), texture]
            if args.formats:
                cmd += ["--formats", *args.formats]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if done.returncode != 0:
                print(f"| {res}^3 | {texture} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            est = estimate_peak_bytes(res, texture) / 2 ** 20
            print(f"| {res}^3 | {texture} | {r['seconds']:.1f} | {r['faces']} | {r['peak_mb']:.0f} | {est:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
