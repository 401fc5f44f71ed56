"""scripts/gpu_check.py, the one GPU command's report, in its CPU mode and section by section: the report
written after each section, the budget (skipped, stopped and incomplete sections), failed checks by name,
synchronisations attributed by their stack, and the step timing."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_TOY, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_tiny_mode_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--skip-pytest",
                           "--steps", "1", "--warmup", "0", "--out", str(tmp_path)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True,
                          timeout=900)  # a guard against a hang: under load the tiny check takes minutes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    sds = report["sds_step"]
    assert sds["unet_batch"] == 4  # [uncond | pos | neg_front | neg_side] for one camera, in one call
    assert sds["sds_nonfinite"] == 0 and sds["loss_finite"] and sds["render_grad_norm"] > 0
    assert sds["vae_latents_rel_error_vs_fp32"] < 1e-5  # float32 on a CPU: the same computation
    rows = {r["label"]: r for r in report["step_benchmark"]["rows"]}
    assert set(rows) == {"Perp-Neg (K=2)", "plain (K=0)", "Perp-Neg + channels_last", "Perp-Neg + cudnn.benchmark"}
    assert all(r["ms"]["step"] > 0 and r["skipped_steps"] == 0 for r in rows.values())
    assert report["parity"]["hash_grid_cpu_vs_device_max_abs"] == 0.0
    assert "no CUDA device" in report["sync_count"]["skipped"]
    refine = report["refine"]  # torch rasterizer timed; nvdiffrast said absent on a CPU; refine steps ran
    assert refine["faces"] == 5120 and refine["torch_ms"] > 0 and "not installed or not on CUDA" in refine["nvdiffrast"]
    assert refine["refine_step_ms"] > 0 and refine["refine_renderer"] == "rasterizer auto" and "parity_ok" not in refine
    mv = report["mvdream_step"]  # one group of 4 views: [uncond | pos | neg_1 | neg_2] x 4 in one UNet call
    assert (mv["unet_calls"], mv["unet_rows"], mv["image_size"]) == (1, 16, 32)
    assert mv["sds_nonfinite"] == 0 and mv["loss_finite"] and mv["render_grad_norm"] > 0 and mv["step_ms"] > 0
    gs = report["gaussians"]  # the torch path timed, gsplat said absent on a CPU; experiment=gs steps ran
    assert gs["gsplat"] == "not compared: no CUDA device" and gs["gsplat_kernels"]["ok"] is False
    assert gs["torch_forward_backward_ms"] > 0 and "parity_ok" not in gs
    assert gs["gs_step_ms"] > 0 and gs["gs_resolution"] == 16 and gs["gs_renderer"] == "splatting (torch)"
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| Perp-Neg (K=2) |" in md and "## sds_step" in md and "## mvdream_step" in md and "## gaussians" in md


def gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_args(budget_s=60.0):
    import argparse

    return argparse.Namespace(tiny=True, budget_s=budget_s, device=torch.device("cpu"))


def test_gpu_check_writes_its_report_after_each_section(tmp_path):
    """A section that raises is recorded and the next ones still run; each section sees on disk the
    report of the ones before it (a run killed mid-section keeps them)."""
    gc = gpu_check_module()
    seen = {}

    def boom(args):
        raise RuntimeError("no kernel image is available")

    def third(args):
        seen.update(json.loads((tmp_path / "gpu_report.json").read_text()))
        return dict(ok=True)

    report = gc.run_sections([("environment", lambda args: dict(torch="x")), ("sds_step", boom), ("parity", third)],
                             check_args(), tmp_path)
    assert seen["environment"]["torch"] == "x" and seen["sds_step"]["error"] == "RuntimeError: no kernel image is available"
    assert seen["failed_checks"] == ["sds_step: RuntimeError: no kernel image is available"]
    assert report["parity"]["ok"] is True
    assert "**Failed checks: 1**" in (tmp_path / "gpu_report.md").read_text()


def test_gpu_check_budget_skips_the_sections_that_would_start_late(tmp_path):
    gc = gpu_check_module()
    ran = []

    def slow(args):
        ran.append("slow")
        time.sleep(0.3)
        return {}

    report = gc.run_sections([("environment", slow), ("step_benchmark", lambda a: ran.append("bench") or {}),
                              ("compile", lambda a: ran.append("compile") or {})], check_args(budget_s=0.2), tmp_path)
    assert ran == ["slow"]
    for name in ("step_benchmark", "compile"):
        assert report[name] == dict(skipped="budget of 0 s spent before this section started")
    on_disk = json.loads((tmp_path / "gpu_report.json").read_text())
    assert on_disk["compile"]["skipped"].startswith("budget") and on_disk["failed_checks"] == []


@pytest.mark.parametrize("report, expected", [
    (dict(environment=dict(nerfacc_kernels=dict(ok=False, reason="build failed: ld: cannot find -lcudart"))),
     "environment.nerfacc_kernels: build failed: ld: cannot find -lcudart"),
    (dict(sds_step=dict(sds_nonfinite=12, loss_finite=True, render_grad_finite=True)),
     "sds_step: non-finite values (sds_nonfinite=12, loss_finite=True, render_grad_finite=True)"),
    (dict(parity=dict(marcher_vs_sampler=dict(mean_abs_rgb=0.2, tolerance=0.03, ok=False))),
     "parity.marcher_vs_sampler: {'mean_abs_rgb': 0.2, 'tolerance': 0.03, 'ok': False}"),
    (dict(sync_count=dict(own=3, nerfacc_sampler=8, ok=False, locations=["volume_renderer.py:90"])),
     "sync_count: 3 synchronisations of perpneg3d's own per step (target 0): ['volume_renderer.py:90']"),
    (dict(pytest_gpu=dict(exit_code=1, ok=False, summary="1 failed, 5 passed")), "pytest_gpu: 1 failed, 5 passed"),
    (dict(gaussians=dict(parity_ok=False, mean_abs_rgb=0.0312, grad_cosine=dict(means=0.5, scales=0.99, colors=1.0))),
     "gaussians: gsplat vs the torch path differ (mean |rgb| 3.12e-02, gradient cosines {'means': 0.5, 'scales': 0.99, "
     "'colors': 1.0})"),
])
def test_gpu_check_names_each_failed_check(report, expected):
    assert gpu_check_module().failed_checks(dict(tiny=False, **report)) == [expected]


def test_gpu_check_passing_checks_are_not_failures():
    report = dict(environment=dict(nerfacc_kernels=dict(ok=True)), sds_step=dict(sds_nonfinite=0, loss_finite=True,
                  render_grad_finite=True), parity=dict(marcher_vs_sampler=dict(ok=True), tcnn_vs_torch=dict(skipped="x")),
                  sync_count=dict(own=0, nerfacc_sampler=8, ok=True), pytest_gpu=dict(exit_code=0, ok=True))
    assert gpu_check_module().failed_checks(report) == []


def test_gpu_check_exits_1_when_a_check_fails(tmp_path, monkeypatch):
    gc = gpu_check_module()
    monkeypatch.setattr(gc, "SECTIONS", (("sync_count", lambda args: dict(own=1, ok=False, locations=["x.py:1"])),))
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    monkeypatch.setattr(gc, "SECTIONS", (("sync_count", lambda args: dict(own=0, ok=True)),))
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0


def test_syncs_are_attributed_by_their_stack():
    """Each synchronisation's owner from the whole Python stack at the moment it happens (outermost first), not
    from the file its warning names: nerfacc's sampler anywhere on the stack; the skip decision; the normals
    pass, a known sync with its reason; a sync inside autograd's engine (the backward pass, which torch runs
    under its own files); anything else under perpneg3d is its own, named by its innermost perpneg3d line."""
    gc = gpu_check_module()
    skip = gc.skip_decision_line()
    known = gc.known_syncs()
    (normals_file, normals_line), = known
    trainer = ("/repo/perpneg3d/training/trainer.py", 200)
    stacks = {
        "nerfacc": [trainer, ("/repo/perpneg3d/renderer/volume_renderer.py", 160),
                    ("/site-packages/nerfacc/estimators/occ_grid.py", 118)],
        "skip_decision": [trainer, ("/repo/perpneg3d/training/" + skip[0], skip[1])],
        "known": [trainer, ("/repo/perpneg3d/renderer/" + normals_file, normals_line)],
        "backward": [trainer, ("/site-packages/torch/_tensor.py", 625),
                     ("/site-packages/torch/autograd/graph.py", 825)],
        "own": [trainer, ("/repo/perpneg3d/renderer/volume_renderer.py", 90), ("/site-packages/torch/functional.py", 5)],
    }
    for expected, stack in stacks.items():
        assert gc.classify_stack(stack, skip, known) == expected, expected
    assert gc.own_site(stacks["own"]) == "volume_renderer.py:90"
    source = (ROOT / "perpneg3d" / "training" / skip[0]).read_text().splitlines()[skip[1] - 1]
    assert "the step's one sync" in source
    source = (ROOT / "perpneg3d" / "renderer" / normals_file).read_text().splitlines()[normals_line - 1]
    assert "torch.nonzero" in source and "known sync: normals" in source


def test_a_section_past_the_budget_is_stopped_and_incomplete_not_failed(tmp_path):
    """Every section is capped by the budget left (plus GRACE_S for its child processes to end): one still running
    then is stopped and reported incomplete, and the next are skipped; neither is a failed check."""
    gc = gpu_check_module()
    ran = []

    def endless(args):
        ran.append("endless")
        while True:
            time.sleep(0.01)

    args = check_args(budget_s=0.2)
    original, gc.GRACE_S = gc.GRACE_S, 0.1
    try:
        started = time.perf_counter()
        report = gc.run_sections([("compile", endless), ("pytest_gpu", lambda a: ran.append("tests") or {})], args,
                                 tmp_path)
    finally:
        gc.GRACE_S = original
    assert ran == ["endless"] and time.perf_counter() - started < 5
    assert report["compile"]["incomplete"].startswith("budget: stopped after 0 s")
    assert report["pytest_gpu"]["skipped"].startswith("budget")
    assert gc.failed_checks(report) == []


def test_a_section_that_turns_cudnn_benchmark_on_leaves_it_as_it_was(tmp_path):
    gc = gpu_check_module()
    before = torch.backends.cudnn.benchmark
    seen = []

    def turns_on(args):
        torch.backends.cudnn.benchmark = True
        return {}

    gc.run_sections([("step_benchmark", turns_on), ("refine", lambda a: seen.append(torch.backends.cudnn.benchmark)
                                                    or {})], check_args(), tmp_path)
    assert seen == [before] and torch.backends.cudnn.benchmark == before


def test_a_pytest_section_cut_short_is_incomplete_with_its_output(monkeypatch):
    gc = gpu_check_module()

    def slow(*a, **kw):
        raise subprocess.TimeoutExpired(a[0], kw["timeout"], output="collected 40 items\n....")

    monkeypatch.setattr(gc.subprocess, "run", slow)
    args = check_args(budget_s=30.0)
    args.pytest_timeout, args.remaining = 240.0, lambda: 30.0
    result = gc.gpu_tests(args)
    assert result["ok"] is None and result["incomplete"] == "budget: stopped after 30 s"
    assert result["log_tail"] == "collected 40 items\n...."
    assert gc.failed_checks(dict(pytest_gpu=result)) == []


def test_the_whole_step_is_timed_apart_from_the_phases():
    """measure(): ms["step"] from steps timed whole (no synchronisation at the phase edges), the phase split
    from a second pass whose total is ms["step_phased"]; the phases fit inside it."""
    from perpneg3d.training.step_benchmark import build_setup, measure

    result = measure(build_setup(TINY_TOY), steps=2, warmup=1)
    ms = result["ms"]
    assert ms["step"] > 0 and ms["step_phased"] > 0 and result["its"] == pytest.approx(1000 / ms["step"])
    parts = sum(ms[k] for k in ("render", "prompts", "guidance", "backward", "optimizer"))
    assert parts <= ms["step_phased"] * 1.001
