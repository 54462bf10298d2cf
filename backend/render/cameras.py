"""Pinhole cameras for the renderer: look-at, intrinsics from the field of view, random viewpoints.

World frame: Blender's, Z up, the object in the unit cube [-0.5, 0.5]^3. Camera frame: OpenGL's (x right, y up,
looking down -z), so ``c2w[:, :3, 2]`` points *backwards* from the view direction.

Viewpoints in spherical coordinates (degrees): azimuth 0 is Blender's front view (camera on -Y looking at +Y),
azimuth 90 the right view (camera on +X); elevation 0 is level, 90 looks straight down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

DEFAULT_FOV = 45.0  # vertical field of view, degrees
DEFAULT_RADIUS = 1.6  # camera distance: the unit cube's circumsphere (r = 0.87) fills ~75% of a 45-degree view


@dataclass
class Cameras:
    """A batch of V pinhole cameras: ``c2w`` (V, 4, 4) camera-to-world, ``fov`` (V,) vertical FOV in degrees.

    ``azimuth`` / ``elevation`` / ``radius`` (V,) are kept when the cameras were made from spherical coordinates
    (for view-dependent prompts such as "side view"), else None.
    """

    c2w: Tensor
    fov: Tensor
    azimuth: Optional[Tensor] = None
    elevation: Optional[Tensor] = None
    radius: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.c2w.ndim != 3 or self.c2w.shape[1:] != (4, 4):
            raise ValueError(f"c2w must have shape (V, 4, 4), got {tuple(self.c2w.shape)}")
        fov = torch.as_tensor(self.fov, dtype=self.c2w.dtype, device=self.c2w.device)
        self.fov = fov.expand(self.c2w.shape[0]).clone() if fov.ndim == 0 else fov

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def origins(self) -> Tensor:
        """Camera centres (V, 3)."""
        return self.c2w[:, :3, 3]

    def focal(self, height: int) -> Tensor:
        """Focal length in pixels (V,) for an image ``height`` pixels tall: ``f = H / (2 tan(fov / 2))``."""
        return 0.5 * height / torch.tan(torch.deg2rad(self.fov) * 0.5)

    def intrinsics(self, height: int, width: int) -> Tensor:
        """Pinhole matrices K (V, 3, 3), principal point at the image centre, square pixels."""
        f = self.focal(height)
        k = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.device)
        k[:, 0, 0] = f
        k[:, 1, 1] = f
        k[:, 0, 2] = width * 0.5
        k[:, 1, 2] = height * 0.5
        k[:, 2, 2] = 1.0
        return k

    def to(self, device: Union[str, torch.device]) -> "Cameras":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Cameras(self.c2w.to(device), self.fov.to(device), mv(self.azimuth), mv(self.elevation), mv(self.radius))

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Cameras(self.c2w[idx], self.fov[idx], pick(self.azimuth), pick(self.elevation), pick(self.radius))


def look_at(
    eye: Union[Tensor, Sequence[float]],
    target: Union[Tensor, Sequence[float]] = (0.0, 0.0, 0.0),
    up: Union[Tensor, Sequence[float]] = (0.0, 0.0, 1.0),
    fov: Union[float, Tensor] = DEFAULT_FOV,
) -> Cameras:
    """Cameras at ``eye`` (V, 3) or (3,) looking at ``target`` with ``up`` as the up hint (Z by default).

    When the view direction is parallel to ``up`` (looking straight down), +Y is used as the up hint instead.
    """
    eye_t = torch.as_tensor(eye, dtype=torch.float32)
    dev = eye_t.device
    eye_t = eye_t.reshape(-1, 3)
    tgt = torch.as_tensor(target, dtype=torch.float32, device=dev).reshape(-1, 3).expand_as(eye_t)
    up_t = torch.as_tensor(up, dtype=torch.float32, device=dev).reshape(-1, 3).expand_as(eye_t)
    forward = tgt - eye_t
    norm = torch.linalg.norm(forward, dim=-1, keepdim=True)
    if bool((norm < 1e-9).any()):
        raise ValueError("look_at: eye and target coincide")
    forward = forward / norm
    right = torch.linalg.cross(forward, up_t, dim=-1)
    degenerate = torch.linalg.norm(right, dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], device=dev).expand_as(forward), dim=-1)
    right = torch.where(degenerate, alt, right)
    right = right / torch.linalg.norm(right, dim=-1, keepdim=True)
    cam_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=dev).repeat(eye_t.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye_t
    return Cameras(c2w, torch.as_tensor(fov, dtype=torch.float32, device=dev))


def spherical_to_position(azimuth: Tensor, elevation: Tensor, radius: Tensor) -> Tensor:
    """Camera positions (V, 3) from azimuth/elevation in degrees (see module docstring) and radius."""
    az = torch.deg2rad(azimuth)
    el = torch.deg2rad(elevation)
    return torch.stack(
        [radius * torch.cos(el) * torch.sin(az), -radius * torch.cos(el) * torch.cos(az), radius * torch.sin(el)], -1
    )


def orbit_cameras(
    azimuth: Union[Tensor, Sequence[float]],
    elevation: Union[Tensor, Sequence[float], float] = 20.0,
    radius: Union[Tensor, Sequence[float], float] = DEFAULT_RADIUS,
    fov: Union[float, Tensor] = DEFAULT_FOV,
    device: Union[str, torch.device] = "cpu",
) -> Cameras:
    """Cameras on a sphere around the origin looking at it, one per azimuth (degrees)."""
    az = torch.as_tensor(azimuth, dtype=torch.float32, device=device).reshape(-1)
    el = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1).expand_as(az)
    r = torch.as_tensor(radius, dtype=torch.float32, device=device).reshape(-1).expand_as(az)
    cams = look_at(spherical_to_position(az, el, r), fov=fov)
    cams.azimuth, cams.elevation, cams.radius = az.clone(), el.clone(), r.clone()
    return cams


def random_cameras(
    n: int,
    azimuth_range: tuple[float, float] = (0.0, 360.0),
    elevation_range: tuple[float, float] = (0.0, 40.0),
    radius: float = DEFAULT_RADIUS,
    radius_jitter: float = 0.0,
    fov: float = DEFAULT_FOV,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device] = "cpu",
) -> Cameras:
    """``n`` random viewpoints looking at the origin: azimuth and elevation uniform in their ranges (degrees),
    radius uniform in ``radius * (1 +- radius_jitter)``. Deterministic for a seeded ``generator`` (CPU)."""
    if n <= 0:
        raise ValueError("n must be positive")
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 3, generator=generator, device=gen_dev).to(device)
    az = azimuth_range[0] + (azimuth_range[1] - azimuth_range[0]) * u[:, 0]
    el = elevation_range[0] + (elevation_range[1] - elevation_range[0]) * u[:, 1]
    r = radius * (1.0 + radius_jitter * (2.0 * u[:, 2] - 1.0))
    if bool((r <= 0.87).any()):
        raise ValueError(f"camera radius must stay outside the unit cube (> 0.87), got min {float(r.min()):.3f}")
    return orbit_cameras(az, el, r, fov=fov, device=device)


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays through pixel centres: ``origins`` (V, H, W, 3) and unit ``directions`` (V, H, W, 3), world space.

    Row 0 is the top of the image.
    """
    dev, dt = cameras.device, cameras.c2w.dtype
    f = cameras.focal(height).to(dt)  # (V,)
    j = torch.arange(width, device=dev, dtype=dt) + 0.5
    i = torch.arange(height, device=dev, dtype=dt) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    x = (jj - width * 0.5)[None] / f[:, None, None]
    y = -(ii - height * 0.5)[None] / f[:, None, None]
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (V, H, W, 3)
    rot = cameras.c2w[:, :3, :3]
    d = torch.einsum("vij,vhwj->vhwi", rot, d_cam)
    d = d / torch.linalg.norm(d, dim=-1, keepdim=True)
    o = cameras.c2w[:, None, None, :3, 3].expand_as(d)
    return o, d
