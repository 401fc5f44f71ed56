"""Time per training step, split into render / prompts / encode / denoiser / backward / optimizer.

    python scripts/benchmark_step.py                         # the toy preset on this machine
    python scripts/benchmark_step.py --prior sd21-random     # full-size SD 2.1-base UNet + VAE, random weights
    python scripts/benchmark_step.py --prior sd21-random --resolution 64 --batch 1 --steps 20
    python scripts/benchmark_step.py --prior if-random       # full-size DeepFloyd IF-I-XL UNet, random weights
    python scripts/benchmark_step.py --stage refine_toy      # the toy preset's refine stage (DMTet, rasterized)

Each configuration runs with Perp-Neg (2 negatives: 4 prompts per UNet call) and with plain
view prompts (2 prompts). Reports ms per phase, it/s and peak memory (CUDA: allocator peak; CPU:
process peak RSS). Speed does not depend on the weights, so random ones measure real cost.
"""
from __future__ import annotations

import argparse
import sys

import torch

from perpneg3d.errors import reported_errors
from perpneg3d.guidance.deepfloyd_if import RandomDeepFloydIF
from perpneg3d.guidance.random_sd import RandomStableDiffusion
from perpneg3d.training.step_benchmark import PHASES, build_setup, measure, refine_config


def random_prior(args):
    """The full-size random prior both runs share (built once: IF-I-XL takes 17 GB and a minute in fp32), or None."""
    if args.prior == "sd21-random":
        return RandomStableDiffusion("sd21", args.device, torch_dtype=args.dtype)
    if args.prior == "if-random":
        return RandomDeepFloydIF(args.device, torch_dtype=args.dtype)
    return None


def run(args, perp_neg: bool, denoiser) -> dict:
    overrides = [f"prompts.perp_neg={str(perp_neg).lower()}", "trainer.progress=false"]
    if args.prior == "toy":
        overrides.append("experiment=toy")
    overrides += [f"cameras.batch_size={args.batch}", f"cameras.heights=[{args.resolution}]", f"cameras.widths=[{args.resolution}]"]
    overrides += args.overrides
    if args.stage:  # the refine stage: a DMTet sphere (refine_config) with the stage's settings
        cfg = refine_config(overrides + [f"stage={args.stage}"])
        result = measure(build_setup([], denoiser, cfg=cfg), args.steps, args.warmup)
    else:
        result = measure(build_setup(overrides, denoiser), args.steps, args.warmup)
    result["peak_mb"] = result.get("peak_allocated_mb", result.get("peak_rss_mb"))
    return dict(result, perp_neg=perp_neg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", choices=("toy", "sd21-random", "if-random", "config"), default="toy",
                        help="toy preset, full-size random SD 2.1-base or IF-I-XL, or the train.yaml default "
                             "(pass overrides)")
    parser.add_argument("--resolution", type=int, default=None, help="render size (toy: 32, SD: 64)")
    parser.add_argument("--batch", type=int, default=None, help="cameras per step (toy: 2, SD: 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="random priors: auto (fp16 on CUDA, fp32 on CPU), float32, "
                                                        "float16, bfloat16")
    parser.add_argument("--stage", default=None, help="a refine stage (refine, refine_toy, refine_if): time its step "
                                                      "on a DMTet sphere instead of the first stage's")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. geometry.implementation=torch")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (32 if args.prior == "toy" else 64)
    args.batch = args.batch or (2 if args.prior == "toy" else 1)
    denoiser = random_prior(args)
    results = [run(args, True, denoiser), run(args, False, denoiser)]
    phases = list(PHASES)
    print(f"prior {args.prior}, B={args.batch}, {args.resolution}x{args.resolution} renders, {args.steps} timed steps "
          f"on {results[0]['device']} ({torch.get_num_threads()} threads; geometry {results[0]['geometry']}, "
          f"renderer {results[0]['renderer']})")
    print("| prompts | " + " | ".join(f"{p} ms" for p in phases) + " | it/s | peak MB |")
    print("|---" * (len(phases) + 3) + "|")
    for r in results:
        label = "Perp-Neg (K=2)" if r["perp_neg"] else "plain (K=0)"
        print(f"| {label} | " + " | ".join(f"{r['ms'].get(p, 0):.1f}" for p in phases) + f" | {r['its']:.2f} | {r['peak_mb']:.0f} |")
    print(f"Perp-Neg / plain step time: {results[0]['ms']['step'] / results[1]['ms']['step']:.2f}x")
    return 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
