"""MVDream's original checkpoint (ldm layout) to the diffusers folder guidance=mvdream loads (issue 29).

The ldm-layout state dicts here are written from MVDream's model code (mvdream/ldm/modules/diffusionmodules/
openaimodel.py, MultiViewUNetModel): its module names and shapes for a small configuration, random values."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from perpneg3d.errors import ConfigError
from perpneg3d.guidance.mvdream import multiview_config
from perpneg3d.guidance.mvdream_convert import unet_state_dict

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def ldm_multiview_unet(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=32,
                       camera_dim=16, linear_transformer=True, seed=0) -> dict:
    """An MVDream UNet's state dict in ldm names (prefix model.diffusion_model.), num_res_blocks 1, transformer
    depth 1, random values: ResBlocks (in_layers / emb_layers / out_layers / skip_connection), SpatialTransformer3D
    (norm, proj_in, transformer_blocks.0.{attn1,ff,attn2,norm1-3}, proj_out), Downsample.op, Upsample.conv,
    time_embed and camera_embed (Linear, SiLU, Linear), out."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    temb = model_channels * 4

    def put(name, *shape):
        sd["model.diffusion_model." + name] = torch.randn(*shape, generator=g)

    def linear(name, n_out, n_in, bias=True):
        put(name + ".weight", n_out, n_in)
        if bias:
            put(name + ".bias", n_out)

    def conv(name, n_out, n_in, k=3):
        put(name + ".weight", n_out, n_in, k, k)
        put(name + ".bias", n_out)

    def norm(name, n):
        put(name + ".weight", n)
        put(name + ".bias", n)

    def resblock(name, ch, out):
        norm(f"{name}.in_layers.0", ch)
        conv(f"{name}.in_layers.2", out, ch)
        linear(f"{name}.emb_layers.1", out, temb)
        norm(f"{name}.out_layers.0", out)
        conv(f"{name}.out_layers.3", out, out)
        if ch != out:
            conv(f"{name}.skip_connection", out, ch, 1)

    def transformer(name, ch):
        norm(f"{name}.norm", ch)
        (linear if linear_transformer else conv)(f"{name}.proj_in", ch, ch, *(() if linear_transformer else (1,)))
        b = f"{name}.transformer_blocks.0"
        for attn, kv in (("attn1", ch), ("attn2", context_dim)):
            linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
            linear(f"{b}.{attn}.to_k", ch, kv, bias=False)
            linear(f"{b}.{attn}.to_v", ch, kv, bias=False)
            linear(f"{b}.{attn}.to_out.0", ch, ch)
        linear(f"{b}.ff.net.0.proj", ch * 8, ch)  # GEGLU: 2 x (4 ch)
        linear(f"{b}.ff.net.2", ch, ch * 4)
        for n in (1, 2, 3):
            norm(f"{b}.norm{n}", ch)
        (linear if linear_transformer else conv)(f"{name}.proj_out", ch, ch, *(() if linear_transformer else (1,)))

    linear("time_embed.0", temb, model_channels)
    linear("time_embed.2", temb, temb)
    linear("camera_embed.0", temb, camera_dim)
    linear("camera_embed.2", temb, temb)
    conv("input_blocks.0.0", model_channels, 4)
    chans, ch, block = [model_channels], model_channels, 1
    for level, mult in enumerate(channel_mult):
        resblock(f"input_blocks.{block}.0", ch, mult * model_channels)
        ch = mult * model_channels
        if level in attention_levels:
            transformer(f"input_blocks.{block}.1", ch)
        chans.append(ch)
        block += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{block}.0.op", ch, ch)
            chans.append(ch)
            block += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    block = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(2):
            resblock(f"output_blocks.{block}.0", ch + chans.pop(), model_channels * mult)
            ch = model_channels * mult
            layer = 1
            if level in attention_levels:
                transformer(f"output_blocks.{block}.1", ch)
                layer = 2
            if level and i == 1:
                conv(f"output_blocks.{block}.{layer}.conv", ch, ch)
            block += 1
    norm("out.0", ch)
    conv("out.2", 4, model_channels)
    return sd


BASE = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True)


def test_the_ldm_unet_maps_onto_the_multiview_unet_one_to_one():
    """Every ldm tensor lands in exactly one diffusers parameter, none missing or unexpected; the camera MLP, the
    input conv, a joint self-attention's query, the upsampler and the last resnet land where the architectures
    put them (checked by value); the camera embedding computed by hand from the ldm tensors is the UNet's."""
    from diffusers import UNet2DConditionModel

    ldm = ldm_multiview_unet()
    ldm["cond_stage_model.model.positional_embedding"] = torch.zeros(3)  # other parts of the model are left out
    got = unet_state_dict(ldm, BASE)
    unet = UNet2DConditionModel(**multiview_config(BASE))
    missing, unexpected = unet.load_state_dict(got, strict=False)
    assert missing == [] and unexpected == []
    assert len(got) == len(ldm) - 1 and {v.data_ptr() for v in got.values()} == \
        {v.data_ptr() for k, v in ldm.items() if k.startswith("model.")}
    p = "model.diffusion_model."
    pairs = {"class_embedding.linear_1.weight": "camera_embed.0.weight", "class_embedding.linear_2.bias": "camera_embed.2.bias",
             "time_embedding.linear_1.weight": "time_embed.0.weight", "conv_in.weight": "input_blocks.0.0.weight",
             "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.2.0.op.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight":
                 "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
             "mid_block.resnets.1.conv2.weight": "middle_block.2.out_layers.3.weight",
             "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.1.2.conv.weight",
             "up_blocks.1.resnets.1.conv_shortcut.weight": "output_blocks.3.0.skip_connection.weight",
             "conv_norm_out.weight": "out.0.weight", "conv_out.bias": "out.2.bias"}
    for new, old in pairs.items():
        assert torch.equal(got[new], ldm[p + old]), new
    cam = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    hidden = torch.nn.functional.silu(cam @ ldm[p + "camera_embed.0.weight"].T + ldm[p + "camera_embed.0.bias"])
    want = hidden @ ldm[p + "camera_embed.2.weight"].T + ldm[p + "camera_embed.2.bias"]
    with torch.no_grad():
        assert torch.allclose(unet.class_embedding(cam), want, atol=1e-5)


def test_single_view_and_foreign_checkpoints_are_refused_in_one_line():
    ldm = ldm_multiview_unet()
    plain = {k: v for k, v in ldm.items() if ".camera_embed." not in k}
    with pytest.raises(ConfigError, match=r"^the checkpoint's UNet has no 'camera_embed\.\*' weights: .*guidance=sd21"):
        unet_state_dict(plain, BASE)
    with pytest.raises(ConfigError, match=r"no 'model\.diffusion_model\.\*' weights"):
        unet_state_dict({"unet.conv_in.weight": torch.zeros(1)}, BASE)


def test_the_script_writes_a_folder_mvdream_loads(tmp_path, tiny_sd_path):
    """scripts/convert_mvdream.py on an ldm checkpoint fitted to the tiny SD base: the folder loads through
    guidance=mvdream's class, its UNet holds the checkpoint's weights at MVDream's sample size, its text encoder
    is the base's; a second run refuses to overwrite the folder, in one line."""
    from diffusers import UNet2DConditionModel

    from perpneg3d.guidance.mvdream import MVDream

    ldm = ldm_multiview_unet(linear_transformer=False)  # the tiny SD's UNet projects with 1x1 convolutions
    ckpt = tmp_path / "mv.pt"
    torch.save({"state_dict": ldm}, ckpt)
    out = tmp_path / "models" / "mv"
    cmd = [sys.executable, "scripts/convert_mvdream.py", f"checkpoint={ckpt}", f"base={tiny_sd_path}", f"out={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"guidance.denoiser.pretrained_model_name_or_path={out}" in done.stdout
    den = MVDream(str(out), device="cpu")
    assert den.unet.config.sample_size == 32 and den.image_size == 32 * den.vae_scale_factor
    assert torch.equal(den.unet.class_embedding.linear_1.weight, ldm["model.diffusion_model.camera_embed.0.weight"])
    base_te = __import__("transformers").CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(den.text_encoder.state_dict().values(), base_te.state_dict().values()))
    assert UNet2DConditionModel.load_config(out, subfolder="unet")["class_embed_type"] == "projection"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: '{out}' exists: the converter never overwrites a folder; pass a new out=<folder>"]
