"""One command, one report: does the CUDA path run as designed on this machine, and how fast?

    python scripts/gpu_check.py                      # on a CUDA machine (make gpu-check); under 8 minutes
    python scripts/gpu_check.py --device cpu --tiny  # the same checks on a CPU with a tiny random SD (CI)

Writes gpu_report.md and gpu_report.json to --out: environment (GPU, driver, torch/CUDA, nvcc,
nerfacc's kernel build and its time, tinycudann), the `pytest -m gpu` summary, parity checks (torch
hash grid CPU vs device; nerfacc marcher vs stratified sampler; tcnn vs torch hash grid), one
Perp-Neg SDS step with the full-size SD 2.1-base UNet and VAE at random weights (NaN count, fp16 vs
fp32 VAE latents), the host<->device synchronisations of one training step, and the step
benchmark (Perp-Neg K=2 vs plain, marcher vs sampler, each speed option vs none). A section that
fails is reported with its error; the exit code is 1 when any did.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from perpneg3d.errors import reported_errors
from perpneg3d.geometry.hash_grid import TorchHashGrid, import_tcnn
from perpneg3d.guidance.random_sd import RandomStableDiffusion
from perpneg3d.renderer import nerfacc_cuda
from perpneg3d.training.step_benchmark import PHASES, build_setup, measure

ROOT = Path(__file__).resolve().parents[1]
MARCHER_TOLERANCE = 0.03  # mean |rgb difference| between marcher and sampler renders of one field


def run_command(cmd: list[str], timeout: float = 60) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout + done.stderr).strip() or None


def environment(args) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               device=str(args.device))
    if args.device.type == "cuda":
        props = torch.cuda.get_device_properties(args.device)
        env.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        env["driver"] = run_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    home = nerfacc_cuda.cuda_home()
    nvcc = run_command([str(Path(home) / "bin" / "nvcc") if home else "nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    env["cuda_home"] = home
    env["toolkit_problems"] = nerfacc_cuda.toolkit_problems()
    if args.device.type == "cuda":
        built = nerfacc_cuda.build(timeout_s=args.build_timeout)
        env["nerfacc_kernels"] = dict(ok=built.ok, reason=built.reason, seconds=round(built.seconds, 1))
    else:
        env["nerfacc_kernels"] = dict(ok=False, reason="no CUDA device: not built", seconds=0.0)
    env["tinycudann"] = import_tcnn() is not None
    return env


def gpu_tests(args) -> dict:
    """`pytest -m gpu` in a child process (with this Python: no venv, no reinstall)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=args.pytest_timeout)
    lines = [ln for ln in done.stdout.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return dict(exit_code=done.returncode, summary=lines[-1] if lines else done.stdout.strip()[-300:])


def small_grid(seed: int = 0) -> TorchHashGrid:
    torch.manual_seed(seed)
    grid = TorchHashGrid(n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16, per_level_scale=1.5)
    grid.embeddings.data.uniform_(-1, 1)
    return grid


def parity(args) -> dict:
    out = {}
    x = torch.rand(20000, 3, generator=torch.Generator().manual_seed(0))
    grid = small_grid()
    with torch.no_grad():
        ref = grid(x)
        on_device = grid.to(args.device)(x.to(args.device)).cpu()
    out["hash_grid_cpu_vs_device_max_abs"] = float((ref - on_device).abs().max())
    out["hash_grid_note"] = "same device: trivially 0" if args.device.type == "cpu" else "float32 CPU vs CUDA"
    out["marcher_vs_sampler"] = marcher_vs_sampler(args)
    out["tcnn_vs_torch"] = tcnn_vs_torch(args, x)
    return out


def marcher_vs_sampler(args) -> dict:
    if not nerfacc_cuda.available():
        return dict(skipped=f"marcher unavailable: {nerfacc_cuda.probe().reason}")
    from perpneg3d.cameras import orbit_cameras
    from perpneg3d.geometry import ImplicitVolume
    from perpneg3d.renderer import DiffuseMaterial, SolidBackground, VolumeRenderer

    torch.manual_seed(0)
    geometry = ImplicitVolume(radius=1.0, implementation="torch").to(args.device).eval()
    cams = orbit_cameras(torch.tensor([0.0, 90.0, 180.0]), 15.0, 2.5, 40.0, 64).to(args.device)
    images = {}
    for name, kw in (("occgrid", dict(estimator="occgrid")),
                     ("stratified", dict(estimator="stratified", num_samples_per_ray=512))):
        renderer = VolumeRenderer(SolidBackground(), DiffuseMaterial(), radius=1.0, occ_threshold=1e-3, **kw).to(args.device)
        renderer.train()
        for step in range(4):  # fill the occupancy grid
            renderer.update(step * renderer.occ_update_every, geometry)
        renderer.eval()
        with torch.no_grad():
            images[name] = renderer(geometry, cams).rgb.float().cpu()
    diff = float((images["occgrid"] - images["stratified"]).abs().mean())
    return dict(mean_abs_rgb=diff, tolerance=MARCHER_TOLERANCE, ok=diff <= MARCHER_TOLERANCE)


def tcnn_vs_torch(args, x: torch.Tensor) -> dict:
    tcnn = import_tcnn() if args.device.type == "cuda" else None
    if tcnn is None:
        return dict(skipped="tinycudann not present" if args.device.type == "cuda" else "no CUDA device")
    grid = small_grid()
    config = dict(otype="HashGrid", n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=16,
                  per_level_scale=1.5)
    enc = tcnn.Encoding(3, config, dtype=torch.float32).to(args.device)
    if enc.params.numel() != grid.embeddings.numel():
        return dict(ok=False, error=f"parameter counts differ: tcnn {enc.params.numel()}, torch {grid.embeddings.numel()}")
    with torch.no_grad():
        enc.params.copy_(grid.embeddings.flatten().to(enc.params))
        diff = float((enc(x.to(args.device)).float().cpu() - grid(x)).abs().max())
    return dict(max_abs=diff, ok=diff < 1e-3)


def make_denoiser(args, **speed) -> RandomStableDiffusion:
    return RandomStableDiffusion("tiny" if args.tiny else "sd21", device=str(args.device), **speed)


def sds_step(args) -> dict:
    """One Perp-Neg SDS step (K=2) on a random 64x64 render: NaNs, gradient, fp16 vs fp32 latents."""
    from perpneg3d.guidance.sds import ScoreDistillation
    from perpneg3d.prompts import ViewPrompts

    sd = make_denoiser(args)
    rgb = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)).to(args.device).requires_grad_(True)
    prompts = ViewPrompts("a corgi standing").bind(sd)(torch.tensor([150.0], device=args.device),
                                              torch.tensor([15.0], device=args.device))
    out = ScoreDistillation(sd)(rgb, prompts, 0, torch.Generator(device=args.device).manual_seed(0))
    out.loss.backward()
    result = dict(model=sd.name, dtype=str(sd.dtype), unet_batch=int(prompts.text_emb.shape[0]),
                  sds_nonfinite=int(out.nonfinite), loss_finite=bool(torch.isfinite(out.loss)),
                  render_grad_finite=bool(torch.isfinite(rgb.grad).all()), render_grad_norm=float(rgb.grad.norm()))
    with torch.no_grad():  # the VAE posterior mean in the model's dtype vs a float32 copy
        x = torch.nn.functional.interpolate(rgb.detach().permute(0, 3, 1, 2), (sd.image_size, sd.image_size),
                                            mode="bilinear") * 2 - 1
        low = sd.vae.encode(x.to(sd.dtype)).latent_dist.mean.float()
        vae32 = type(sd.vae).from_config(sd.vae.config).to(args.device)
        vae32.load_state_dict({k: v.float() for k, v in sd.vae.state_dict().items()})
        ref = vae32.encode(x.float()).latent_dist.mean
    result["vae_latents_rel_error_vs_fp32"] = float((low - ref).norm() / ref.norm().clamp_min(1e-12))
    return result


def bench_overrides(args, perp_neg: bool = True, estimator: str = "auto") -> list[str]:
    res = 16 if args.tiny else 64
    return [f"prompts.perp_neg={str(perp_neg).lower()}", "trainer.progress=false", "cameras.batch_size=1",
            f"cameras.heights=[{res}]", f"cameras.widths=[{res}]", f"renderer.estimator={estimator}"]


def sync_count(args) -> dict:
    """Synchronisations of one training step, counted with torch.cuda.set_sync_debug_mode."""
    if args.device.type != "cuda":
        return dict(skipped="no CUDA device: host<->device synchronisations exist only on CUDA")
    setup = build_setup(bench_overrides(args), make_denoiser(args))
    measure(setup, steps=2, warmup=1)  # lazy initialisation, occupancy grid, caches
    run = setup.trainer.start(setup.geometry, setup.renderer, setup.guidance, setup.prompts, setup.cameras, seed=1)
    step = 5  # not an occupancy-grid update step
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            setup.trainer.train_step(step, run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return dict(syncs_per_step=len(syncs), target=2, ok=len(syncs) <= 2, locations=where, renderer=setup.renderer.backend)


def step_benchmark(args) -> dict:
    rows = []
    configs = [("Perp-Neg (K=2)", dict(perp_neg=True), {}), ("plain (K=0)", dict(perp_neg=False), {})]
    if nerfacc_cuda.available():
        configs.append(("Perp-Neg, stratified sampler", dict(estimator="stratified"), {}))
    configs += [("Perp-Neg + channels_last", {}, dict(channels_last=True)),
                ("Perp-Neg + cudnn.benchmark", {}, dict(cudnn_benchmark=True))]
    if not args.tiny or args.compile:
        configs.append(("Perp-Neg + torch.compile", {}, dict(compile=True)))
    for label, bench_kw, speed in configs:
        torch.backends.cudnn.benchmark = False
        setup = build_setup(bench_overrides(args, **bench_kw), make_denoiser(args, **speed))
        warmup = args.warmup + (3 if speed.get("compile") else 0)
        result = measure(setup, args.steps, warmup)
        rows.append(dict(label=label, **result, projection_10k_min=result["ms"]["step"] * 10000 / 60000))
        del setup
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["ms"]["step"]
    for row in rows:
        row["ratio_vs_first"] = row["ms"]["step"] / base
    return dict(rows=rows, steps=args.steps, warmup=args.warmup, resolution=16 if args.tiny else 64, batch=1)


def markdown(report: dict) -> str:
    lines = ["# perpneg3d GPU check", ""]
    env = report.get("environment", {})
    lines.append(f"Device: {env.get('gpu', env.get('device'))} | torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | "
                 f"driver {env.get('driver')} | nvcc: {env.get('nvcc')} | mode: {'tiny' if report['tiny'] else 'full size'}")
    lines.append("")
    for name, section in report.items():
        if name in ("step_benchmark", "tiny", "seconds") or not isinstance(section, dict):
            continue
        lines.append(f"## {name}")
        lines += [f"- {k}: {v}" for k, v in section.items()]
        lines.append("")
    bench = report.get("step_benchmark", {})
    if "rows" in bench:
        lines.append(f"## step benchmark (B={bench['batch']}, {bench['resolution']}x{bench['resolution']} renders, "
                     f"{bench['steps']} timed steps)")
        mem = "peak_allocated_mb" if "peak_allocated_mb" in bench["rows"][0] else "peak_rss_mb"
        lines.append("| configuration | " + " | ".join(f"{p} ms" for p in PHASES) + f" | it/s | {mem} | 10k steps (min) | ratio |")
        lines.append("|---" * (len(PHASES) + 5) + "|")
        for r in bench["rows"]:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['ms'].get(p, 0):.1f}" for p in PHASES)
                         + f" | {r['its']:.2f} | {r[mem]:.0f} | {r['projection_10k_min']:.1f} | {r['ratio_vs_first']:.2f} |")
    elif bench:
        lines += ["## step benchmark", f"- {bench}"]
    lines.append(f"\nTotal time: {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random SD and 16x16 renders (CPU, CI)")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_report.md and gpu_report.json")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (20; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; tiny: 1)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in --tiny mode")
    parser.add_argument("--skip-pytest", action="store_true", help="leave out the pytest -m gpu section")
    parser.add_argument("--build-timeout", type=float, default=300.0, help="seconds for nerfacc's kernel build")
    parser.add_argument("--pytest-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but this torch ({torch.__version__}) sees no CUDA device: run it with "
              "the Python that has a CUDA torch, or --device cpu --tiny")
        return 2
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    sections = [("environment", environment), ("pytest_gpu", gpu_tests), ("parity", parity), ("sds_step", sds_step),
                ("sync_count", sync_count), ("step_benchmark", step_benchmark)]
    if args.skip_pytest:
        sections = [s for s in sections if s[0] != "pytest_gpu"]
    report, failed, start = dict(tiny=args.tiny), [], time.perf_counter()
    for name, fn in sections:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            report[name] = fn(args)
        except Exception as err:  # noqa: BLE001  (report the failure, go on with the other sections)
            report[name] = dict(error=f"{type(err).__name__}: {err}".splitlines()[0][:300],
                                trace=traceback.format_exc(limit=3).splitlines()[-3:])
            failed.append(name)
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
