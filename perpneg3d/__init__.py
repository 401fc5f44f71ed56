"""perpneg3d: DreamFusion-style text-to-3D with Perp-Neg score distillation."""

__version__ = "0.1.0"
