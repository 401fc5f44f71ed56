"""DeepFloyd IF stage I behind the denoiser interface, on a tiny random IF folder built here (tests/tiny_if.py)."""
import json

import pytest
import torch

from helpers import batched_and_single_eps
from perpneg3d.errors import ModelNotFoundError
from perpneg3d.guidance.ddim_sampler import sample
from perpneg3d.guidance.deepfloyd_if import IF_I_XL, IF_I_XL_UNET, DeepFloydIF
from perpneg3d.guidance.denoiser import Denoiser


def test_implements_denoiser_interface(tiny_if):
    assert isinstance(tiny_if, Denoiser)
    assert tiny_if.image_size == 32 and tiny_if.latent_shape(32, 32) == (3, 32, 32)  # pixel space, no VAE
    assert tiny_if.num_train_timesteps == 1000
    # squaredcos_cap_v2: abar_t = cos^2(((t+1)/T + s)/(1 + s) pi/2) / cos^2(s/(1 + s) pi/2), s = 0.008, beta <= 0.999
    s, t = 0.008, torch.arange(1000, dtype=torch.float64)
    f = lambda x: torch.cos((x / 1000 + s) / (1 + s) * torch.pi / 2) ** 2  # noqa: E731
    beta = (1 - f(t + 1) / f(t)).clamp(max=0.999)
    assert torch.allclose(tiny_if.alphas_cumprod.double(), torch.cumprod(1 - beta, 0), atol=1e-6)


def ifpipeline(path):
    """diffusers' own IFPipeline on the same folder, with the DDIM the 2D sampler uses. variance_type is set to a
    fixed one so that the pipeline drops the UNet's variance half, as DeepFloydIF.eps does."""
    from diffusers import DDIMScheduler, IFPipeline

    pipe = IFPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None, watermarker=None,
                                      requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "variance_type": "fixed_small"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scale", [7.0, 20.0])
def test_cfg_sampler_matches_ifpipeline(tiny_if, tiny_if_path, scale):
    """Cross-check against code nobody here wrote: same seed, steps and scale give IFPipeline's image."""
    pipe = ifpipeline(tiny_if_path)
    ref = pipe(prompt="a corgi standing", num_inference_steps=4, guidance_scale=scale, clean_caption=False,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    ref = (ref / 2 + 0.5).clamp(0, 1)  # output_type "pt" leaves IF's [-1, 1] range
    ours = sample(tiny_if, tiny_if.embed(["", "a corgi standing"]), torch.zeros(0), 1, scale=scale, mode="cfg",
                  steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-6)
    # Perp-Neg with its negative at weight 0 is the same sampler; at weight 3 it is not
    emb = tiny_if.embed(["", "a corgi standing", "a corgi standing, front view"])
    run = lambda w: sample(tiny_if, emb, torch.full((1,), w), 1, scale=scale, mode="perpneg", steps=4,  # noqa: E731
                           generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(run(0.0), ref, atol=1e-3)  # 3 prompts a batch, not 2: rounding (1e-6 per call) x scale
    assert (run(3.0) - ref).abs().max() > 0.05


def test_channels_last_changes_only_rounding(tiny_if, tiny_if_path):
    fast = DeepFloydIF(str(tiny_if_path), device="cpu", channels_last=True)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    emb = tiny_if.embed(["a dog", "a cat"])
    with torch.no_grad():
        assert torch.allclose(fast.eps(x, t, emb), tiny_if.eps(x, t, emb), atol=1e-4)


def test_eps_is_the_noise_half_of_the_unet_output(tiny_if):
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 900])
    emb = tiny_if.embed(["a dog", "a dog, back view"])
    with torch.no_grad():
        full = tiny_if.unet(x, t, encoder_hidden_states=emb).sample
        eps = tiny_if.eps(x, t, emb)
    assert full.shape == (2, 6, 32, 32)
    assert torch.equal(eps, full[:, :3]) and not torch.allclose(eps, full[:, 3:], atol=1e-3)


def test_batched_unet_call_equals_per_prompt_calls(tiny_if):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batched, single = batched_and_single_eps(tiny_if, x, torch.tensor([10, 500, 900]),
                                             ["", "a corgi, side view", "a corgi, front view"])
    assert torch.allclose(batched, single, atol=1e-5) and not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_embeddings_follow_ifpipeline_and_are_cached(tiny_if, tiny_if_path):
    pipe = ifpipeline(tiny_if_path)
    pos, neg = pipe.encode_prompt("A Corgi standing ", negative_prompt="", clean_caption=False)
    emb = tiny_if.embed(["", "A Corgi standing "])
    assert torch.equal(emb[1], pos[0]) and torch.equal(emb[0], neg[0])  # lower-cased and stripped, as IFPipeline
    again = tiny_if.embed(["a corgi standing", "", "a corgi standing"])
    assert torch.equal(again[0], again[2]) and torch.equal(again[1], emb[0])
    assert not torch.allclose(emb[0], emb[1])


def test_encode_resizes_to_the_unet_size_in_minus_one_to_one(tiny_if):
    rgb = torch.tensor([[0.0, 1.0], [0.25, 0.75]]).expand(1, 3, 2, 2).clone().requires_grad_(True)
    x = tiny_if.encode(rgb)
    assert x.shape == (1, 3, 32, 32)
    assert x.min() == -1 and x.max() == 1  # 0 -> -1, 1 -> +1; bilinear keeps the corners' values
    assert torch.isclose(x[0, 0, 0, 0], torch.tensor(-1.0)) and torch.isclose(x[0, 0, -1, -1], torch.tensor(0.5))
    x.sum().backward()
    assert rgb.grad.abs().sum() > 0
    native = torch.rand(2, 3, 32, 32)
    assert torch.allclose(tiny_if.decode(tiny_if.encode(native)), native, atol=1e-6)  # a render at 32 px round-trips


def test_text_encoder_size_is_reported(tiny_if):
    expected = sum(p.numel() for p in tiny_if.text_encoder.parameters()) * 4  # float32 on the CPU
    assert tiny_if.text_encoder_bytes == expected and not tiny_if.offload_text_encoder  # nothing to offload on CPU


def test_if_i_xl_config_has_the_published_size():
    """The --prior if-random UNet is IF-I-XL's: 4.3B parameters (counted on the meta device, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**IF_I_XL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 4_304_695_110


def test_missing_folder_names_the_licence_and_the_local_option(tmp_path):
    missing = tmp_path / "no_such_if"
    with pytest.raises(ModelNotFoundError) as err:
        DeepFloydIF(str(missing), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "no such folder" in msg
    assert f"https://huggingface.co/{IF_I_XL}" in msg and "pretrained_model_name_or_path=" in msg


def test_gated_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        DeepFloydIF(IF_I_XL, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "offline" in msg and "licence" in msg and "HF_TOKEN" in msg


@pytest.mark.parametrize("prompts", ["perpneg", "stable_dreamfusion", "plain"])
def test_train_with_guidance_if_on_the_tiny_model(prompts, tiny_if_path, tmp_path):
    """guidance=if is one config file: the trainer, every prompts option and Perp-Neg run it unchanged."""
    from helpers import compose_train

    from perpneg3d.training.run import train

    run_dir = train(compose_train([
        "guidance=if", f"guidance.denoiser.pretrained_model_name_or_path={tiny_if_path}", "guidance.denoiser.device=cpu",
        f"prompts={prompts}", "prompt=a corgi standing", "geometry.n_levels=4", "geometry.log2_hashmap_size=12",
        "geometry.finest_resolution=64", "renderer.num_samples_per_ray=16", "cameras.heights=[16]",
        "cameras.widths=[16]", "cameras.batch_size=2", "trainer.max_steps=3", "trainer.val_every=3",
        "trainer.val_resolution=16", "trainer.turntable_frames=4", "trainer.turntable_resolution=16",
        "trainer.progress=false", "~export"], tmp_path))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["final"]["loss_sds"] > 0
    cfg = (run_dir / "config.yaml").read_text()
    assert "perpneg3d.guidance.deepfloyd_if.DeepFloydIF" in cfg and "guidance_scale: 20.0" in cfg  # threestudio IF
    assert "min_step_percent: 0.02" in cfg and "max_step_percent: 0.98" in cfg
    assert (run_dir / "ckpts" / "step_0000003.ckpt").is_file() and (run_dir / "val" / "step_0000003.png").is_file()
    assert (run_dir / "turntable.png").is_file()
