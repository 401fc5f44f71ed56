"""One command, one report: does the CUDA path run as designed on this machine, and how fast?

    python scripts/gpu_check.py --out DIR            # on a CUDA machine (make gpu-check); within --budget-s
    python scripts/gpu_check.py --device cpu --tiny  # the same checks on a CPU with a tiny random SD (CI)

Sections, most valuable first, each written to DIR/gpu_report.json and .md as soon as it ends (a run
killed at a time limit still leaves what it finished): environment (GPU, driver, torch/CUDA, nvcc,
nerfacc's kernel build and its time, tinycudann; the node's `pip freeze` to DIR/node-pip-freeze.txt),
one Perp-Neg SDS step with the full-size SD 2.1-base at random weights (NaN count, fp16 vs fp32 VAE
latents), parity (torch hash grid CPU vs device; nerfacc marcher vs stratified sampler; tcnn vs torch),
the host<->device synchronisations of one training step (perpneg3d's own, nerfacc's sampler's and the
skip decision counted apart), the step benchmark, the refine stage (torch rasterizer vs nvdiffrast; refine
steps at 512 px), one MVDream SDS step (a 4-view group at 256 px, full-size multi-view UNet at random weights),
`pytest -m gpu`, and torch.compile last
(--skip-compile). Sections that would start after --budget-s seconds are skipped with that reason.
Exit code 1 when any check fails (each named in the report's failed_checks), 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from perpneg3d.errors import reported_errors
from perpneg3d.geometry.hash_grid import TorchHashGrid, import_tcnn
from perpneg3d.guidance.random_sd import RandomStableDiffusion
from perpneg3d.renderer import nerfacc_cuda
from perpneg3d.training.step_benchmark import PHASES, build_setup, measure
from perpneg3d.training.sync_attribution import classify_stack, known_syncs, own_site, skip_decision_line, sync_stacks

ROOT = Path(__file__).resolve().parents[1]
MARCHER_TOLERANCE = 0.03  # mean |rgb difference| between marcher and sampler renders of one field
GRACE_S = 15.0  # a section past the budget is stopped this much later (its child processes end at the budget)
SYNC_STEPS = (5, 6, 7)  # the steps whose synchronisations sync_count attributes: no occupancy-grid update among them


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
        built = nerfacc_cuda.build(timeout_s=max(30.0, min(args.build_timeout, args.remaining())))
        env["nerfacc_kernels"] = dict(ok=built.ok, reason=built.reason, seconds=round(built.seconds, 1),
                                      **({"log_tail": built.log_tail} if not built.ok else {}))
    else:
        env["nerfacc_kernels"] = dict(ok=None, reason="no CUDA device: not built", seconds=0.0)
    env["tinycudann"] = import_tcnn() is not None
    freeze = run_command([sys.executable, "-m", "pip", "list", "--format=freeze"], timeout=120)
    if freeze:  # the node's exact packages: they replace gpu/node-packages.txt (docs/gpu.md)
        (Path(args.out) / "node-pip-freeze.txt").write_text(freeze + "\n")
        env["pip_freeze"] = f"{len(freeze.splitlines())} packages in node-pip-freeze.txt"
    return env


def gpu_tests(args) -> dict:
    """`pytest -m gpu` in a child process (with this Python: no venv, no reinstall), within the budget. Cut
    short by the budget it is incomplete, not failed; a failed run keeps its output's last lines."""
    timeout = max(10.0, min(args.pytest_timeout, args.remaining()))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        output = (stopped.stdout or b"").decode(errors="replace") if isinstance(stopped.stdout, bytes) else stopped.stdout
        return dict(exit_code=None, ok=None, incomplete=f"budget: stopped after {timeout:.0f} s",
                    log_tail=nerfacc_cuda.tail(output or ""))
    lines = [ln for ln in done.stdout.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    ok = done.returncode in (0, 5)  # 5: no test selected (none marked gpu ran)
    return dict(exit_code=done.returncode, ok=ok, summary=lines[-1] if lines else done.stdout.strip()[-300:],
                **({} if ok else {"log_tail": nerfacc_cuda.tail(done.stdout + done.stderr)}))


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


def mvdream_step(args) -> dict:
    """One Perp-Neg SDS step (K=2) of MVDream at random weights (full size unless --tiny) on one group of 4 views at
    its native size (256 px, latents 32 x 32; MVDream is trained there): one UNet call of (2 + K) x 4 rows, the
    render's gradient; ms of the step after one untimed step, and peak memory."""
    from perpneg3d.cameras import orbit_cameras
    from perpneg3d.guidance.random_sd import RandomMVDream
    from perpneg3d.guidance.sds import ScoreDistillation
    from perpneg3d.prompts import ViewPrompts
    from perpneg3d.training.step_benchmark import peak_memory_mb, settle

    den = RandomMVDream("tiny" if args.tiny else "sd21", device=str(args.device))
    size = den.image_size
    cams = orbit_cameras(torch.tensor([30.0, 120.0, 210.0, 300.0]), 15.0, 2.0, 40.0, size).to(args.device)
    prompts = ViewPrompts("a corgi standing").bind(den)(cams.azimuth_deg, cams.elevation_deg)
    sds, calls = ScoreDistillation(den, guidance_scale=50.0), []
    eps_views = den.eps_views
    den.eps_views = lambda x, *rest: calls.append(int(x.shape[0])) or eps_views(x, *rest)

    def step(seed):
        rgb = torch.rand(4, size, size, 3, generator=torch.Generator().manual_seed(seed)).to(args.device)
        rgb.requires_grad_(True)
        out = sds(rgb, prompts, 0, torch.Generator(device=args.device).manual_seed(seed), cams.c2w)
        out.loss.backward()
        return out, rgb

    step(0)
    settle(args.device)
    calls.clear()
    synchronize(args.device)
    t0 = time.perf_counter()
    out, rgb = step(1)
    synchronize(args.device)
    ms = 1000 * (time.perf_counter() - t0)
    return dict(model=den.name, dtype=str(den.dtype), image_size=size, views=4, unet_calls=len(calls),
                unet_rows=calls[0], step_ms=round(ms, 1), sds_nonfinite=int(out.nonfinite),
                loss_finite=bool(torch.isfinite(out.loss)), render_grad_norm=float(rgb.grad.norm()),
                **{k: round(v) for k, v in peak_memory_mb(args.device).items()})


def refine_check(args) -> dict:
    """The refine stage: the torch rasterizer against nvdiffrast's CUDA context (when installed) on one mesh at
    the refine's 512 px (64 with --tiny), forward and backward; then refine steps with the full-size SD 2.1-base
    at random weights at 512 px: ms per step and peak memory against the targets (50 ms, 12 GB)."""
    import trimesh

    from perpneg3d.cameras import orbit_cameras
    from perpneg3d.renderer.mesh_renderer import projection
    from perpneg3d.renderer.nvdiffrast_rasterizer import NvdiffrastRasterizer, import_nvdiffrast
    from perpneg3d.renderer.torch_rasterizer import TorchRasterizer
    from perpneg3d.training.step_benchmark import refine_config

    res, dev = (64 if args.tiny else 512), args.device
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32, device=dev)
    faces = torch.tensor(sphere.faces, dtype=torch.long, device=dev)
    cams = orbit_cameras(torch.tensor([0.0, 120.0]), torch.tensor([15.0, 15.0]), 2.0, 40.0, res).to(dev)
    clip = torch.einsum("bij,vj->bvi", projection(cams, 0.05, 100.0), torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1))
    result, rasts = dict(faces=int(len(faces)), resolution=res), {}
    backends = {"torch": TorchRasterizer()}
    dr = import_nvdiffrast() if dev.type == "cuda" else None
    if dr is not None:
        backends["nvdiffrast"] = NvdiffrastRasterizer(dr, dev)
    else:
        result["nvdiffrast"] = "not installed or not on CUDA (pip install -e .[nvdiffrast])"
    for name, rasterizer in backends.items():
        def once():
            c = clip.detach().requires_grad_(True)
            rast = rasterizer.rasterize(c, faces, (res, res))
            image = rasterizer.antialias(rasterizer.interpolate(vertices.abs(), rast, faces), rast, c, faces)
            image.sum().backward()
            return rast.detach()
        reps = 1 if args.tiny else 5  # --tiny (the CPU rehearsal, the tests) checks that it runs: one pass, no warm-up
        if not args.tiny:
            once()
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            rasts[name] = once()
        synchronize(dev)
        result[f"{name}_ms"] = round(1000 * (time.perf_counter() - t0) / reps, 2)
    if len(rasts) == 2:
        a, b = rasts["torch"], rasts["nvdiffrast"]
        same = (a[..., 3] == b[..., 3]) & (a[..., 3] > 0)
        result.update(coverage_agreement=float(((a[..., 3] > 0) == (b[..., 3] > 0)).float().mean()),
                      face_id_agreement=float(same.sum() / (a[..., 3] > 0).sum().clamp_min(1)),
                      barycentric_max_diff=float((a[..., :2] - b[..., :2]).abs()[same].max()) if same.any() else None)
        result["parity_ok"] = result["coverage_agreement"] >= 0.99 and (result["barycentric_max_diff"] or 0) < 1e-3
    overrides = ["stage=refine", f"cameras.heights=[{res}]", f"cameras.widths=[{res}]", "cameras.batch_size=1",
                 "trainer.progress=false", "prompts.perp_neg=true"] + (["geometry.grid_resolution=32"] if args.tiny else [])
    bench = measure(build_setup([], make_denoiser(args), cfg=refine_config(overrides)), args.steps, args.warmup)
    memory = bench.get("peak_allocated_mb", bench.get("peak_rss_mb"))
    result.update(refine_step_ms=round(bench["ms"]["step"], 1), refine_phases_ms={k: round(v, 1) for k, v in bench["ms"].items()},
                  refine_peak_mb=round(memory), refine_renderer=bench["renderer"],
                  targets_met=bench["ms"]["step"] <= 50 and memory <= 12 * 1024)
    return result


GAUSSIAN_TOLERANCE = dict(mean_abs_rgb=5e-3, grad_cosine=0.99)  # gsplat vs the torch path (their documented differences)


def gaussians_check(args) -> dict:
    """3D Gaussians: gsplat's CUDA rasterization against the torch path on one cloud (2000 Gaussians, opacities
    below 0.9 so that neither alpha cap applies, 4 cameras at 256 px; 64 px with --tiny): mean and max |rgb|
    difference, and the cosine between the two paths' gradients of the means, scales and colours for one fixed
    random weighting of the image; ms of a forward + backward of each. Then experiment=gs steps (Stable
    Diffusion 2.1-base at random weights, full size unless --tiny) at 512 px renders (16 with --tiny): ms per
    step, steps/s, peak memory and the path used."""
    from perpneg3d.cameras import orbit_cameras
    from perpneg3d.contracts import Gaussians
    from perpneg3d.geometry.gaussians import FixedGaussians
    from perpneg3d.renderer import DiffuseMaterial, SolidBackground, gsplat_rasterizer
    from perpneg3d.renderer.gaussian_renderer import GaussianRenderer

    dev, res, result = args.device, (64 if args.tiny else 256), {}
    found = gsplat_rasterizer.probe()
    result["gsplat_kernels"] = dict(ok=found.ok, reason=found.reason, seconds=round(found.seconds, 1))
    g0 = torch.Generator().manual_seed(0)
    n = 2000
    leaves = [(torch.rand(n, 3, generator=g0) - 0.5) * 1.2, 0.01 + 0.04 * torch.rand(n, 3, generator=g0),
              torch.nn.functional.normalize(torch.randn(n, 4, generator=g0), dim=-1), 0.1 + 0.8 * torch.rand(n, generator=g0),
              torch.rand(n, 3, generator=g0)]
    weights = torch.rand(4, res, res, 3, generator=g0).to(dev)
    cams = orbit_cameras(torch.tensor([0.0, 90.0, 180.0, 270.0]), 15.0, 2.0, 40.0, res).to(dev)

    paths = {"torch": "torch"} | ({"gsplat": "gsplat"} if found.ok and dev.type == "cuda" else {})
    if len(paths) == 1:
        result["gsplat"] = "not compared: " + ("no CUDA device" if dev.type != "cuda" else found.reason)
    images, grads = {}, {}
    for name, choice in paths.items():
        renderer = GaussianRenderer(SolidBackground((0.0, 0.0, 0.0)), DiffuseMaterial(), rasterizer=choice).to(dev)

        def once():
            tensors = [t.to(dev).requires_grad_(i in (0, 1, 4)) for i, t in enumerate(leaves)]
            out = renderer(FixedGaussians(Gaussians(*tensors)), cams)
            (out.rgb * weights).sum().backward()
            return out.rgb.detach(), [tensors[i].grad for i in (0, 1, 4)]
        reps = 1 if args.tiny else 5
        if not args.tiny:
            once()
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            images[name], grads[name] = once()
        synchronize(dev)
        result[f"{name}_forward_backward_ms"] = round(1000 * (time.perf_counter() - t0) / reps, 2)
    result.update(gaussians=n, cameras=4, resolution=res)
    if len(images) == 2:
        diff = (images["torch"] - images["gsplat"]).abs()
        cosines = {key: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                   for key, a, b in zip(("means", "scales", "colors"), grads["torch"], grads["gsplat"])}
        result.update(mean_abs_rgb=float(diff.mean()), max_abs_rgb=float(diff.max()), grad_cosine=cosines,
                      tolerance=GAUSSIAN_TOLERANCE,
                      parity_ok=float(diff.mean()) <= GAUSSIAN_TOLERANCE["mean_abs_rgb"]
                      and min(cosines.values()) >= GAUSSIAN_TOLERANCE["grad_cosine"])
    size = 16 if args.tiny else 512
    overrides = ["experiment=gs", "trainer.progress=false", f"cameras.heights=[{size}]", f"cameras.widths=[{size}]",
                 "cameras.resolution_milestones=[]"] + (["geometry.num_points=500"] if args.tiny else [])
    bench = measure(build_setup(overrides, make_denoiser(args)), args.steps, args.warmup)
    memory = bench.get("peak_allocated_mb", bench.get("peak_rss_mb"))
    result.update(gs_step_ms=round(bench["ms"]["step"], 1), gs_steps_per_s=round(1000 / bench["ms"]["step"], 2),
                  gs_resolution=size, gs_peak_mb=round(memory), gs_renderer=bench["renderer"],
                  gs_phases_ms={k: round(v, 1) for k, v in bench["ms"].items()})
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_overrides(args, perp_neg: bool = True, estimator: str = "auto") -> list[str]:
    res = 16 if args.tiny else 64
    return [f"prompts.perp_neg={str(perp_neg).lower()}", "trainer.progress=false", "cameras.batch_size=1",
            f"cameras.heights=[{res}]", f"cameras.widths=[{res}]", f"renderer.estimator={estimator}"]


def sync_count(args) -> dict:
    """Synchronisations of training steps SYNC_STEPS (lambda_orient > 0, so the normals pass runs), attributed by
    the Python stack at each one: the target is no sync of perpneg3d's own outside logging steps, the skip
    decision and the known ones (nerfacc's and autograd's backward counted apart)."""
    if args.device.type != "cuda":
        return dict(skipped="no CUDA device: host<->device synchronisations exist only on CUDA")
    setup = build_setup(bench_overrides(args) + ["trainer.lambda_orient=10.0"], make_denoiser(args))
    measure(setup, steps=2, warmup=1, phases=False)  # lazy initialisation, occupancy grid, caches
    run = setup.trainer.start(setup.geometry, setup.renderer, setup.guidance, setup.prompts, setup.cameras, seed=1)
    torch.cuda.synchronize()
    stacks = sync_stacks(lambda: [setup.trainer.train_step(step, run) for step in SYNC_STEPS])
    known = known_syncs()
    kinds = [classify_stack(stack, skip_decision_line(), known) for stack in stacks]
    per_step = {kind: kinds.count(kind) / len(SYNC_STEPS) for kind in ("own", "nerfacc", "skip_decision", "known",
                                                                       "backward")}
    own = sorted({own_site(stack) for stack, kind in zip(stacks, kinds) if kind == "own"})
    return dict(steps=list(SYNC_STEPS), syncs_per_step=len(stacks) / len(SYNC_STEPS), own=per_step["own"],
                nerfacc_sampler=per_step["nerfacc"], skip_decision=per_step["skip_decision"],
                known=per_step["known"], known_reasons=sorted(set(known.values())), autograd_backward=per_step["backward"],
                target_own=0, ok=per_step["own"] == 0, locations=own, renderer=setup.renderer.backend)


def step_benchmark(args) -> dict:
    configs = [("Perp-Neg (K=2)", dict(perp_neg=True), {}), ("plain (K=0)", dict(perp_neg=False), {})]
    if nerfacc_cuda.available():
        configs.append(("Perp-Neg, stratified sampler", dict(estimator="stratified"), {}))
    configs += [("Perp-Neg + channels_last", {}, dict(channels_last=True)),
                ("Perp-Neg + cudnn.benchmark", {}, dict(cudnn_benchmark=True))]
    return benchmark_rows(args, configs)


def compile_benchmark(args) -> dict:
    """torch.compile of the UNet against the plain step: last, since compiling takes minutes."""
    return benchmark_rows(args, [("Perp-Neg (K=2)", dict(perp_neg=True), {}),
                                 ("Perp-Neg + torch.compile", {}, dict(compile=True))])


def benchmark_rows(args, configs) -> dict:
    rows = []
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


def benchmark_table(title: str, bench: dict) -> list[str]:
    lines = [f"## {title} (B={bench['batch']}, {bench['resolution']}x{bench['resolution']} renders, "
             f"{bench['steps']} timed steps)"]
    mem = "peak_allocated_mb" if "peak_allocated_mb" in bench["rows"][0] else "peak_rss_mb"
    lines.append("| configuration | " + " | ".join(f"{p} ms" for p in PHASES) + f" | it/s | {mem} | 10k steps (min) | ratio |")
    lines.append("|---" * (len(PHASES) + 5) + "|")
    for r in bench["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['ms'].get(p, 0):.1f}" for p in PHASES)
                     + f" | {r['its']:.2f} | {r[mem]:.0f} | {r['projection_10k_min']:.1f} | {r['ratio_vs_first']:.2f} |")
    return lines + [""]


def markdown(report: dict) -> str:
    lines = ["# perpneg3d GPU check", ""]
    env = report.get("environment", {})
    lines.append(f"Device: {env.get('gpu', env.get('device'))} | torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) | "
                 f"driver {env.get('driver')} | nvcc: {env.get('nvcc')} | mode: {'tiny' if report['tiny'] else 'full size'}")
    failed = report.get("failed_checks", [])
    lines += ["", f"**Failed checks: {len(failed)}**" if failed else "**All checks passed.**"]
    lines += [f"- {f}" for f in failed] + [""]
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        if "rows" in section:
            lines += benchmark_table(name.replace("_", " "), section)
            continue
        lines.append(f"## {name}")
        lines += [f"- {k}: {v}" for k, v in section.items()]
        lines.append("")
    lines.append(f"Total time: {report.get('seconds', 0):.0f} s (budget {report.get('budget_s', 0):.0f} s)")
    return "\n".join(lines) + "\n"


SECTIONS = (("environment", environment), ("sds_step", sds_step), ("parity", parity), ("sync_count", sync_count),
            ("step_benchmark", step_benchmark), ("refine", refine_check), ("mvdream_step", mvdream_step),
            ("gaussians", gaussians_check),
            ("pytest_gpu", gpu_tests),
            ("compile", compile_benchmark))


def failed_checks(report: dict) -> list[str]:
    """Every check of a report that failed, one line each (a section that raised is one of them)."""
    failed = [f"{name}: {section['error']}" for name, section in report.items()
              if isinstance(section, dict) and "error" in section]
    env = report.get("environment", {})
    if env.get("nerfacc_kernels", {}).get("ok") is False:
        failed.append(f"environment.nerfacc_kernels: {env['nerfacc_kernels']['reason']}")
    sds = report.get("sds_step", {})
    if sds and "error" not in sds and (sds.get("sds_nonfinite") or not sds.get("loss_finite") or
                                       not sds.get("render_grad_finite")):
        failed.append(f"sds_step: non-finite values (sds_nonfinite={sds.get('sds_nonfinite')}, "
                      f"loss_finite={sds.get('loss_finite')}, render_grad_finite={sds.get('render_grad_finite')})")
    mv = report.get("mvdream_step", {})
    if mv and "error" not in mv and (mv.get("sds_nonfinite") or not mv.get("loss_finite")):
        failed.append(f"mvdream_step: non-finite values (sds_nonfinite={mv.get('sds_nonfinite')}, "
                      f"loss_finite={mv.get('loss_finite')})")
    for key, check in report.get("parity", {}).items():
        if isinstance(check, dict) and check.get("ok") is False:
            failed.append(f"parity.{key}: {check}")
    sync = report.get("sync_count", {})
    if sync.get("ok") is False:
        failed.append(f"sync_count: {sync['own']} synchronisations of perpneg3d's own per step (target 0): "
                      f"{sync.get('locations')}")
    refine = report.get("refine", {})
    if refine.get("parity_ok") is False:
        failed.append(f"refine: torch rasterizer vs nvdiffrast differ (coverage {refine['coverage_agreement']:.4f}, "
                      f"barycentrics {refine['barycentric_max_diff']})")
    gaussians = report.get("gaussians", {})
    if gaussians.get("parity_ok") is False:
        failed.append(f"gaussians: gsplat vs the torch path differ (mean |rgb| {gaussians['mean_abs_rgb']:.2e}, "
                      f"gradient cosines {gaussians['grad_cosine']})")
    tests = report.get("pytest_gpu", {})
    if tests.get("ok") is False:
        failed.append(f"pytest_gpu: {tests.get('summary')}")
    return failed


def write_report(report: dict, out: Path) -> None:
    """gpu_report.json and .md, replaced atomically (a kill mid-write leaves the previous pair)."""
    from perpneg3d.run_dir import write_atomic

    report = dict(report, failed_checks=failed_checks(report))
    write_atomic(out / "gpu_report.json", json.dumps(report, indent=2, default=str))
    write_atomic(out / "gpu_report.md", markdown(report))


class BudgetSpent(Exception):
    """Raised in a section still running when its time cap (time_cap) ends."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise BudgetSpent in the code inside after `seconds` (SIGALRM; in the main thread of a POSIX system, else
    no cap). A section's child processes (the nerfacc build, pytest) have their own timeouts, which end first."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise BudgetSpent()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(sections, args, out: Path) -> dict:
    """Run each section in order, rewriting the report after each; sections that would start after
    args.budget_s are skipped with that reason, and one still running GRACE_S after it is stopped (incomplete)."""
    report = dict(tiny=args.tiny, budget_s=args.budget_s, seconds=0.0)
    start = time.perf_counter()
    args.remaining = lambda: args.budget_s - (time.perf_counter() - start)
    for name, fn in sections:
        if args.remaining() <= 0:
            report[name] = dict(skipped=f"budget of {args.budget_s:.0f} s spent before this section started")
            write_report(report, out)
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        cudnn_benchmark = torch.backends.cudnn.benchmark  # a section that turns it on leaves it as it found it
        try:
            with time_cap(args.remaining() + GRACE_S):
                report[name] = fn(args)
        except BudgetSpent:
            report[name] = dict(incomplete=f"budget: stopped after {time.perf_counter() - t0:.0f} s, when the budget of "
                                           f"{args.budget_s:.0f} s was spent")
        except Exception as err:  # noqa: BLE001  (report the failure, go on with the other sections)
            report[name] = dict(error=f"{type(err).__name__}: {err}".splitlines()[0][:300],
                                trace=traceback.format_exc(limit=3).splitlines()[-3:])
        finally:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        report[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        report["seconds"] = time.perf_counter() - start
        write_report(report, out)
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random SD and 16x16 renders (CPU, CI)")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_report.md and gpu_report.json")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections that would start later than this are skipped (default 420 s: a 10-minute call "
                             "keeps room for the install and the nerfacc build)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (20; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; tiny: 1)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in --tiny mode")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile section")
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
    skip = {"pytest_gpu"} if args.skip_pytest else set()
    if args.skip_compile or (args.tiny and not args.compile):
        skip.add("compile")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_sections([s for s in SECTIONS if s[0] not in skip], args, out)
    failed = failed_checks(report)
    print(markdown(dict(report, failed_checks=failed)))
    print(f"wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'}" + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
