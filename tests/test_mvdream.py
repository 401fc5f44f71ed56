"""MVDream's multi-view UNet in diffusers' layout (issue 29, first part): its cameras on hand-worked cases, and a
tiny random UNet: with one view and no camera it is the plain UNet; a group's views see each other and nothing
else; the joint attention equals running each group alone."""
from __future__ import annotations

import math

import pytest
import torch

from perpneg3d.cameras.camera_batch import orbit_cameras
from perpneg3d.guidance.mvdream import mvdream_cameras, multiview_unet

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)


def mvdream_get_camera(elevation, azimuth):
    """MVDream's camera for (elevation, azimuth), worked out by hand from its definition (camera_utils.py): a
    y-up world with the camera at (cos e sin a, sin e, cos e cos a) looking at the origin, OpenGL axes, then the
    world's y and z swapped by its fixed flip (x, y, z) -> (x, -z, y), translation on the unit sphere."""
    e, a = math.radians(elevation), math.radians(azimuth)
    pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -forward, pos
    flip = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return (flip @ m).reshape(16)


def test_the_front_camera_by_hand():
    """Azimuth 0, elevation 0 (perpneg3d: at +x looking at the origin, z up): MVDream's camera sits at -y with
    its right along +x and its up along +z."""
    cams = orbit_cameras(torch.tensor([0.0]), 0.0, 2.0, 40.0, 8)
    assert mvdream_cameras(cams.c2w)[0].tolist() == pytest.approx(
        [1, 0, 0, 0, 0, 0, -1, -1, 0, 1, 0, 0, 0, 0, 0, 1], abs=1e-6)


@pytest.mark.parametrize("azimuth,elevation", [(0, 15), (90, 15), (180, 0), (-90, 30), (45, 60), (-135, 5)])
def test_cameras_match_mvdreams_definition_at_the_same_azimuth_and_elevation(azimuth, elevation):
    cams = orbit_cameras(torch.tensor([float(azimuth)]), float(elevation), 2.3, 40.0, 8)
    assert torch.allclose(mvdream_cameras(cams.c2w.double())[0], mvdream_get_camera(elevation, azimuth), atol=1e-6)


def tiny_pair(num_views):
    """A plain tiny UNet (weights re-drawn from N(0, 0.2): zero-initialised output layers hide attention bugs) and
    the multi-view UNet holding its weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**TINY)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.2)
    mv = multiview_unet(plain.config, num_views, plain.state_dict())
    with torch.no_grad():
        for p in mv.class_embedding.parameters():
            p.normal_(0, 0.2)
    return plain.eval(), mv.eval()


def run(unet, x, t, emb, cameras):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb, class_labels=cameras).sample


def inputs(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randn(rows, 7, 32, generator=g), torch.randn(rows, 16, generator=g))


def test_one_view_without_the_camera_is_the_plain_unet():
    plain, mv = tiny_pair(1)
    with torch.no_grad():  # the camera MLP's output layer zeroed: it adds nothing to the timestep embedding
        mv.class_embedding.linear_2.weight.zero_()
        mv.class_embedding.linear_2.bias.zero_()
    x, t, emb, cams = inputs(3)
    with torch.no_grad():
        want = plain(x, t, encoder_hidden_states=emb).sample
    assert torch.allclose(run(mv, x, t, emb, cams), want, atol=1e-5)
    assert want.abs().mean() > 0.1


def test_a_groups_views_see_each_other_and_nothing_else():
    """Two groups of 4: changing view 1 of group 0 changes every view of group 0 and leaves group 1 bit-identical;
    the camera changes the output too."""
    _, mv = tiny_pair(4)
    x, t, emb, cams = inputs(8)
    t[4:] = t[0]  # one timestep per group, as the guidance will draw
    t[:4] = t[0]
    base = run(mv, x, t, emb, cams)
    x2 = x.clone()
    x2[1] += 0.5
    moved = run(mv, x2, t, emb, cams)
    change = (moved - base).flatten(1).abs().amax(1)
    assert (change[[0, 2, 3]] > 1e-4).all() and torch.equal(moved[4:], base[4:])
    cams2 = cams.clone()
    cams2[5] += 1.0
    assert not torch.allclose(run(mv, x, t, emb, cams2)[4:], base[4:], atol=1e-4)


def test_the_joint_attention_equals_each_group_run_alone():
    _, mv = tiny_pair(4)
    x, t, emb, cams = inputs(8)
    both = run(mv, x, t, emb, cams)
    alone = torch.cat([run(mv, x[i:i + 4], t[i:i + 4], emb[i:i + 4], cams[i:i + 4]) for i in (0, 4)])
    assert torch.allclose(both, alone, atol=1e-5)
    with pytest.raises(ValueError, match="6 images do not form groups of 4 views"):
        run(mv, *(v[:6] for v in inputs(8)))


def test_camera_groups_share_all_but_the_azimuth():
    """views_per_group=4, batch 8: two groups of four consecutive cameras, each sharing elevation, distance, fov
    and pose perturbation, azimuths 90 degrees apart from a stratified start; views_per_group=1 draws what the
    sampler always drew (the same random stream)."""
    from perpneg3d.cameras.random_cameras import RandomCameras
    from perpneg3d.cameras.camera_batch import wrap_azimuth
    from perpneg3d.errors import ConfigError

    cams = RandomCameras(batch_size=8, views_per_group=4).sample(0, torch.Generator().manual_seed(3))
    az = cams.azimuth_deg.view(2, 4)
    assert torch.allclose(wrap_azimuth(az - az[:, :1]), torch.tensor([0.0, 90.0, 180.0, -90.0]).expand(2, 4), atol=1e-4)
    for values in (cams.elevation_deg, cams.distance, cams.fovy_deg):
        v = values.view(2, 4)
        assert torch.equal(v, v[:, :1].expand(2, 4)) and v[0, 0] != v[1, 0]
    eye = cams.c2w[:, :3, 3].view(2, 4, 3)
    assert torch.allclose(eye.norm(dim=-1)[0], eye.norm(dim=-1)[0, 0].expand(4), atol=0.2)  # perturbed, one sphere
    assert not torch.equal(cams.light_position[0], cams.light_position[1])  # each camera its own light
    one = RandomCameras(batch_size=8).sample(0, torch.Generator().manual_seed(3))
    again = RandomCameras(batch_size=8, views_per_group=1).sample(0, torch.Generator().manual_seed(3))
    assert torch.equal(one.c2w, again.c2w) and torch.equal(one.light_position, again.light_position)
    with pytest.raises(ConfigError, match=r"cameras.batch_size=6 must be a multiple of cameras.views_per_group=4 .*"
                                          r"use cameras.batch_size=4"):
        RandomCameras(batch_size=6, views_per_group=4)


@pytest.fixture(scope="module")
def tiny_mvdream(tmp_path_factory):
    """A tiny random Stable Diffusion folder whose UNet is the multi-view one (weights re-drawn from N(0, 0.2))."""
    from diffusers import UNet2DConditionModel

    from tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp("tiny_mvdream"))
    plain = UNet2DConditionModel.from_pretrained(folder / "unet")
    mv = multiview_unet(plain.config, 4, plain.state_dict())
    with torch.no_grad():
        for p in mv.parameters():
            p.normal_(0, 0.2)
    mv.save_pretrained(folder / "unet")
    return folder


def test_mvdream_loads_refuses_a_plain_sd_and_needs_cameras(tiny_mvdream, tiny_sd_path):
    from perpneg3d.errors import ConfigError, ModelNotFoundError
    from perpneg3d.guidance.mvdream import MVDream

    den = MVDream(str(tiny_mvdream), device="cpu")
    assert den.views_per_group == 4 and den.embed(["a corgi"]).shape == (1, 77, 32)
    with pytest.raises(ModelNotFoundError, match="is a Stable Diffusion without MVDream's camera embedding"):
        MVDream(str(tiny_sd_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match=r"^cannot load MVDream '/no/such/mv'.*: no such folder\. Convert "
                                                 r"MVDream's checkpoint once: python scripts/convert_mvdream.py"):
        MVDream("/no/such/mv", device="cpu")
    with pytest.raises(ConfigError, match="conditions every image on its camera"):
        den.eps(torch.zeros(4, 4, 4, 4), torch.zeros(4, dtype=torch.long), den.embed(["a"] * 4))


def test_one_sds_step_through_mvdream_with_perp_neg(tiny_mvdream):
    """Two groups of four cameras: one batched UNet call of (2 + K) x 8 rows with the cameras repeated per block,
    one timestep per group, and the view-dependent Perp-Neg prompts composing with it; the same step's
    guided eps equals the by-block computation with each block's cameras."""
    from hydra.utils import instantiate

    from helpers import compose_train
    from perpneg3d.guidance.perpneg import combine
    from perpneg3d.random_streams import RandomStreams

    cfg = compose_train(["guidance=mvdream", f"guidance.denoiser.pretrained_model_name_or_path={tiny_mvdream}",
                         "guidance.denoiser.device=cpu", "cameras.batch_size=8", "cameras.views_per_group=4",
                         "cameras.heights=[16]", "cameras.widths=[16]"], "/tmp/unused")
    guidance, prompts, cameras = instantiate(cfg.guidance), instantiate(cfg.prompts), instantiate(cfg.cameras)
    den = guidance.denoiser
    rng = RandomStreams.seeded(0)
    cams = cameras.sample(0, rng.device)
    rgb = torch.rand(8, 16, 16, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    batch = prompts.bind(den)(cams.azimuth_deg, cams.elevation_deg)
    calls = []
    original = den.eps_views
    den.eps_views = lambda *a: calls.append([x.shape[0] for x in a]) or original(*a)
    sds = guidance(rgb, batch, 0, rng.device, cams.c2w)
    assert calls == [[32, 32, 32, 32]]  # [uncond | pos | neg_1 | neg_2] x 8, cameras included
    assert torch.equal(sds.t[:4], sds.t[:1].expand(4)) and torch.equal(sds.t[4:], sds.t[4:5].expand(4))
    sds.loss.backward()
    assert rgb.grad.abs().sum() > 0
    x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = sds.t
    with torch.no_grad():
        blocks = [original(x, t, batch.text_emb[i * 8:(i + 1) * 8], cams.c2w) for i in range(4)]
        from perpneg3d.guidance.perpneg import guided_eps

        got = guided_eps(den, x, t, batch.text_emb, batch.neg_weights, 50.0, "perpneg", c2w=cams.c2w)
    want = combine(blocks[0], blocks[1], torch.stack(blocks[2:], 1), batch.neg_weights, 50.0, "perpneg")
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())


def test_a_run_trains_with_mvdream_and_refuses_cameras_that_are_not_groups(tiny_mvdream, tmp_path):
    """guidance=mvdream through train.py's path on the tiny model (4 cameras, one group, 2 steps); without
    cameras.views_per_group=4 the run stops before step 0 with one line saying what to set."""
    from helpers import compose_train
    from perpneg3d.errors import ConfigError
    from perpneg3d.training.run import train

    base = ["guidance=mvdream", f"guidance.denoiser.pretrained_model_name_or_path={tiny_mvdream}",
            "guidance.denoiser.device=cpu", "geometry.n_levels=4", "geometry.log2_hashmap_size=12",
            "geometry.finest_resolution=64", "renderer.num_samples_per_ray=8", "cameras.heights=[16]",
            "cameras.widths=[16]", "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_resolution=16",
            "trainer.turntable_frames=2", "trainer.turntable_resolution=16", "trainer.progress=false", "~export",
            "evaluate_janus=false"]
    with pytest.raises(ConfigError, match=r"^guidance.denoiser.views_per_group=4 denoises groups of 4 views: set "
                                          r"cameras.views_per_group=4"):
        train(compose_train(base + ["cameras.batch_size=4"], tmp_path / "a"))
    run = train(compose_train(base + ["cameras.batch_size=4", "cameras.views_per_group=4"], tmp_path / "b"))
    assert (run / "metrics.json").is_file() and (run / "ckpts" / "step_0000002.ckpt").is_file()


def recon_by_hand(x_t, t, eps_hat, eps_pos, alphas_cumprod, rescale, group):
    """MVDream's x0-reconstruction target written out group by group (threestudio-mvdream's recon_loss)."""
    out = []
    for start in range(0, x_t.shape[0], group):
        s = slice(start, start + group)
        abar = alphas_cumprod[t[s]].view(-1, 1, 1, 1)
        x0 = (x_t[s] - (1 - abar).sqrt() * eps_hat[s]) / abar.sqrt()
        x0_pos = (x_t[s] - (1 - abar).sqrt() * eps_pos[s]) / abar.sqrt()
        factor = (x0_pos.std() + 1e-8) / (x0.std() + 1e-8)
        out.append(rescale * factor * x0 + (1 - rescale) * x0)
    return torch.cat(out)


def test_the_reconstruction_target_without_rescale_is_sds_with_its_own_weight():
    """x0 from the guided eps: latents - x0_hat = sqrt((1 - abar) / abar) (eps_hat - eps) exactly (float64), and with
    rescale r the target matches the group-by-group formula (groups of 2 here)."""
    from perpneg3d.guidance.sds import ScoreDistillation

    class Schedule:
        num_train_timesteps = 1000
        alphas_cumprod = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)

    g = torch.Generator().manual_seed(0)
    latents, noise, eps_hat, eps_pos = (torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([100, 100, 700, 700])
    abar = Schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    plain = ScoreDistillation(Schedule(), recon_loss=True, recon_std_rescale=0.0)
    assert torch.allclose(latents - plain.reconstruction(x_t, t, eps_hat, eps_pos, 2),
                          ((1 - abar) / abar).sqrt() * (eps_hat - noise), atol=1e-12)
    mixed = ScoreDistillation(Schedule(), recon_loss=True, recon_std_rescale=0.5)
    want = recon_by_hand(x_t, t, eps_hat, eps_pos, Schedule.alphas_cumprod, 0.5, 2)
    assert torch.allclose(mixed.reconstruction(x_t, t, eps_hat, eps_pos, 2), want, atol=1e-12)
    assert not torch.allclose(want, plain.reconstruction(x_t, t, eps_hat, eps_pos, 2))  # the rescale does something


def test_mvdreams_reconstruction_loss_uses_the_one_call_and_rescales_per_group(tiny_mvdream):
    """guidance=mvdream (recon_loss on, as in threestudio-mvdream) on two groups of 4 views with Perp-Neg: still one
    UNet call; the gradient reaching the latents is (latents - target) / B with the target worked out group by group
    from that call's own blocks (the combined eps, and the positive prompt's for the spread)."""
    from hydra.utils import instantiate

    from helpers import compose_train
    from perpneg3d.guidance.perpneg import combine, time_factor
    from perpneg3d.random_streams import RandomStreams

    cfg = compose_train(["guidance=mvdream", f"guidance.denoiser.pretrained_model_name_or_path={tiny_mvdream}",
                         "guidance.denoiser.device=cpu", "cameras.batch_size=8", "cameras.views_per_group=4",
                         "cameras.heights=[16]", "cameras.widths=[16]"], "/tmp/unused")
    guidance, prompts, cameras = instantiate(cfg.guidance), instantiate(cfg.prompts), instantiate(cfg.cameras)
    assert guidance.recon_loss and guidance.recon_std_rescale == 0.5
    den = guidance.denoiser
    rng = RandomStreams.seeded(0)
    cams = cameras.sample(0, rng.device)
    batch = prompts.bind(den)(cams.azimuth_deg, cams.elevation_deg)
    seen, encode, eps_views = {}, den.encode_sample, den.eps_views

    def keep_latents(rgb, generator):
        seen["latents"] = encode(rgb, generator)
        seen["latents"].retain_grad()
        return seen["latents"]

    def keep_call(x, t, emb, c2w):
        seen.setdefault("calls", []).append((x, t))
        seen["eps"] = eps_views(x, t, emb, c2w)
        return seen["eps"]

    den.encode_sample, den.eps_views = keep_latents, keep_call
    rgb = torch.rand(8, 16, 16, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sds = guidance(rgb, batch, 0, rng.device, cams.c2w)
    sds.loss.backward()
    assert len(seen["calls"]) == 1
    x_t, t = seen["calls"][0][0][:8], seen["calls"][0][1][:8]
    blocks = seen["eps"].float().reshape(4, 8, *x_t.shape[1:])
    eps_hat = combine(blocks[0], blocks[1], blocks[2:].transpose(0, 1), batch.neg_weights, 50.0, "perpneg",
                      neg_factor=time_factor(t, 1000, None, 1.0))
    target = recon_by_hand(x_t.float(), t, eps_hat, blocks[1], den.alphas_cumprod.float(), 0.5, 4)
    latents = seen["latents"].detach()
    assert torch.allclose(seen["latents"].grad * 8, latents - target, atol=1e-5 * (latents - target).abs().max().item())


def test_the_reconstruction_loss_refuses_an_sds_gradient_clip_in_one_line():
    from perpneg3d.errors import ConfigError
    from perpneg3d.guidance.sds import ScoreDistillation

    class Schedule:
        num_train_timesteps = 1000
        alphas_cumprod = torch.linspace(0.999, 0.01, 1000)

    with pytest.raises(ConfigError, match=r"^guidance.grad_clip=2.0 clips the SDS gradient, which guidance.recon_loss="
                                          r"true replaces: remove one of them$"):
        ScoreDistillation(Schedule(), recon_loss=True, grad_clip=2.0)
