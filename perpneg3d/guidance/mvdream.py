"""MVDream's multi-view UNet in diffusers' layout (issue 29, first part; docs/architecture.md, "A multi-view prior").

MVDream (Shi et al. 2023, bytedance/MVDream, MIT) is SD 2.1-base's UNet with two changes, both expressed here
with diffusers' own parts, no code of MVDream's:

- a camera embedding added to the timestep embedding: the camera's flattened 4x4 matrix through Linear(16, D),
  SiLU, Linear(D, D), which is diffusers' `class_embed_type="projection"` with
  `projection_class_embeddings_input_dim=16` (`multiview_config`);
- the self-attention (attn1) of every transformer block attends over the tokens of the f views of a group jointly,
  `(b f) l c -> b (f l) c`; cross-attention and the feed-forward stay per view (`MultiViewAttnProcessor`).

Cameras (`mvdream_cameras`): MVDream's are OpenGL camera-to-world matrices in a z-up world whose azimuth 0 sits
on -y (its get_camera: a y-up world turned z-up by a fixed flip), translation scaled to unit length, flattened row
by row. perpneg3d's world has azimuth 0 on +x (docs/conventions.md), so a turn of -90 degrees about z maps ours to
its: (x, y, z) -> (y, -x, z). The same azimuth and elevation then give the same matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor

from perpneg3d.errors import ConfigError, ModelNotFoundError
from perpneg3d.guidance.pretrained import offline_note
from perpneg3d.guidance.stable_diffusion import StableDiffusion

CAMERA_DIM = 16  # a flattened 4x4 matrix
MVDREAM_SAMPLE_SIZE = 32  # MVDream trains 4 views of 256 x 256 (latents 32 x 32; its configs' image_size)
TO_MVDREAM_WORLD = torch.tensor([[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def mvdream_cameras(c2w: Tensor) -> Tensor:
    """[B,16] MVDream's camera conditioning for perpneg3d camera-to-world matrices c2w [B,4,4] (OpenGL axes)."""
    m = (TO_MVDREAM_WORLD.to(c2w) @ c2w).clone()
    m[:, :3, 3] = m[:, :3, 3] / m[:, :3, 3].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return m.reshape(-1, CAMERA_DIM)


class MultiViewAttnProcessor:
    """diffusers' scaled-dot-product attention, with a self-attention's tokens gathered across the `num_views`
    consecutive images of each group first: hidden states [(b f), l, c] attend as [b, (f l), c]."""

    def __init__(self, num_views: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_views = int(num_views)
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or self.num_views == 1 or hidden_states.dim() != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        rows, tokens, channels = hidden_states.shape
        if rows % self.num_views:
            raise ValueError(f"{rows} images do not form groups of {self.num_views} views")
        joint = hidden_states.reshape(rows // self.num_views, self.num_views * tokens, channels)
        out = self.inner(attn, joint, None, attention_mask, temb, *args, **kwargs)
        return out.reshape(rows, tokens, channels)


def multiview_config(config: dict) -> dict:
    """A plain SD UNet's config with MVDream's camera embedding (the projection class embedding of 16 inputs)."""
    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    out.update(class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_DIM)
    return out


def set_multiview_attention(unet, num_views: int) -> None:
    """Joint self-attention over groups of `num_views` images in every transformer block of `unet`."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({name: MultiViewAttnProcessor(num_views) if name.endswith("attn1.processor")
                             else AttnProcessor2_0() for name in unet.attn_processors})


def multiview_unet(config: dict, num_views: int = 4, state_dict: dict | None = None):
    """A diffusers UNet2DConditionModel with MVDream's two changes, from a plain SD UNet's config; with
    `state_dict`, its weights (a plain UNet's load with the camera MLP left as initialised, strict otherwise)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**multiview_config(config))
    if state_dict is not None:
        missing, unexpected = unet.load_state_dict(state_dict, strict=False)
        bad = [k for k in missing if not k.startswith("class_embedding.")] + list(unexpected)
        if bad:
            raise ValueError(f"the UNet's weights do not fit the multi-view UNet: {bad[:5]}")
    set_multiview_attention(unet, num_views)
    return unet


def _missing_mvdream_message(name: str, reason: str) -> str:
    return (f"cannot load MVDream '{name}'{offline_note()}: {reason.rstrip('.')}. Convert MVDream's checkpoint once: "
            "python scripts/convert_mvdream.py checkpoint=<sd-v2.1-base-4view.pt> out=<folder>, then "
            "guidance.denoiser.pretrained_model_name_or_path=<folder>; offline without weights: guidance=toy_mv")


class MVDream(StableDiffusion):
    """MVDream behind the denoiser interface and contracts.MultiView: SD 2.1-base's text encoder and VAE with the
    multi-view UNet, from a diffusers folder whose UNet has the camera embedding (class_embed_type "projection" over
    16 values; its self-attention is made joint over `views_per_group` views here). scripts/convert_mvdream.py
    writes such a folder from MVDream's original checkpoint (sd-v2.1-base-4view.pt, ldm layout)."""

    def __init__(self, pretrained_model_name_or_path: str | None = None, views_per_group: int = 4, torch_dtype: str = "auto",
                 device: str = "auto", local_files_only: bool | None = None, revision: str | None = None,
                 enable_attention_slicing: bool = False, channels_last: bool = False, compile: bool = False,
                 cudnn_benchmark: bool = False):
        if not pretrained_model_name_or_path:
            raise ModelNotFoundError("guidance.denoiser.pretrained_model_name_or_path is not set: MVDream needs a diffusers "
                                     "folder whose UNet has its camera embedding (from MVDream's sd-v2.1-base-4view.pt: "
                                     "python scripts/convert_mvdream.py checkpoint=<file> out=<folder>); offline "
                                     "without weights: guidance=toy_mv")
        super().__init__(pretrained_model_name_or_path, torch_dtype, device, local_files_only, revision,
                         enable_attention_slicing, channels_last, compile, cudnn_benchmark)
        config = self.unet.config
        if config.class_embed_type != "projection" or config.projection_class_embeddings_input_dim != CAMERA_DIM:
            raise ModelNotFoundError(
                f"'{self.name}' is a Stable Diffusion without MVDream's camera embedding (its UNet's class_embed_type is "
                f"{config.class_embed_type!r}; MVDream's is 'projection' over {CAMERA_DIM} values): use a converted "
                "MVDream folder, or guidance=sd21 for Stable Diffusion")
        self.views_per_group = int(views_per_group)
        set_multiview_attention(self.unet, self.views_per_group)

    missing_model_message = staticmethod(_missing_mvdream_message)

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        raise ConfigError("MVDream conditions every image on its camera: it guides training (SDS), where guided_eps "
                          "calls eps_views with the cameras; 2D sampling without cameras is not supported")

    def eps_views(self, latents_t: Tensor, t: Tensor, text_emb: Tensor, c2w: Tensor) -> Tensor:
        """eps [N,4,h,w] for N = groups x views_per_group consecutive images and their cameras c2w [N,4,4]."""
        cameras = mvdream_cameras(c2w.float()).to(self.device, self.dtype)
        return self._eps(latents_t, t, text_emb, class_labels=cameras)
