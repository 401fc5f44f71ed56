"""DeepFloyd IF stage I (pixel space, 64x64, T5 text encoder) behind the denoiser interface.

An open model of Imagen's design, the prior DreamFusion used. No VAE: encode() resizes the render to the
UNet's size and maps it to [-1, 1]. IF's UNet predicts noise and variance (6 channels); eps() returns
the noise part. Layout, Perp-Neg and SDS are the same code as for Stable Diffusion (docs/priors.md).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from perpneg3d.devices import resolve_device
from perpneg3d.errors import ModelNotFoundError, first_line
from perpneg3d.guidance.pretrained import (embed_cached, looks_like_path, offline_note, prepare_load,
                                           random_text_embedding, resolve_dtype, warn_if_truncated)

log = logging.getLogger(__name__)

IF_I_XL = "DeepFloyd/IF-I-XL-v1.0"
MAX_LENGTH = 77  # IFPipeline.encode_prompt's token count (T5 itself reads up to 512)

# IF-I-XL's UNet (4.3B parameters): the diffusers conversion of its released config (model_channels 704,
# channel_mult 1,2,3,4, 3 res blocks, attention at 1/2, 1/4, 1/8 resolution, 64-dim heads, T5-XXL 4096-dim
# states projected to 2816). Built with random weights by --prior if-random; 4,304,695,110 parameters.
IF_I_XL_UNET = {
    "sample_size": 64, "in_channels": 3, "out_channels": 6, "layers_per_block": 3,
    "block_out_channels": (704, 1408, 2112, 2816),
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "cross_attention_dim": 2816, "attention_head_dim": 64,
    "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj", "addition_embed_type": "text",
    "addition_embed_type_num_heads": 64, "act_fn": "gelu", "resnet_time_scale_shift": "scale_shift",
    "cross_attention_norm": "group_norm", "upcast_attention": False,
}
# IF stage I's scheduler (as the diffusers conversion saves it).
IF_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
                "prediction_type": "epsilon", "thresholding": True, "dynamic_thresholding_ratio": 0.95,
                "sample_max_value": 1.5}


def _missing_model_message(name: str, reason: str) -> str:
    page = IF_I_XL if looks_like_path(name) else name
    return (f"cannot load DeepFloyd IF '{name}'{offline_note()}: {reason.rstrip('.')}. IF is gated: accept its licence at "
            f"https://huggingface.co/{page} and log in (huggingface-cli login or HF_TOKEN), or use a local diffusers "
            "folder: guidance.denoiser.pretrained_model_name_or_path=/path/to/folder")


class DeepFloydIF:
    """Frozen DeepFloyd IF stage I: T5 encoder, UNet and scheduler from diffusers / transformers.

    fp16 on CUDA, fp32 on CPU by default. offload_text_encoder: the T5 encoder (4.8B parameters for
    IF's T5-XXL, 9.5 GB in fp16) lives on the CPU and visits the device only while embedding prompts,
    which happens once per run (prompts are embedded when bound); text_encoder_bytes says how much
    device memory that keeps free. variant "auto" downloads the hub's fp16 files when running in fp16.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = IF_I_XL,
        torch_dtype: str = "auto",
        device: str = "auto",
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = "auto",
        offload_text_encoder: bool = True,
        channels_last: bool = True,
        enable_attention_slicing: bool = False,
        compile: bool = False,
    ):
        import transformers
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        self.name = str(pretrained_model_name_or_path)
        self.device, self.dtype, src, kw = prepare_load(self.name, device, torch_dtype, local_files_only, revision,
                                                        _missing_model_message)
        if variant == "auto":  # the hub's half-size files, for a hub id run in fp16
            variant = "fp16" if self.dtype == torch.float16 and not looks_like_path(self.name) else None
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
            self.text_encoder = T5EncoderModel.from_pretrained(src, subfolder="text_encoder", variant=variant,
                                                               **{dtype_key: self.dtype}, **kw)
            self.unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", variant=variant,
                                                             torch_dtype=self.dtype, **kw)
            self.scheduler_config = dict(DDPMScheduler.load_config(src, subfolder="scheduler", **kw))
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(_missing_model_message(self.name, first_line(err))) from None
        self._finish_setup(offload_text_encoder, channels_last, enable_attention_slicing, compile)

    def _finish_setup(self, offload_text_encoder: bool = True, channels_last: bool = True,
                      enable_attention_slicing: bool = False, compile: bool = False) -> None:
        from diffusers import DDPMScheduler

        self.offload_text_encoder = offload_text_encoder and self.device.type != "cpu"
        self.text_encoder_bytes = 0
        if self.text_encoder is not None:
            self.text_encoder_bytes = sum(p.numel() * p.element_size() for p in self.text_encoder.parameters())
            self.text_encoder.to("cpu" if self.offload_text_encoder else self.device).eval().requires_grad_(False)
            if self.offload_text_encoder:
                log.info("T5 encoder kept on the CPU between embeddings: %.1f GB of %s memory stays free",
                         self.text_encoder_bytes / 1e9, self.device)
        self.unet.to(self.device).eval().requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if enable_attention_slicing:
            self.unet.set_attention_slice("auto")
        self._unet_call = torch.compile(self.unet) if compile else self.unet
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if scheduler.config.prediction_type != "epsilon":
            raise ModelNotFoundError(f"DeepFloyd IF '{self.name}' predicts {scheduler.config.prediction_type!r}: "
                                     "perpneg3d reads IF stage I models, which predict epsilon")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.image_size = int(self.unet.config.sample_size)
        self._cache: dict[str, Tensor] = {}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (int(self.unet.config.in_channels), height, width)  # pixel space

    def _encode_text(self, texts: list[str]) -> Tensor:
        # as IFPipeline without caption cleaning: lower-cased, stripped, 77 tokens, attention mask to T5
        texts = [t.lower().strip() for t in texts]
        warn_if_truncated(self.tokenizer, texts, MAX_LENGTH)
        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        encoder = self.text_encoder.to(self.device) if self.offload_text_encoder else self.text_encoder
        with torch.no_grad():
            emb = encoder(tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device))[0]
        if self.offload_text_encoder:
            self.text_encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return emb.to(self.dtype)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """T5 hidden states [N,77,4096] for N texts, each computed once and cached."""
        return embed_cached(self._cache, texts, self._encode_text)

    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [B,3,H,W] in [0,1] -> the UNet's input [B,3,64,64] in [-1,1] (float32, differentiable)."""
        size = (self.image_size, self.image_size)
        return F.interpolate(rgb.float(), size, mode="bilinear", align_corners=False) * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """One batched UNet call; the noise half of IF's [noise | variance] output, float32."""
        x = latents_t.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._unet_call(x, t.to(self.device), encoder_hidden_states=text_emb.to(self.dtype), return_dict=False)[0]
        return out[:, : latents_t.shape[1]].float()


class RandomDeepFloydIF(DeepFloydIF):
    """IF-I-XL's UNet with random weights (no download, no licence): step time and memory of the real model.

    Text embeddings are fixed random [77, 4096] tensors per string (text encoding is cached and never
    part of a step)."""

    def __init__(self, device: str = "auto", torch_dtype: str = "auto", seed: int = 0, channels_last: bool = True):
        from diffusers import UNet2DConditionModel

        self.name = "random IF-I-XL"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(torch_dtype, self.device)
        self.tokenizer, self.text_encoder = None, None
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**IF_I_XL_UNET)
        if self.dtype != torch.float32:
            self.unet.to(self.dtype)
        self.scheduler_config = dict(IF_SCHEDULER)
        self._finish_setup(channels_last=channels_last)

    def _encode_text(self, texts: list[str]) -> Tensor:
        dim = int(self.unet.config.encoder_hid_dim)
        return random_text_embedding(texts, MAX_LENGTH, dim).to(self.device, self.dtype)
