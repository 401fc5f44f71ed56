"""View labels from camera angles (docs/conventions.md, "View labels"): front faces +x, azimuth 0 is the front."""
from __future__ import annotations

import torch
from torch import Tensor

from perpneg3d.cameras.camera_batch import wrap_azimuth  # noqa: F401  (re-exported: views are defined by it)

VIEWS = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD = range(4)

# The paper's 2D view strategy (arXiv 2304.04968 section 3): negate the other two horizontal views.
VIEW_NEGATIVES = {"front": ("side", "back"), "side": ("front", "back"), "back": ("front", "side")}


def view_labels(
    azimuth_deg: Tensor,
    elevation_deg: Tensor,
    front_max_deg: float = 45.0,
    back_min_deg: float = 135.0,
    overhead_min_deg: float = 60.0,
) -> Tensor:
    """Index into VIEWS per camera: front |a| < 45, back |a| > 135, side otherwise; e > 60 overhead."""
    abs_az = wrap_azimuth(azimuth_deg).abs()
    labels = torch.full_like(abs_az, SIDE, dtype=torch.long)
    # torch.where, not boolean-mask assignment: a mask index is a host sync on CUDA
    labels = torch.where(abs_az < front_max_deg, FRONT, labels)
    labels = torch.where(abs_az > back_min_deg, BACK, labels)
    return torch.where(elevation_deg.to(abs_az.device) > overhead_min_deg, OVERHEAD, labels)


def view_prompt(prompt: str, view: str, template: str = "{prompt}, {view} view") -> str:
    """The view-dependent text, e.g. "a corgi, side view"."""
    return template.format(prompt=prompt, view=view)
