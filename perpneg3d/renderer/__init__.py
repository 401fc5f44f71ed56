"""Renderer: volume rendering, shading and backgrounds (knows nothing of guidance)."""
from perpneg3d.renderer.background import NeuralEnvironmentMap, SolidBackground
from perpneg3d.renderer.material import DiffuseMaterial
from perpneg3d.renderer.mesh_renderer import MeshRenderer
from perpneg3d.renderer.volume_renderer import RenderOutput, VolumeRenderer, ray_box_intersection

__all__ = ["DiffuseMaterial", "MeshRenderer", "NeuralEnvironmentMap", "RenderOutput", "SolidBackground", "VolumeRenderer", "ray_box_intersection"]
