"""The second stage end to end on CPU (issue 20): refine=<run> assembles its config from the source run, starts
from the source's surface, writes every artefact, exports the surface itself with a UV texture and the right
axes, and resumes exactly."""
import json

import numpy as np
import pytest
import torch
import trimesh

from helpers import TINY_TOY, compose_train
from perpneg3d.config import check_overrides, instantiate
from perpneg3d.contracts import Surface
from perpneg3d.errors import ConfigError
from perpneg3d.export.mesh import MeshExporter
from perpneg3d.geometry import DMTetGeometry
from perpneg3d.geometry.dmtet import normal_consistency
from perpneg3d.geometry.marching_tets import marching_tets
from perpneg3d.training.checkpoint import latest_valid_checkpoint
from perpneg3d.training.refine import initialise
from perpneg3d.training.run import train

REFINE = ["geometry.grid_resolution=16", "trainer.max_steps=4", "trainer.val_every=2", "trainer.ckpt_every=2",
          "trainer.val_resolution=16", "trainer.turntable_frames=4", "trainer.turntable_resolution=16",
          "trainer.progress=false", "export.texture_size=64", "threads=1"]


@pytest.fixture(scope="module")
def coarse(tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse")
    return train(compose_train(TINY_TOY + ["trainer.max_steps=30", "trainer.ckpt_every=30", "threads=1"], out))


def refine(source, out, extra=()):
    overrides = [f"refine={source}", *REFINE, *extra, f"out_dir={out}"]
    argv = check_overrides("train", overrides)  # adds stage=<the source's refine_stage>, as train.py does
    assert argv[-1] == "stage=refine_toy"
    return train(compose_train(argv, out), argv)


def test_a_refine_run_writes_every_artefact_from_the_source_config(coarse, tmp_path):
    run = refine(coarse, tmp_path)
    assert run.parent.name == "toy_refine"
    for name in ("config.yaml", "metrics.json", "turntable.mp4", "turntable.png", "janus_strip.png", "mesh.glb",
                 "progress.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "val").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert list((run / "tb").iterdir())
    cfg = compose_train([], tmp_path)  # not the defaults: the source's prompt, prior, weights and seed
    from omegaconf import OmegaConf

    saved, source = OmegaConf.load(run / "config.yaml"), OmegaConf.load(coarse / "config.yaml")
    assert saved.refine == str(coarse.resolve()) and saved.resume is None
    assert saved.geometry._target_ == "perpneg3d.geometry.DMTetGeometry"
    assert saved.geometry.color_field == source.geometry and saved.geometry.radius == source.geometry.radius
    assert saved.renderer.background == source.renderer.background != cfg.renderer.background
    for key in ("prompt", "seed", "prompts", "cameras"):
        assert saved[key] == source[key], key
    assert saved.guidance.denoiser == source.guidance.denoiser and saved.guidance.neg_gain == source.guidance.neg_gain
    assert saved.guidance.max_step_percent == 0.5  # the stage's low-noise range
    assert saved.trainer.lambda_normal_consistency == 10000.0 and saved.geometry.grid_resolution == 16
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "loss_normal_consistency" in metrics["final"]  # its value: the trainer test below
    assert set(metrics["janus"]) >= {"front_share", "view_acc_aligned", "janus_free"}
    # the exported mesh is the refined surface itself (no marching cubes), with a UV texture
    state = latest_valid_checkpoint(run)[1]
    geometry = instantiate(saved.geometry)
    geometry.load_state_dict(state["geometry"])
    vertices, faces = geometry.mesh()
    cleaned, _ = MeshExporter(texture="uv").extract(geometry)
    assert len(cleaned.faces) <= len(faces) and len(cleaned.faces) >= 0.5 * len(faces)
    scene = trimesh.load(run / "mesh.glb")
    mesh = next(iter(scene.geometry.values()))
    assert mesh.visual.kind == "texture" and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert np.asarray(mesh.visual.material.baseColorTexture).shape[:2] == (64, 64)


def test_the_refine_starts_from_the_source_surface_and_colour(coarse, tmp_path):
    from perpneg3d.training.run_loading import load_run

    run = refine(coarse, tmp_path, ["trainer.max_steps=1", "trainer.val_every=1", "~export"])
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    _, volume, _, _, _, _ = load_run(coarse)
    geometry = instantiate(saved.geometry)
    state = latest_valid_checkpoint(run)[1]
    geometry.load_state_dict(state["geometry"])  # the grid's box, fitted to the source's surface, comes with it
    assert (geometry.bbox[1] - geometry.bbox[0] < 2 * geometry.radius).all()
    # the run's start replayed: the signed distance is the level minus the coarse density, clamped to [-1, 1]
    # (sdf_clamp), on that box; after one Adam step of lr 0.01 the run's is still that, to 0.01
    start = instantiate(saved.geometry)
    level = initialise(start, instantiate(saved.renderer), saved)
    assert torch.equal(start.bbox, geometry.bbox)
    density = start.grid_density(volume)
    assert torch.equal(start.sdf.detach(), (level - density).clamp(-1, 1))
    assert ((level - density).abs() < 1).sum() > 100 and (level - density).abs().max() > 2  # the clamp acts
    assert (state["geometry"]["sdf"] - start.sdf.detach()).abs().max() <= 0.0101
    points = torch.rand(64, 3) - 0.5
    assert torch.allclose(geometry.albedo(points), volume.albedo(points), atol=0.05)


def test_the_silhouette_start_is_the_level_whose_silhouettes_match_best(coarse, tmp_path):
    """silhouette_level's choice has the highest IoU of the mesh's coverage against the coarse renders' of all
    17 candidate levels (computed here, apart), and beats the export level's and the extremes' clearly."""
    from perpneg3d.renderer.orbit import render_views
    from perpneg3d.training.refine import SEARCH_SCALES, silhouette_level
    from perpneg3d.training.run_loading import load_run

    run = refine(coarse, tmp_path, ["trainer.max_steps=1", "trainer.val_every=1", "~export"])
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    source_cfg, volume, source_renderer, _, _, _ = load_run(coarse)
    geometry, renderer = instantiate(saved.geometry), instantiate(saved.renderer)
    export_level = instantiate(source_cfg.export).level(volume)[1]
    geometry.fit_grid(volume, float(export_level * SEARCH_SCALES[0]))
    density = geometry.grid_density(volume)
    chosen = silhouette_level(geometry, renderer, volume, source_renderer, density, export_level, saved.cameras)
    azimuth = torch.arange(12) * 30.0
    cams = (azimuth, torch.full_like(azimuth, float(sum(saved.cameras.elevation_range)) / 2),
            float(sum(saved.cameras.distance_range)) / 2,
            float(sum(saved.cameras.fovy_range)) / 2, 64)
    target = torch.cat([o.opacity for o in render_views(volume, source_renderer, *cams)]) > 0.5

    def iou(level):
        geometry.initialise_from(volume, level, density)
        covered = torch.cat([o.opacity for o in render_views(geometry, renderer, *cams)]) > 0.5
        return float((covered & target).sum() / (covered | target).sum())

    scores = {level: iou(level) for level in (export_level * SEARCH_SCALES).tolist()}
    assert chosen in scores and scores[chosen] == max(scores.values())
    assert scores[chosen] > 0.6 and scores[chosen] - min(scores.values()) > 0.1


def test_resume_of_a_refine_run_is_exact(coarse, tmp_path):
    straight = refine(coarse, tmp_path / "a", ["trainer.max_steps=6", "~export"])
    first = refine(coarse, tmp_path / "b", ["trainer.max_steps=3", "~export"])
    argv = check_overrides("train", [f"resume={first}", "trainer.max_steps=6"])
    assert not any(a.startswith("stage=") for a in argv)  # a resume is rebuilt from the run's own config
    assert train(compose_train(argv, tmp_path / "c"), argv) == first
    a, b = latest_valid_checkpoint(straight)[1], latest_valid_checkpoint(first)[1]
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["geometry"][k], b["geometry"][k]) for k in a["geometry"])


def test_a_bad_refine_source_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"refine=.*no config.yaml"):
        check_overrides("train", [f"refine={tmp_path}"])


def test_trainer_adds_the_surface_regularisers_with_their_weights():
    from perpneg3d.renderer.volume_renderer import RenderOutput
    from perpneg3d.training.trainer import Trainer
    from perpneg3d.geometry.implicit_volume import ImplicitVolume

    geometry = DMTetGeometry(ImplicitVolume(radius=1.0, n_levels=2, log2_hashmap_size=8), radius=1.0,
                             grid_resolution=8, init_radius=0.6)
    assert isinstance(geometry, Surface)
    vertices, faces = geometry.mesh()
    out = RenderOutput(rgb=torch.zeros(1, 2, 2, 3), opacity=torch.zeros(1, 2, 2, 1), depth=torch.zeros(1, 2, 2, 1),
                       z_variance=torch.zeros(1, 2, 2, 1), mesh=(vertices, faces))
    trainer = Trainer(lambda_normal_consistency=(0, 0.0, 100.0, 10), lambda_laplacian=0.5, lambda_orient=0.0)
    terms = trainer.losses(out, torch.tensor(1.0), 5, geometry.regularizers(vertices, faces))
    assert terms["normal_consistency"].item() == pytest.approx(50.0 * normal_consistency(vertices, faces).item(), rel=1e-6)
    assert terms["laplacian"].item() == pytest.approx(0.5 * geometry.regularizers(vertices, faces)["laplacian"].item())
    assert "normal_consistency" not in trainer.losses(out, torch.tensor(1.0), 0, geometry.regularizers(vertices, faces))


def test_export_of_a_surface_is_upright_1m_with_its_front_on_minus_y(tmp_path):
    """An ellipsoid (x 0.6, y 0.3, z 0.45) with a head at the front (+x, the world's front) as a DMTet surface:
    the GLB (y up) is 1 m tall, its length along the front axis is 1.3 / 0.95 of its height, and the head,
    its highest part, is at file +z, which Blender's importer maps to -Y (docs/conventions.md)."""
    class Grey(torch.nn.Module):
        radius = 1.0

        def albedo(self, points):
            return torch.full_like(points, 0.5)

    geometry = DMTetGeometry(Grey(), radius=1.0, grid_resolution=48)
    p = geometry.grid_vertices
    body = ((p / torch.tensor([0.6, 0.3, 0.45])) ** 2).sum(-1).sqrt() - 1
    head = (p - torch.tensor([0.55, 0.0, 0.35])).norm(dim=-1) - 0.15
    with torch.no_grad():
        geometry.sdf.copy_(torch.minimum(body * 0.3, head))
    path = MeshExporter(formats=["glb"], texture="uv", texture_size=64)(geometry, tmp_path)[0]
    mesh = next(iter(trimesh.load(path).geometry.values()))
    lo, hi = mesh.bounds
    assert lo[1] == pytest.approx(0.0, abs=1e-6) and hi[1] == pytest.approx(1.0, abs=1e-6)
    assert hi[2] - lo[2] == pytest.approx(1.3 / 0.95, rel=0.04)
    assert hi[0] - lo[0] == pytest.approx(0.6 / 0.95, rel=0.04)
    top = mesh.vertices[mesh.vertices[:, 1].argmax()]
    assert top[2] > 0.3  # the head: front (+x) -> Blender -Y -> glTF +z


def test_then_refine_runs_both_stages_and_a_requeued_job_continues_the_second(tmp_path):
    """A sweep job with then_refine: the coarse run, then <job>/refine. Requeued (the same job folder, as a
    requeued SLURM job gets) with the refine stage unfinished, the finished first stage is not trained or
    exported again and the refine stage resumes from its checkpoint."""
    job = tmp_path / "job"
    stage = [o for o in REFINE if not o.startswith("threads")]
    base = TINY_TOY + ["trainer.max_steps=10", "trainer.ckpt_every=10", "threads=1", "then_refine=true"]
    first = base + ["refine_overrides=[" + ",".join(f'"{o}"' for o in stage + ["trainer.max_steps=2"]) + "]"]
    done = train(compose_train(first, tmp_path), first, into=job)
    assert done == job / "refine" and (done / "mesh.glb").is_file() and (job / "mesh.glb").is_file()
    assert latest_valid_checkpoint(done)[1]["step"] == 2
    coarse_mesh = (job / "mesh.glb").stat().st_mtime_ns
    again = base + ["refine_overrides=[" + ",".join(f'"{o}"' for o in stage + ["trainer.max_steps=4"]) + "]"]
    assert train(compose_train(again, tmp_path), again, into=job) == done
    assert (job / "mesh.glb").stat().st_mtime_ns == coarse_mesh  # the first stage was not run again
    assert latest_valid_checkpoint(job)[1]["step"] == 10
    assert latest_valid_checkpoint(done)[1]["step"] == 4
    assert json.loads((done / "metrics.json").read_text())["steps"] == 4


def test_a_refine_of_a_refine_run_is_refused_in_one_line(coarse, tmp_path):
    run = refine(coarse, tmp_path, ["trainer.max_steps=1", "trainer.val_every=1", "~export"])
    with pytest.raises(ConfigError, match=r"is itself a refine run .*: refine that run, or resume this one"):
        check_overrides("train", [f"refine={run}"])


def test_a_source_trained_without_export_still_gets_a_refined_mesh(tmp_path):
    source = train(compose_train(TINY_TOY + ["trainer.max_steps=3", "~export", "threads=1"], tmp_path / "src"))
    run = refine(source, tmp_path, ["trainer.max_steps=1", "trainer.val_every=1"])
    mesh = next(iter(trimesh.load(run / "mesh.glb").geometry.values()))
    assert mesh.visual.kind == "texture"
