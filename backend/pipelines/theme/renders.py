"""Mesh -> renderable field, and the multi-view colour / normal renders ThemeStation fine-tunes on.

A mesh (an exemplar, or the initial model lifted from a concept image) enters the 3D core the one way every
Stepstone workflow uses: mesh -> SDF grid (:func:`backend.geometry.sdf.mesh_to_sdf`) -> density by Dream3D Eq. 9a
(``beta = 0.05``) -> volume rendering (Dream3D Eq. 7). Vertex colours become a colour grid (nearest vertex per
grid sample), so a coloured mesh renders in its colours.

Renders follow ThemeStation appendix A: 20 views per reference model (30 for the reference prior) at fixed
elevations (0 and 20 degrees) with random azimuths, at 512 x 512; each view gets a random solid background
colour (Dream3D appendix C: a fixed background would be learnt as part of the theme). Normal maps are the
world-space normals mapped to colours (``n / 2 + 1/2``) over the same background.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from backend.errors import InputError
from backend.events import MeshInput
from backend.fields.grid import ColorGrid, DensityGridField, grid_points
from backend.fields.sdf import DEFAULT_BETA
from backend.geometry.normalize import Normalization
from backend.geometry.sdf import mesh_to_sdf
from backend.render import normal_image, orbit_cameras, render
from shared.mesh import MAX_FACES, MeshError, validate_mesh

log = logging.getLogger(__name__)

DEFAULT_GREY = (0.8, 0.8, 0.8)


@dataclass
class RenderConfig:
    """Exemplar renders (ThemeStation appendix A; Dream3D appendix C for the backgrounds)."""

    views: int = 20  # renders per reference model for the theme model; the reference prior uses 30
    elevations: tuple[float, ...] = (0.0, 20.0)  # fixed elevations (degrees), azimuths random
    resolution: int = 512  # image size of the fine-tuning data
    sdf_resolution: int = 128  # mesh -> SDF grid samples per axis
    n_samples: int = 128  # ray samples inside the unit cube
    beta: float = DEFAULT_BETA  # Dream3D Eq. 9a: SDF -> density sharpness
    views_per_batch: int = 4  # memory bound of one render call

    def __post_init__(self) -> None:
        if self.views < 1 or self.resolution < 8 or self.n_samples < 2 or not self.elevations:
            raise InputError("renders need views >= 1, resolution >= 8, n_samples >= 2 and at least one elevation")
        if not 8 <= self.sdf_resolution <= 512:
            raise InputError(f"sdf_resolution must be in [8, 512], got {self.sdf_resolution}")


@dataclass
class Renders:
    """Colour renders ``rgb`` and normal maps ``normal`` (V, 3, H, W) in [0, 1], with their viewpoints."""

    name: str
    rgb: Tensor
    normal: Tensor
    azimuth: Tensor
    elevation: Tensor
    background: Tensor  # (V, 3)


def check_exemplar(mesh: MeshInput, max_faces: int = MAX_FACES, what: Optional[str] = None) -> None:
    """Raise :class:`InputError` for an exemplar that is not a usable triangle mesh (empty, non-mesh, too big)."""
    label = what or (f"exemplar {mesh.name!r}" if getattr(mesh, "name", None) else "exemplar")
    if not isinstance(mesh, MeshInput):
        raise InputError(f"{label} is not a mesh (got {type(mesh).__name__}); select mesh objects as exemplars")
    try:
        validate_mesh(mesh.vertices, mesh.faces, mesh.colors, max_faces=max_faces, what=label)
    except MeshError as exc:
        raise InputError(str(exc)) from None
    v = np.asarray(mesh.vertices, dtype=np.float64)[np.unique(np.asarray(mesh.faces).astype(np.int64))]
    if float((v.max(axis=0) - v.min(axis=0)).max()) <= 1e-8:
        raise InputError(f"{label} has zero size (all its vertices are at one point); pick another object")
    if mesh.matrix_world is not None:
        m = np.asarray(mesh.matrix_world, dtype=np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise InputError(f"{label}: matrix_world must be a finite 4x4 matrix, got shape {m.shape}")


def world_vertices(mesh: MeshInput) -> np.ndarray:
    """Vertices with the object's world matrix applied (so exemplars render upright as the artist placed them)."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if mesh.matrix_world is None:
        return v
    m = np.asarray(mesh.matrix_world, dtype=np.float64)
    return v @ m[:3, :3].T + m[:3, 3]


def vertex_color_grid(
    vertices_unit: np.ndarray, colors: Optional[np.ndarray], resolution: int
) -> Tensor:
    """Colour-grid logits (3, R, R, R): each grid sample takes the colour of its nearest vertex (grey if none)."""
    from scipy.spatial import cKDTree

    if colors is None:
        rgb = np.broadcast_to(np.asarray(DEFAULT_GREY, dtype=np.float32), (resolution,) * 3 + (3,))
    else:
        c = np.asarray(colors)
        c = c[:, :3].astype(np.float32) / (255.0 if c.dtype.kind in "ui" else 1.0)
        pts = grid_points(resolution).reshape(-1, 3).numpy()
        _, nn = cKDTree(vertices_unit).query(pts, k=1, workers=-1)
        rgb = c[nn].reshape(resolution, resolution, resolution, 3)
    rgb = np.clip(rgb, 0.02, 0.98)
    logits = np.log(rgb / (1.0 - rgb)).transpose(3, 0, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


def mesh_field(
    mesh: MeshInput, sdf_resolution: int = 128, beta: float = DEFAULT_BETA, device: str = "cpu"
) -> tuple[DensityGridField, Normalization]:
    """A DVGO density grid + colour grid field of ``mesh`` (Dream3D Eq. 9a/9b init from its SDF) in the unit cube.

    The field is trainable (DSD optimises exactly this representation, initialised from the initial model).
    """
    v = world_vertices(mesh)
    sdf, norm = mesh_to_sdf(v, mesh.faces, resolution=sdf_resolution)
    color = ColorGrid(sdf_resolution, init=vertex_color_grid(norm.to_unit(v), mesh.colors, sdf_resolution))
    field = DensityGridField.from_sdf(sdf, beta=beta, color=color)
    return field.to(device), norm


def render_views(
    field,
    azimuth: Tensor,
    elevation: Tensor,
    resolution: int,
    background: Tensor,
    n_samples: int,
    views_per_batch: int = 4,
    generator: Optional[torch.Generator] = None,
    grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Colour and normal-map renders (V, 3, H, W) of ``field`` from orbit cameras over ``background`` (V, 3).

    ``grad=False`` renders without autograd (finite-difference normals); ``grad=True`` keeps the graph (autograd
    normals with ``create_graph``, for losses on normal maps).
    """
    dev = background.device
    rgbs, nrms = [], []
    for s in range(0, len(azimuth), views_per_batch):
        cams = orbit_cameras(azimuth[s : s + views_per_batch], elevation[s : s + views_per_batch], device=dev)
        bg = background[s : s + views_per_batch]
        with torch.set_grad_enabled(grad):
            out = render(
                field, cams, resolution, resolution, n_samples=n_samples, background=bg, generator=generator,
                stratified=grad, normals="autograd" if grad else "fd", checkpoint=False,
            )
            nimg = normal_image(out["normal"], out["alpha"], background=0.0) + (1.0 - out["alpha"])[..., None] * bg[
                :, None, None, :
            ]
        rgbs.append(out["rgb"].permute(0, 3, 1, 2))
        nrms.append(nimg.clamp(0.0, 1.0).permute(0, 3, 1, 2))
    return torch.cat(rgbs), torch.cat(nrms)


def random_viewpoints(
    n: int, elevations: tuple[float, ...], generator: torch.Generator, device: str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` viewpoints: elevations cycling through the fixed set, uniform random azimuths, random backgrounds."""
    az = torch.rand(n, generator=generator) * 360.0
    el = torch.tensor([float(elevations[i % len(elevations)]) for i in range(n)])
    bg = torch.rand(n, 3, generator=generator)
    return az.to(device), el.to(device), bg.to(device)


def render_mesh(
    mesh: MeshInput,
    cfg: RenderConfig = RenderConfig(),
    generator: Optional[torch.Generator] = None,
    device: str = "cpu",
    views: Optional[int] = None,
) -> Renders:
    """Render ``views`` (default ``cfg.views``) colour images and normal maps of a mesh (appendix A setup)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    field, _ = mesh_field(mesh, cfg.sdf_resolution, cfg.beta, device)
    n = int(views or cfg.views)
    az, el, bg = random_viewpoints(n, cfg.elevations, gen, device)
    rgb, nrm = render_views(field, az, el, cfg.resolution, bg, cfg.n_samples, cfg.views_per_batch, gen)
    return Renders(mesh.name, rgb.detach(), nrm.detach(), az, el, bg)
