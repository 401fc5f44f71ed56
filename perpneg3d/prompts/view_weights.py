"""Perp-Neg view schedules: positive embedding mix and negative weights from the azimuth.

arXiv 2304.04968 section 4; docs/method.md, "View-dependent prompts and weights". Every schedule maps azimuths/elevations [B] (degrees) to
``pos_mix`` [B,4] (weights of the front, side, back, overhead embeddings in the positive) and
``neg_weights`` [B,2] (weights of the negatives, always the front and side embeddings in that
order). Positive weights push away from a negative; overhead cameras get no negatives.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from perpneg3d.prompts.views import BACK, FRONT, OVERHEAD, SIDE, wrap_azimuth
from perpneg3d.validation import NonNegativeFloat, WeightCurve, validated

NEGATIVE_VIEWS = ("front", "side")


class ViewMix(NamedTuple):
    pos_mix: Tensor  # [B,4] over (front, side, back, overhead)
    neg_weights: Tensor  # [B,2] for the (front, side) negatives


def shifted_exp(coeffs: Sequence[float], r: Tensor) -> Tensor:
    """f(a, b, c; r) = a * exp(-b * r) + c."""
    a, b, c = coeffs
    return a * torch.exp(-b * r) + c


def _positive_mix(abs_az: Tensor, overhead: Tensor) -> tuple[Tensor, Tensor]:
    """Interpolation weights front<->side on [0, 90), side<->back on [90, 180]; r per camera."""
    near = abs_az < 90.0
    r = torch.where(near, 1.0 - abs_az / 90.0, 2.0 - abs_az / 90.0)
    mix = torch.zeros(abs_az.shape[0], 4, dtype=abs_az.dtype, device=abs_az.device)
    mix[:, FRONT] = torch.where(near, r, torch.zeros_like(r))
    mix[:, SIDE] = torch.where(near, 1.0 - r, r)
    mix[:, BACK] = torch.where(near, torch.zeros_like(r), 1.0 - r)
    overhead_mix = torch.zeros_like(mix)
    overhead_mix[:, OVERHEAD] = 1.0
    return torch.where(overhead.unsqueeze(-1), overhead_mix, mix), r  # where, not a mask: no host sync


class ViewSchedule:
    """Shared frame of the schedules: r and the positive mix from the azimuth, no negatives overhead.
    Subclasses define negative_weights(r, near) -> (w_front, w_side), near = |azimuth| < 90.

    Which cameras are overhead is the caller's view labels (ViewPrompts, prompts.overhead_min_deg):
    one threshold decides both the label and the weights."""

    def negative_weights(self, r: Tensor, near: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, azimuth_deg: Tensor, overhead: Tensor | None = None) -> ViewMix:
        """azimuth_deg [B]; overhead [B] bool (None: no camera is overhead)."""
        abs_az = wrap_azimuth(azimuth_deg.float()).abs()
        if overhead is None:
            overhead = torch.zeros_like(abs_az, dtype=torch.bool)
        mix, r = _positive_mix(abs_az, overhead)
        weights = torch.stack(self.negative_weights(r, abs_az < 90.0), dim=-1)
        return ViewMix(mix, torch.where(overhead.unsqueeze(-1), torch.zeros_like(weights), weights))


class ExponentialSchedule(ViewSchedule):
    """threestudio's shifted-exponential schedule (the default; signs flipped so positive weights push away).

    |a| < 90:  r = 1 - |a|/90, negatives (front, side) weighted (f_fs(r), f_sf(1 - r)).
    |a| >= 90: r = 2 - |a|/90, negatives (side, front) weighted (f_sb(r), f_fsb(r)).
    """

    @validated("prompts.schedule")
    def __init__(
        self,
        front_side: WeightCurve = (4.0, 0.5, -2.426),
        side_front: WeightCurve = (4.0, 0.5, -2.426),
        side_back: WeightCurve = (1.0, 0.5, -0.606),
        front_side_back: WeightCurve = (1.0, 0.5, 0.967),
    ):
        self.f_fs, self.f_sf = tuple(front_side), tuple(side_front)
        self.f_sb, self.f_fsb = tuple(side_back), tuple(front_side_back)

    def negative_weights(self, r: Tensor, near: Tensor) -> tuple[Tensor, Tensor]:
        w_front = torch.where(near, shifted_exp(self.f_fs, r), shifted_exp(self.f_fsb, r))
        w_side = torch.where(near, shifted_exp(self.f_sf, 1.0 - r), shifted_exp(self.f_sb, r))
        return w_front, w_side


class StableDreamfusionSchedule(ViewSchedule):
    """stable-dreamfusion's schedule: decays exp(-front_decay r), exp(-side_decay (1-r)), cut-offs.

    |a| < 90:  front weight 0 if r > 0.8 else weight * exp(-front_decay r);
               side weight 0 if r < 0.2 else weight * exp(-side_decay (1 - r)).
    |a| >= 90: front weight = weight; side weight 0 if r > 0.8 else weight/2 * exp(-side_decay r).
    """

    @validated("prompts.schedule")
    def __init__(
        self,
        front_decay: NonNegativeFloat = 2.0,
        side_decay: NonNegativeFloat = 10.0,
        weight: NonNegativeFloat = 2.0,
    ):
        self.front_decay, self.side_decay, self.weight = front_decay, side_decay, weight

    def negative_weights(self, r: Tensor, near: Tensor) -> tuple[Tensor, Tensor]:
        zero = torch.zeros_like(r)
        front_decayed = self.weight * torch.exp(-self.front_decay * r)
        w_front_near = torch.where(r > 0.8, zero, front_decayed)
        w_side_near = torch.where(r < 0.2, zero, self.weight * torch.exp(-self.side_decay * (1.0 - r)))
        w_side_far = torch.where(r > 0.8, zero, 0.5 * self.weight * torch.exp(-self.side_decay * r))
        w_front = torch.where(near, w_front_near, torch.full_like(r, self.weight))
        w_side = torch.where(near, w_side_near, w_side_far)
        return w_front, w_side
