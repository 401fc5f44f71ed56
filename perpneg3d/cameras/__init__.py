"""Cameras: the CameraBatch container, orbits and the random training distribution."""
from perpneg3d.cameras.camera_batch import CameraBatch, look_at, orbit_cameras, spherical_position
from perpneg3d.cameras.random_cameras import RandomCameras

__all__ = ["CameraBatch", "RandomCameras", "look_at", "orbit_cameras", "spherical_position"]
