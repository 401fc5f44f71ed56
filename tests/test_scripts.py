"""The scripts as users run them: 2D sampling, view fidelity, Janus evaluation, export, benchmarks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

from helpers import TINY_TOY, compose_train, subprocess_env
from perpneg3d.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def only_child(folder: Path) -> Path:
    children = [p for p in folder.iterdir() if p.is_dir()]
    assert len(children) == 1
    return children[0]


def test_sample_2d_with_the_tiny_pipeline_folder(tiny_sd_path, tmp_path):
    run("scripts/sample_2d.py", f"guidance.denoiser.pretrained_model_name_or_path={tiny_sd_path}", "guidance.denoiser.device=cpu",
        "prompt=a corgi standing", "view=back", "view_negative_weight=2", "num_samples=3", "batch_size=2", "steps=3",
        f"out_dir={tmp_path}")
    out = only_child(tmp_path)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert (out / "grid.png").is_file()
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["texts"] == ["", "a corgi standing, back view", "a corgi standing, front view", "a corgi standing, side view"]
    assert prompts["negative_weights"] == [2.0, 2.0]


def test_sample_2d_is_reproducible(tmp_path):
    args = ["scripts/sample_2d.py", "guidance=toy", "prompt=a toy car", "view=side", "num_samples=2", "steps=4",
            "guidance.denoiser.dataset.num_images=300", f"out_dir={tmp_path}"]
    run(*args)
    run(*args)
    a, b = sorted(p for p in tmp_path.iterdir())
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes() and a != b  # two folders, same pixels


def test_eval_view_fidelity_small_preset(tmp_path):
    proc = run("scripts/eval_view_fidelity.py", "preset=small", f"out_dir={tmp_path}")
    out = only_child(tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert {(r["view"], r["method"]) for r in results} == {("side", "cfg"), ("side", "perpneg w=2"),
                                                           ("back", "cfg"), ("back", "perpneg w=2")}
    assert all(0 <= r["success"] <= 1 and r["n"] == 8 for r in results)
    assert "| method | side view | back view |" in proc.stdout
    assert len(list(out.glob("*.png"))) == 4


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return train(compose_train(TINY_TOY + ["~export"], tmp_path_factory.mktemp("runs")))


def test_eval_janus_script(toy_run):
    proc = run("scripts/eval_janus.py", f"run={toy_run}")
    scores = json.loads((toy_run / "janus.json").read_text())
    assert len(scores["predicted_view"]) == 36 and scores["step"] == 6
    assert "front_share" in proc.stdout and (toy_run / "janus_strip.png").is_file()


def test_export_script_every_format(toy_run, tmp_path):
    run("scripts/export.py", f"run={toy_run}", "export.formats=[glb,obj,ply]", "export.resolution=32",
        "export.threshold=0.5", f"out_dir={tmp_path}")
    for fmt in ("glb", "obj", "ply"):
        mesh = trimesh.load(tmp_path / f"mesh.{fmt}", force="mesh")
        assert len(mesh.faces) > 0


def test_benchmark_step_prints_phases():
    proc = run("scripts/benchmark_step.py", "--steps", "2", "--warmup", "1", "--resolution", "16",
               "guidance.denoiser.dataset.num_images=300", "geometry.n_levels=4", "geometry.log2_hashmap_size=12")
    assert "| Perp-Neg (K=2) |" in proc.stdout and "| plain (K=0) |" in proc.stdout
    assert "Perp-Neg / plain step time" in proc.stdout


def test_benchmark_step_times_the_refine_stage():
    """--stage: the same table for the refine stage's step (a DMTet sphere, rasterized), the toy preset's own
    first-stage keys kept out of the stage's geometry and trainer."""
    proc = run("scripts/benchmark_step.py", "--stage", "refine_toy", "--steps", "1", "--warmup", "1", "--resolution", "16",
               "guidance.denoiser.dataset.num_images=300", "geometry.grid_resolution=16")
    assert "geometry DMTetGeometry (torch)" in proc.stdout and "renderer rasterizer auto" in proc.stdout
    assert "| Perp-Neg (K=2) |" in proc.stdout


def test_bench_tet_grid_compares_the_whole_box_with_the_fitted_one(tmp_path):
    """Both grids of a resolution have the same vertices and tets (6 per cube); the fitted one's box is the
    source surface's, smaller than the whole [-1, 1]^3 of the toy preset, so its cells are smaller."""
    source = train(compose_train(TINY_TOY + ["trainer.max_steps=20", "trainer.ckpt_every=20", "threads=1", "~export"],
                                 tmp_path))
    proc = run("scripts/bench_tet_grid.py", str(source), "--resolutions", "12", "--steps", "1", "--warmup", "0")
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith(("| whole box", "| fitted"))]
    assert [r[0] for r in rows] == ["| whole box", "| fitted"], proc.stdout
    (whole, fitted) = rows
    assert whole[1:4] == fitted[1:4] == ["12", "2,197", "10,368"]
    assert whole[5] == "2.00 x 2.00 x 2.00" and all(float(e) < 2.0 for e in fitted[5].split(" x "))
    assert float(fitted[6]) < float(whole[6]) == pytest.approx(2 / 12, abs=1e-4)


def test_sample_2d_with_guidance_if(tiny_if_path, tmp_path):
    """The 2D sampler takes guidance=if like any prior: 32x32 pixel-space samples from the tiny IF."""
    run("scripts/sample_2d.py", "guidance=if", f"guidance.denoiser.pretrained_model_name_or_path={tiny_if_path}",
        "guidance.denoiser.device=cpu", "prompt=a corgi standing", "view=side", "num_samples=2", "batch_size=2",
        "steps=3", f"out_dir={tmp_path}")
    out = only_child(tmp_path)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0001.png"]
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["texts"] == ["", "a corgi standing, side view", "a corgi standing, front view", "a corgi standing, back view"]
