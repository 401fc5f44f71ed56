"""3D Janus metrics (docs/method.md, "Metrics"): classify renders at 36 azimuths at a fixed elevation.

front_share: share of views classified front (0.25 for a correct object, 1.0 for a face everywhere);
view_acc: share whose label matches the camera's; view_acc_aligned: the same after the best global
rotation of the object; object_acc: share recognised as the object the prompt names. Janus-free: front_share <= 0.5,
view_acc_aligned >= 0.8 and object_acc >= 0.8 (issue 28: an oriented object that is not the one asked for is no
success). A view counts for view_acc and view_acc_aligned only when its object is recognised, so view_acc_aligned
>= 0.8 already implies object_acc >= 0.8: the third condition is written out, and the counts are the same.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from perpneg3d.contracts import HasReferenceCamera
from perpneg3d.images import make_grid, save_png
from perpneg3d.prompts.views import FRONT, view_labels, wrap_azimuth
from perpneg3d.renderer.orbit import render_rgb

JANUS_FRONT_MAX, JANUS_ALIGNED_MIN, OBJECT_MIN = 0.5, 0.8, 0.8
ORIENTED_MIN = 0.8  # correctly oriented: Janus-free and view_acc (absolute) >= 0.8


def outcome(janus: dict) -> dict:
    """Janus-free and correctly oriented under today's rule, from a run's saved janus metrics (an earlier
    benchmark's runs are recounted by it): the object recognised in >= OBJECT_MIN of the views is required."""
    free = bool(janus["front_share"] <= JANUS_FRONT_MAX and janus["view_acc_aligned"] >= JANUS_ALIGNED_MIN
                and janus["object_acc"] >= OBJECT_MIN)
    return dict(janus_free=free, oriented=free and janus["view_acc"] >= ORIENTED_MIN)


def classifier_camera(classifier, cameras) -> dict:
    """How to render views for `classifier`: the toy classifier's own reference camera, else the middle
    of the training camera distribution at CLIP's input size."""
    if isinstance(classifier, HasReferenceCamera):
        return dict(classifier.camera)
    distance, fovy = cameras.middle()
    return dict(distance=distance, fovy_deg=fovy, resolution=224)


def janus_scores(pred_view: torch.Tensor, pred_ok: torch.Tensor, azimuth_deg: torch.Tensor) -> dict:
    """Scores from predicted labels [N] (valid where pred_ok) for cameras at azimuth_deg [N] (uniform steps)."""
    n = len(azimuth_deg)
    step = 360.0 / n
    true = view_labels(azimuth_deg, torch.zeros(n))
    correct = pred_ok & (pred_view == true)
    aligned = []
    for k in range(n):
        shifted = view_labels(azimuth_deg + k * step, torch.zeros(n))
        aligned.append((pred_ok & (pred_view == shifted)).float().mean().item())
    best = max(range(n), key=lambda k: aligned[k])
    front_share = (pred_ok & (pred_view == FRONT)).float().mean().item()
    scores = dict(front_share=front_share, view_acc=correct.float().mean().item(), view_acc_aligned=aligned[best],
                  best_rotation_deg=best * step if best * step <= 180 else best * step - 360,
                  object_acc=pred_ok.float().mean().item())
    scores["janus_free"] = outcome(scores)["janus_free"]  # the one copy of the rule
    return scores


def janus_metrics(geometry, renderer, classifier, prompt: str, distance: float, fovy_deg: float, resolution: int,
                  elevation: float = 15.0, n_azimuths: int = 36, strip_path: Path | None = None) -> dict:
    """Render, classify and score; optionally save a strip with a green (right view), red (wrong view)
    or grey (object not recognised) border under each view."""
    az = torch.arange(n_azimuths, dtype=torch.float32) * (360.0 / n_azimuths)
    az = wrap_azimuth(az)
    rgb = render_rgb(geometry, renderer, az, torch.full_like(az, elevation), distance, fovy_deg, resolution)
    pred = classifier(rgb)
    ok = pred.object_idx == classifier.object_index(prompt)
    scores = janus_scores(pred.view_idx, ok, az)
    scores.update(azimuth_deg=az.tolist(), predicted_view=pred.view_idx.tolist(), object_ok=ok.tolist(),
                  predicted_azimuth_deg=pred.azimuth_deg.tolist(), elevation_deg=elevation)
    if strip_path is not None:
        right = ok & (pred.view_idx == view_labels(az, torch.zeros_like(az)))
        colors = torch.where(ok.unsqueeze(-1), torch.where(right.unsqueeze(-1), torch.tensor([0.1, 0.7, 0.2]), torch.tensor([0.85, 0.1, 0.1])),
                             torch.tensor([0.6, 0.6, 0.6]))
        framed = F.pad(rgb, (2, 2, 2, 2), value=0.0) + F.pad(torch.zeros_like(rgb), (2, 2, 2, 2), value=1.0) * colors.view(-1, 3, 1, 1)
        save_png(make_grid(framed, nrow=n_azimuths // 2, upscale=max(1, 64 // resolution)), strip_path)
    return scores
