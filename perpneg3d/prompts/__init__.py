"""Prompts: view labels, Perp-Neg view schedules and per-camera text embeddings."""
from perpneg3d.prompts.view_prompts import PromptBatch, ViewPrompts, validate_prompt
from perpneg3d.prompts.view_weights import ExponentialSchedule, StableDreamfusionSchedule
from perpneg3d.prompts.views import VIEWS, view_labels, wrap_azimuth

__all__ = [
    "VIEWS",
    "ExponentialSchedule",
    "PromptBatch",
    "StableDreamfusionSchedule",
    "ViewPrompts",
    "validate_prompt",
    "view_labels",
    "wrap_azimuth",
]
