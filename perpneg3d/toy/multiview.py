"""A multi-view toy prior (issue 29): the toy world's exact posterior-mean denoiser, conditioned on each image's
camera and denoising the views of a group jointly, as MVDream does for Stable Diffusion (contracts.MultiView).

Generative model of a group of V views with cameras c_1..c_V and texts p_1..p_V: one object o for the whole group;
each view v an image i of that object drawn with weight pi_i(p_v) k(c_v, c_i) (the caption prior of ToyPrior times a
camera kernel on the image's azimuth and elevation), then noised. With L_vi = log pi_i(p_v) + log k(c_v, c_i) +
log N(x_t^v; a x_i, v I) (ToyPrior's likelihood):

    evidence of o in view v:    l_vo = logsumexp_{i of o} L_vi
    the group's object:         log p(o) = log_softmax_o sum_v l_vo
    view v's weights:           w_vi = p(o_i) exp(L_vi - l_v,o_i)
    E[x_0^v | x_t^1..V] = sum_i w_vi (x_i + k (x_t^v - a x_i))          (k: ToyPrior's smoothing gain)

So a view is drawn from the images near its camera (the camera embedding), and all views agree on the object (the
joint attention). With one view per group and a flat kernel it is ToyPrior exactly (tests/test_toy_multiview.py).
The captions keep their front bias; the camera, not the caption, says which side a view shows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from perpneg3d.cameras.camera_batch import wrap_azimuth
from perpneg3d.errors import ConfigError
from perpneg3d.toy.dataset import ToyDataset
from perpneg3d.toy.prior import ToyPrior
from perpneg3d.toy.text import ToyTextEncoder
from perpneg3d.validation import NonNegativeFloat, PositiveFloat, PositiveInt, validated


def camera_angles(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """(azimuth, elevation) in degrees of cameras c2w [N,4,4] looking at the origin (perpneg3d's convention:
    azimuth 0 on +x, counter-clockwise seen from +z; elevation from the xy plane)."""
    eye = c2w[:, :3, 3].float()
    azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
    elevation = torch.rad2deg(torch.asin((eye[:, 2] / eye.norm(dim=-1).clamp_min(1e-12)).clamp(-1, 1)))
    return azimuth, elevation


class ToyMultiViewPrior(ToyPrior):
    """The toy prior as a contracts.MultiView denoiser: groups of `views_per_group` consecutive images share one
    object, and each image is drawn near its camera (Gaussian kernel of `azimuth_width` and `elevation_width`
    degrees on the data's cameras)."""

    @validated("guidance.denoiser")
    def __init__(
        self,
        dataset: ToyDataset,
        text_encoder: ToyTextEncoder | None = None,
        tau: PositiveFloat = 0.1,
        smoothing: NonNegativeFloat = 0.0,
        num_train_timesteps: PositiveInt = 1000,
        device: str = "auto",
        chunk_size: PositiveInt = 512,
        views_per_group: PositiveInt = 4,
        azimuth_width: PositiveFloat = 20.0,
        elevation_width: PositiveFloat = 15.0,
    ):
        super().__init__(dataset, text_encoder, tau, smoothing, num_train_timesteps, device, chunk_size)
        self.views_per_group = int(views_per_group)
        self.azimuth_width, self.elevation_width = float(azimuth_width), float(elevation_width)
        self.data_azimuth = dataset.azimuth_deg.float().to(self.device)
        self.data_elevation = dataset.elevation_deg.float().to(self.device)
        self.image_object = dataset.object_idx.long().to(self.device)  # [M]
        self.num_objects = len(dataset.objects)

    def eps(self, latents_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        raise ConfigError("the multi-view toy prior conditions every image on its camera: it guides training (SDS), "
                          "where guided_eps calls eps_views with the cameras; for 2D sampling use guidance=toy")

    def camera_log_kernel(self, c2w: Tensor) -> Tensor:
        """[N, M] log k(c_n, c_i): a Gaussian in the wrapped azimuth and the elevation differences."""
        azimuth, elevation = camera_angles(c2w.to(self.device))
        d_az = wrap_azimuth(azimuth.unsqueeze(1) - self.data_azimuth) / self.azimuth_width
        d_el = (elevation.unsqueeze(1) - self.data_elevation) / self.elevation_width
        return -0.5 * (d_az * d_az + d_el * d_el)

    def posterior_views(self, latents_t: Tensor, t: Tensor, text_emb: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor]:
        """Weights w [N, M] and E[x_0 | the group's x_t] [N, D] for N = groups x views_per_group consecutive rows."""
        n, views = latents_t.shape[0], self.views_per_group
        if n % views:
            raise ValueError(f"{n} images do not form groups of {views} views")
        logits = self.log_joint(latents_t, t, text_emb) + self.camera_log_kernel(c2w)  # L [N, M]
        # l_vo: logsumexp over each object's images (a masked logsumexp: no indexing by object, no host read)
        mask = self.image_object.unsqueeze(0) == torch.arange(self.num_objects, device=self.device).unsqueeze(1)
        per_object = torch.where(mask.unsqueeze(0), logits.unsqueeze(1), -math.inf).logsumexp(-1)  # [N, O]
        log_object = per_object.view(n // views, views, -1).sum(1).log_softmax(-1)  # [G, O]
        log_object = log_object.repeat_interleave(views, 0)  # [N, O]
        w = ((log_object - per_object).gather(1, self.image_object.expand(n, -1)) + logits).exp()
        return w, self.posterior_mean(w, latents_t, t)

    def eps_views(self, latents_t: Tensor, t: Tensor, text_emb: Tensor, c2w: Tensor) -> Tensor:
        """eps [N,3,R,R] for N = groups x views_per_group consecutive images and their cameras c2w [N,4,4]."""
        chunk = max(1, self.chunk_size // self.views_per_group) * self.views_per_group  # whole groups per chunk
        return self.chunked_eps(self.posterior_views, chunk, latents_t, t, text_emb, c2w)
