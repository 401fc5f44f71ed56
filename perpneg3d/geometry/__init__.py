"""Geometry: the hash-grid NeRF field (knows nothing of guidance or prompts)."""
from perpneg3d.geometry.dmtet import DMTetGeometry
from perpneg3d.geometry.hash_grid import HashGridEncoding, TorchHashGrid
from perpneg3d.geometry.implicit_volume import ImplicitVolume

__all__ = ["DMTetGeometry", "HashGridEncoding", "ImplicitVolume", "TorchHashGrid"]
