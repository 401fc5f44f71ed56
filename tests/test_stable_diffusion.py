"""Stable Diffusion behind the denoiser interface, on a tiny random pipeline built here."""
import logging

import pytest
import torch

from helpers import batched_and_single_eps

from perpneg3d.errors import ModelNotFoundError
from perpneg3d.guidance.ddim_sampler import sample
from perpneg3d.guidance.denoiser import Denoiser
from perpneg3d.guidance.stable_diffusion import SD15, SD21_BASE, StableDiffusion


def test_implements_denoiser_interface(tiny_sd):
    assert isinstance(tiny_sd, Denoiser)
    assert tiny_sd.num_train_timesteps == 1000 and tiny_sd.alphas_cumprod.shape == (1000,)
    assert tiny_sd.image_size == 32 and tiny_sd.latent_shape(32, 32) == (4, 16, 16)


def test_cfg_sampler_matches_diffusers_pipeline(tiny_sd, tiny_sd_path):
    """Cross-check against code nobody here wrote: diffusers' own StableDiffusionPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a corgi standing", num_inference_steps=4, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = sample(tiny_sd, tiny_sd.embed(["", "a corgi standing"]), torch.zeros(0), 1, scale=7.5, mode="cfg",
                  steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-5)
    # Perp-Neg with negatives at weight 0 is exactly the same sampler
    emb = tiny_sd.embed(["", "a corgi standing", "a corgi standing, front view"])
    pn = sample(tiny_sd, emb, torch.zeros(1), 1, scale=7.5, mode="perpneg", steps=4,
                generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(pn, ref, atol=1e-5)
    pn2 = sample(tiny_sd, emb, torch.ones(1) * 3, 1, scale=7.5, mode="perpneg", steps=4,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.allclose(pn2, ref, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_sd_v_path(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


def test_v_prediction_model_gives_epsilon(tiny_sd, tiny_sd_v_path):
    """Same weights, saved as v-prediction: eps() = sqrt(abar) * unet_out + sqrt(1 - abar) * x_t."""
    v_model = StableDiffusion(str(tiny_sd_v_path), device="cpu")
    assert v_model.prediction_type == "v_prediction" and tiny_sd.prediction_type == "epsilon"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([50, 700])
    emb = tiny_sd.embed(["", "a corgi"])
    with torch.no_grad():
        raw = tiny_sd.eps(x, t, emb)  # the epsilon model's eps() is the raw UNet output of the same weights
        eps = v_model.eps(x, t, emb)
    abar = tiny_sd.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(eps, abar.sqrt() * raw + (1 - abar).sqrt() * x, atol=1e-6)
    assert not torch.allclose(eps, raw, atol=1e-2)


def test_v_prediction_sampler_matches_diffusers_pipeline(tiny_sd_v_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    v_model = StableDiffusion(str(tiny_sd_v_path), device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_v_path), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a corgi standing", num_inference_steps=4, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = sample(v_model, v_model.embed(["", "a corgi standing"]), torch.zeros(0), 1, scale=7.5, mode="cfg",
                  steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_unsupported_prediction_type_is_refused(tmp_path):
    from tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sample", prediction_type="sample")
    with pytest.raises(ModelNotFoundError, match=r"predicts 'sample' \(scheduler prediction_type\); perpneg3d reads "
                                                 r"epsilon and v_prediction models"):
        StableDiffusion(str(folder), device="cpu")


def test_batched_unet_call_equals_per_prompt_calls(tiny_sd):
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    batched, single = batched_and_single_eps(tiny_sd, x, torch.tensor([10, 500, 900]),
                                             ["", "a corgi, side view", "a corgi, front view"])
    assert torch.allclose(batched, single, atol=1e-5) and not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_embedding_cache_and_order(tiny_sd):
    a = tiny_sd.embed(["a dog", "a cat"])
    b = tiny_sd.embed(["a cat", "a dog", "a cat"])
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and torch.equal(b[0], b[2])
    assert not torch.allclose(a[0], a[1])


def test_encode_is_differentiable_and_decode_in_range(tiny_sd):
    rgb = torch.rand(2, 3, 24, 24, requires_grad=True)
    lat = tiny_sd.encode(rgb)
    assert lat.shape == (2, 4, 16, 16)
    lat.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    img = tiny_sd.decode(lat.detach())
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_over_long_prompt_warns_with_dropped_count(tiny_sd, caplog):
    prompt = " ".join(["corgi"] * 90)  # 90 words + start/end = 92 tokens
    with caplog.at_level(logging.WARNING):
        tiny_sd.embed([prompt])
    assert "92 tokens long; the last 15 are dropped" in caplog.text


def test_missing_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError) as err:
        StableDiffusion(str(missing), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and SD21_BASE in msg and SD15 in msg


def test_missing_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        StableDiffusion("nobody/not-a-model", device="cpu")
    assert "nobody/not-a-model" in str(err.value) and "offline" in str(err.value) and "\n" not in str(err.value)


def test_sampler_time_ramp_that_never_opens_is_plain_cfg(tiny_sd):
    """neg_time_ramp=(1, 1): f(t) = 0 at every t < T, so Perp-Neg at weight 3 samples exactly as CFG."""
    emb = tiny_sd.embed(["", "a corgi standing", "a corgi standing, front view"])
    run = lambda **kw: sample(tiny_sd, emb, torch.ones(1) * 3, 1, scale=7.5, steps=3, progress=False,  # noqa: E731
                              generator=torch.Generator().manual_seed(0), **kw)
    cfg = sample(tiny_sd, emb[:2], torch.zeros(0), 1, scale=7.5, mode="cfg", steps=3, progress=False,
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run(mode="perpneg", neg_time_ramp=(1.0, 1.0)), cfg, atol=1e-6)
    assert not torch.allclose(run(mode="perpneg"), cfg, atol=1e-3)
