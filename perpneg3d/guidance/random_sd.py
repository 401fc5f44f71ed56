"""Stable Diffusion built from its architecture configs with random weights (no download).

Speed and memory do not depend on the weights, so a random full-size SD 2.1-base UNet and VAE measure
the real cost of a step on any machine, offline; the tiny variant makes the same code path run in
seconds on a CPU (gpu_check.py --tiny, tests). Text embeddings are fixed random tensors per string:
text encoding is cached and never part of a step.
"""
from __future__ import annotations

import torch

from perpneg3d.devices import resolve_device
from perpneg3d.guidance.mvdream import MVDREAM_SAMPLE_SIZE, MVDream, multiview_config, set_multiview_attention
from perpneg3d.guidance.pretrained import random_text_embedding, resolve_dtype
from perpneg3d.guidance.stable_diffusion import StableDiffusion

# Stable Diffusion 2.1-base (sd2-community mirror): UNet, VAE and scheduler configs.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    norm_num_groups=32, scaling_factor=0.18215,
)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
# The tiny test pipeline's shapes (32x32 images, 4x16x16 latents, 32-dim text states).
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8,
)
TINY_VAE = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
SIZES = {"sd21": (SD21_UNET, SD21_VAE), "tiny": (TINY_UNET, TINY_VAE)}


class RandomStableDiffusion(StableDiffusion):
    """Stable Diffusion of a known architecture ("sd21" full size, or "tiny") with random weights."""

    def __init__(self, size: str = "sd21", device: str = "auto", torch_dtype: str = "auto", seed: int = 0, **speed):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if size not in SIZES:
            raise ValueError(f"size={size!r}: use one of {', '.join(SIZES)}")
        unet_config, vae_config = SIZES[size]
        self.name = f"random {size} Stable Diffusion"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(torch_dtype, self.device)
        self.tokenizer, self.text_encoder = None, None
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**self.unet_config(unet_config)).to(self.dtype)
        self.vae = AutoencoderKL(**vae_config).to(self.dtype)
        self.scheduler_config = dict(SD21_SCHEDULER)
        self._finish_setup(**speed)

    def unet_config(self, config: dict) -> dict:
        """The UNet's config from the architecture's (a subclass changes it: RandomMVDream)."""
        return config

    def _encode_text(self, texts):
        return random_text_embedding(texts, 77, int(self.unet.config.cross_attention_dim)).to(self.device, self.dtype)


class RandomMVDream(RandomStableDiffusion, MVDream):
    """MVDream of a known architecture ("sd21": SD 2.1-base's UNet with the camera embedding and the joint attention
    over `views_per_group` views, at MVDream's 256 px; or "tiny") with random weights: the real cost of a multi-view
    SDS step, offline (gpu_check.py's mvdream_step)."""

    def __init__(self, size: str = "sd21", views_per_group: int = 4, device: str = "auto", torch_dtype: str = "auto",
                 seed: int = 0, **speed):
        super().__init__(size, device, torch_dtype, seed, **speed)
        self.name = f"random {size} MVDream"
        self.views_per_group = int(views_per_group)
        set_multiview_attention(self.unet, self.views_per_group)

    def unet_config(self, config: dict) -> dict:
        out = multiview_config(config)
        if config is SD21_UNET:
            out["sample_size"] = MVDREAM_SAMPLE_SIZE
        return out
