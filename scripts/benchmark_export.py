"""Mesh export time and peak memory at several grid resolutions, on a trained run or an analytic field.

    python scripts/benchmark_export.py --run outputs/toy/<timestamp> --resolutions 256 512
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch

from perpneg3d.export import MeshExporter
from perpneg3d.training.run_loading import load_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder written by train.py")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--formats", nargs="+", default=["glb"])
    args = parser.parse_args(argv)
    import trimesh  # noqa: F401  (imported before timing: about 1 s once per process, not part of an export)

    _, geometry, _, _, step, _ = load_run(args.run)
    print(f"run {args.run} (step {step}), {torch.get_num_threads()} threads, geometry {geometry.encoding.implementation}")
    print("| resolution | seconds | faces | peak RSS MB (process so far) |\n|---|---|---|---|")
    for res in args.resolutions:
        with tempfile.TemporaryDirectory() as out:
            exporter = MeshExporter(formats=args.formats, resolution=res)
            t0 = time.perf_counter()
            paths = exporter(geometry, out)
            seconds = time.perf_counter() - t0
            faces = len(trimesh.load(paths[0], force="mesh").faces)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {res}^3 | {seconds:.2f} | {faces} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
