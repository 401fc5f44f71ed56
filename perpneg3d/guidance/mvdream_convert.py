"""MVDream's original checkpoint (ldm layout, e.g. sd-v2.1-base-4view.pt) to a diffusers folder `guidance=mvdream`
loads (issue 29; docs/priors.md, "MVDream"). Run through scripts/convert_mvdream.py.

MVDream's UNet is the ldm UNet of its base model with `camera_embed` (Linear(16, D), SiLU, Linear(D, D)) beside
`time_embed`; its transformer blocks keep the ldm key names (only their forward differs). So the conversion is
diffusers' own ldm converter (`convert_ldm_unet_checkpoint`) with the camera MLP renamed to the place that
converter maps to a projection class embedding (`label_emb.0.*` -> `class_embedding.linear_*`).

The text encoder and the VAE are taken from the base model's diffusers folder (SD 2.1-base for
sd-v2.1-base-4view): MVDream trains the UNet only (its config freezes the OpenCLIP encoder, and the first stage of
a latent diffusion model is never trained), so the checkpoint's copies are the base model's.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from perpneg3d.errors import ConfigError, first_line
from perpneg3d.guidance.mvdream import MVDREAM_SAMPLE_SIZE, multiview_config

LDM_UNET = "model.diffusion_model."
CAMERA_EMBED = "camera_embed."
# where diffusers' ldm converter reads a projection class embedding (class_embed_type "projection")
LDM_PROJECTION = "label_emb.0."


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state dict of an ldm-layout checkpoint (.pt/.ckpt, plain or under "state_dict"; or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' is not a file: pass MVDream's sd-v2.1-base-4view.pt (ldm layout)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def unet_state_dict(checkpoint: dict, unet_config: dict) -> dict:
    """The multi-view UNet's weights in diffusers' layout from an MVDream ldm state dict, for the diffusers UNet
    config `unet_config` (the base model's, to which multiview_config adds the camera embedding)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = {k: v for k, v in checkpoint.items() if k.startswith(LDM_UNET)}
    if not unet:
        raise ConfigError(f"the checkpoint has no '{LDM_UNET}*' weights: it is not an ldm-layout model "
                          "(pass MVDream's original sd-v2.1-base-4view.pt)")
    if not any(k.startswith(LDM_UNET + CAMERA_EMBED) for k in unet):
        raise ConfigError(f"the checkpoint's UNet has no '{CAMERA_EMBED}*' weights: it is a single-view model, not "
                          "MVDream (for Stable Diffusion use guidance=sd21)")
    if any(k.startswith(LDM_UNET + LDM_PROJECTION) for k in unet):
        raise ConfigError(f"the checkpoint's UNet has both '{CAMERA_EMBED}*' and '{LDM_PROJECTION}*' weights: "
                          "an ldm layout this converter does not know")
    renamed = {k.replace(LDM_UNET + CAMERA_EMBED, LDM_UNET + LDM_PROJECTION, 1): v for k, v in unet.items()}
    return convert_ldm_unet_checkpoint(renamed, multiview_config(unet_config))


def convert(checkpoint: str | os.PathLike, base: str, out: str | os.PathLike, local_files_only: bool | None = None,
            sample_size: int = MVDREAM_SAMPLE_SIZE) -> Path:
    """Write a diffusers folder at `out` (which must not exist): the multi-view UNet converted from `checkpoint`,
    the tokenizer, text encoder, VAE and scheduler of the base model `base` (a diffusers folder or hub id)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out = Path(out)
    if out.exists():
        raise ConfigError(f"'{out}' exists: the converter never overwrites a folder; pass a new out=<folder>")
    kw = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw)
        scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
        base_unet = dict(UNet2DConditionModel.load_config(base, subfolder="unet", **kw))
    except OSError as err:
        raise ConfigError(f"base model '{base}' could not be read ({first_line(err)}): pass SD 2.1-base's diffusers folder "
                          "(stabilityai/stable-diffusion-2-1-base) with base=<folder>") from None
    weights = unet_state_dict(load_checkpoint(checkpoint), base_unet)
    config = multiview_config(base_unet)
    config["sample_size"] = int(sample_size)
    unet = UNet2DConditionModel(**config)
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"the checkpoint's UNet does not fit base '{base}' (missing {sorted(missing)[:3]}, unexpected "
                          f"{sorted(unexpected)[:3]}): pass the base model the checkpoint was fine-tuned from")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
