"""Training end to end on CPU: toy prior, tiny Stable Diffusion, an external prior, resume, batch sizes."""
import json

import pytest
import torch

from helpers import TINY_TOY, compose_train
from perpneg3d.config import instantiate
from perpneg3d.random_streams import RandomStreams
from perpneg3d.training.checkpoint import latest_valid_checkpoint
from perpneg3d.training.run import train


def final_geometry(run_dir):
    return latest_valid_checkpoint(run_dir)[1]["geometry"]


@pytest.mark.parametrize("batch", [1, 4])
def test_toy_run_writes_every_output(tmp_path, batch):
    run_dir = train(compose_train(TINY_TOY + [f"cameras.batch_size={batch}"], tmp_path))
    for name in ("config.yaml", "metrics.json", "turntable.mp4", "turntable.png", "janus_strip.png", "mesh.glb"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "val").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert list((run_dir / "tb").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["nonfinite_steps"] == 0
    assert set(metrics["janus"]) >= {"front_share", "view_acc", "view_acc_aligned", "janus_free"}
    assert 0 <= metrics["janus"]["front_share"] <= 1
    assert (run_dir / "turntable.mp4").stat().st_size > 1000


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = train(compose_train(TINY_TOY + ["trainer.max_steps=8", "trainer.ckpt_every=2", "~export"], tmp_path / "a"))
    first = train(compose_train(TINY_TOY + ["trainer.max_steps=5", "trainer.ckpt_every=2", "~export"], tmp_path / "b"))
    resumed = train(compose_train(TINY_TOY + ["trainer.max_steps=8", "trainer.ckpt_every=2", "~export", f"resume={first}"], tmp_path / "c"))
    assert resumed == first  # continues in its own folder
    a, b = final_geometry(straight), final_geometry(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_reaches_the_field_and_not_the_denoiser(tiny_sd_path, tmp_path):
    cfg = compose_train(["guidance=sd21", f"guidance.denoiser.pretrained_model_name_or_path={tiny_sd_path}",
                         "guidance.denoiser.device=cpu", "geometry.n_levels=4", "geometry.log2_hashmap_size=12",
                         "geometry.finest_resolution=64", "renderer.num_samples_per_ray=16", "cameras.heights=[16]",
                         "cameras.widths=[16]", "cameras.batch_size=2"], tmp_path)
    guidance, prompts, cameras = instantiate(cfg.guidance), instantiate(cfg.prompts), instantiate(cfg.cameras)
    geometry, renderer = instantiate(cfg.geometry), instantiate(cfg.renderer)
    rng = RandomStreams.seeded(0)
    renderer.update(0, geometry)
    cams = cameras.sample(0, rng.device)
    out = renderer(geometry, cams, rng=rng)
    batch = prompts.bind(guidance.denoiser)(cams.azimuth_deg, cams.elevation_deg)
    assert batch.text_emb.shape[0] == 4 * 2  # [uncond | pos | neg_front | neg_side] x B in one UNet call
    sds = guidance(out.rgb, batch, 0, rng.device)
    sds.loss.backward()
    assert geometry.encoding.encoding.embeddings.grad.abs().sum() > 0
    unet, vae = guidance.denoiser.unet, guidance.denoiser.vae
    assert all(p.grad is None for p in list(unet.parameters()) + list(vae.parameters()))
    assert not any(p.requires_grad for p in unet.parameters())


def test_stable_diffusion_training_steps(tiny_sd_path, tmp_path):
    run_dir = train(compose_train([
        "guidance=sd21", f"guidance.denoiser.pretrained_model_name_or_path={tiny_sd_path}", "prompt=a corgi standing",
        "geometry.n_levels=4", "geometry.log2_hashmap_size=12", "geometry.finest_resolution=64",
        "renderer.num_samples_per_ray=16", "cameras.heights=[16]", "cameras.widths=[16]", "cameras.batch_size=2",
        "trainer.max_steps=3", "trainer.val_every=3", "trainer.val_resolution=16", "trainer.turntable_frames=4",
        "trainer.turntable_resolution=16", "trainer.progress=false", "~export"], tmp_path))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and "janus" not in metrics  # Stable Diffusion brings no classifier by default
    assert metrics["final"]["loss_sds"] > 0


def test_external_prior_plugs_in_by_config_alone(tmp_path):
    overrides = TINY_TOY + ["~guidance.denoiser", "+guidance.denoiser={_target_:external_prior.ColourPrior,resolution:16}",
                            "evaluate_janus=false", "~export", "trainer.max_steps=60", "trainer.val_every=60",
                            "geometry.start_level=4", "guidance.min_step_percent=0.02", "trainer.lambda_sparsity=0",
                            'prompts.template="{prompt}"']  # one text for every view: one target colour
    cfg = compose_train(overrides, tmp_path)
    run_dir = train(cfg)
    from external_prior import ColourPrior
    from perpneg3d.training.run_loading import load_run

    _, geometry, _, _, _, _ = load_run(run_dir)
    target = (ColourPrior().colour("a toy dog") + 1) / 2
    with torch.no_grad():
        pts = torch.randn(256, 3) * 0.1
        albedo = geometry.albedo(pts).mean(0)
    start = torch.tensor([0.5, 0.5, 0.5])  # sigmoid(0): where albedo starts
    assert (albedo - target).norm() < 0.7 * (start - target).norm()
