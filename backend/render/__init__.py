"""Cameras, rays and the differentiable volume renderer (plain PyTorch: CPU in tests, CUDA for artists)."""

from backend.render.cameras import (
    DEFAULT_FOV,
    DEFAULT_RADIUS,
    Cameras,
    camera_rays,
    look_at,
    orbit_cameras,
    random_cameras,
    spherical_to_position,
)
from backend.render.volume import normal_image, ray_box, render

__all__ = [
    "DEFAULT_FOV",
    "DEFAULT_RADIUS",
    "Cameras",
    "camera_rays",
    "look_at",
    "normal_image",
    "orbit_cameras",
    "random_cameras",
    "ray_box",
    "render",
    "spherical_to_position",
]
