"""Guidance: the Perp-Neg combination, the denoiser interface and score distillation."""
from perpneg3d.guidance.perpneg import MODES, combine

__all__ = ["MODES", "combine"]
