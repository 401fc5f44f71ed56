"""Mesh export for Blender: marching cubes, clean-up, colours, axes, GLB/OBJ/PLY."""
from perpneg3d.export.mesh import MeshExporter

__all__ = ["MeshExporter"]
