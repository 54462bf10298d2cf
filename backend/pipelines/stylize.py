"""Workflow ``stylize``: stylize an artist's selected mesh from a style prompt (ISS++, paper 000, Sec. 3.4).

Three modes, as ISS++ Sec. 3.4.3 offers them:

- ``texture`` (Sec. 3.4.1, top branch of Fig. 6a): the geometry is frozen and only the colour field is optimised
  with the CLIP consistency loss (Eq. 4) against the style text; the result keeps the artist's topology exactly:
  the optimised colour field is *baked* onto the original vertices (vertex count, faces and order unchanged).
- ``shape`` (Sec. 3.4.1, bottom branch): occupancy (the density grid) and colour are both optimised with Eq. 4 plus
  the 3D prior loss L_P (Eq. 6) that keeps the structure; the output is remeshed with marching cubes.
- ``sds`` (Sec. 3.4.2, Fig. 6b): score distillation (Eq. 7) from the profile's text-to-image model with the prompt
  "A [shape] imitating a [style]" (ISS++ Fig. 19), plus L_P; only when the profile has a diffusion model.

Every mode renders ``views`` random viewpoints (m = 10, Sec. 4.2) per iteration over a random RGB background
colour drawn anew each iteration (background augmentation, Sec. 3.4.1, Fig. 7); Text2Mesh-style random crops and
perspective are an option (``crops``).

How a mesh enters the 3D core (DESIGN.md "One 3D representation in the middle"): the mesh (in world space, if a
``matrix_world`` came with it) is normalised into the unit cube, turned into an SDF grid
(:func:`backend.geometry.sdf.mesh_to_sdf`, any mesh: open, non-manifold, several parts) and into density with
Dream3D Eq. 9 (beta = 0.05). Texture mode renders the frozen SDF density with a colour MLP (Dream3D Eq. 6c);
shape and SDS modes optimise a DVGO density grid initialised by Eq. 9a/9b. The output goes back through the
:class:`~backend.geometry.normalize.Normalization` (and the inverse world matrix) into the input's own space.

Simplifications of the paper (also in the report):

- ISS++ stylizes a shape given by its SVR decoder D by fine-tuning D (with D duplicated into D_o / D_c for texture
  mode). An artist's mesh has no decoder, so the SDF grid -> Eq. 9 density plays D_o and a colour MLP plays D_c;
  the occupancy of Eq. 6 is ``beta * sigma`` (equal to ``sigmoid(-sdf / beta)`` at the start), and the points p
  of Eq. 6 are the density grid's samples (every voxel), with the mean instead of the sum (scale-free weight).
- The paper gives no weight for L_P; ``lambda_p`` is ours. The "strength" control maps to that weight and to the
  iteration count (strength 0.5 = the defaults; 0 = preserve the most; 1 = no prior loss, 1.5x iterations).
- ISS++ Sec. 4.2 gives "30-50 epochs" for stylization; we use 40 iterations of m = 10 views.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from backend.errors import InputError, ModelUnavailable
from backend.events import Event, Image, JobContext, MeshInput, MeshUpdate, Progress
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

NAME = "stylize"
MODES = ("texture", "shape", "sds")
MAX_STYLE_CHARS = 300
DEFAULT_MAX_FACES = 1_000_000


@dataclass
class StylizeConfig:
    """Parameters of the stylize workflow (the job's ``params``; JSON-friendly scalars only)."""

    style: str = ""  # the style text T ("mahogany", "made of glacier ice")
    mode: str = "texture"  # ISS++ Sec. 3.4.3: texture | shape | sds
    strength: float = 0.5  # 0 preserve .. 1 stylize: scales lambda_p by 2(1 - s) and iterations by (0.5 + s)
    iterations: int = 40  # ISS++ Sec. 4.2: "text-guided stylization for about 30-50 epochs"
    views: int = 10  # m, ISS++ Sec. 4.2: rendered views per iteration for Eq. 4
    render_resolution: int = 224  # CLIP ViT-B/32 input size; renders are resized to the CLIP model's size anyway
    n_samples: int = 64  # samples per ray (Dream3D/DVGO rendering)
    grid_resolution: int = 128  # SDF / density grid resolution R
    beta: float = 0.05  # Dream3D Eq. 9a sharpness
    color: str = "mlp"  # colour field: "mlp" (Dream3D Eq. 6c f_rgb) or "grid" (DVGO colour grid)
    lr_color: float = 0.01  # Adam learning rate of the colour field
    lr_density: float = 0.1  # Adam learning rate of the raw density grid (DVGO's 0.1)
    lambda_p: float = 10.0  # weight of the 3D prior loss L_P (Eq. 6); not given by the paper
    random_background: bool = True  # ISS++ Sec. 3.4.1 background augmentation (random RGB per iteration)
    crops: bool = False  # Text2Mesh-style random resized crops + perspective
    elevation_min: float = -10.0  # random camera elevations, degrees
    elevation_max: float = 45.0
    shape_name: str = ""  # the [shape] of the SDS prompt "A [shape] imitating a [style]" (default: object name)
    guidance_scale: float = 100.0  # SDS classifier-free guidance (DreamFusion)
    sds_views: int = 1  # views per SDS iteration (the U-Net is the expensive part)
    preview_every: int = 5  # stream an intermediate mesh every this many iterations (0: never)
    preview_resolution: int = 48  # marching-cubes grid of intermediate meshes in shape / sds mode
    output_resolution: int = 0  # marching-cubes grid of the final mesh (0: grid_resolution)
    eval_views: int = 4  # fixed views for the CLIP score reported before / after
    max_faces: int = DEFAULT_MAX_FACES  # input face limit
    checkpoint: bool = False  # recompute render chunks in backward (bounds memory for big renders)
    chunk: int = 32768  # rays rendered at a time
    texture_size: int = 1024  # texture mode with a UV map: side of the baked image texture (0: vertex colours only)


_LIMITS: dict[str, tuple[float, float]] = {
    "strength": (0.0, 1.0),
    "iterations": (1, 10_000),
    "views": (1, 64),
    "render_resolution": (8, 1024),
    "n_samples": (4, 512),
    "grid_resolution": (16, 512),
    "beta": (1e-4, 1.0),
    "lr_color": (0.0, 10.0),
    "lr_density": (0.0, 100.0),
    "lambda_p": (0.0, 1e6),
    "elevation_min": (-89.0, 89.0),
    "elevation_max": (-89.0, 89.0),
    "guidance_scale": (1.0, 1000.0),
    "sds_views": (1, 16),
    "preview_every": (0, 10_000),
    "preview_resolution": (8, 256),
    "output_resolution": (0, 512),
    "eval_views": (1, 32),
    "max_faces": (1, 2_000_000),
    "chunk": (256, 1 << 22),
    "texture_size": (0, 4096),
}


# ------------------------------------------------------------------------------------------------- interface


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", required=True, help="input mesh file (GLB, OBJ, PLY, ...)")
    parser.add_argument("--style", required=True, help='style text, e.g. "mahogany" or "made of glacier ice"')
    parser.add_argument("--mode", default="texture", choices=MODES,
                        help="texture: colours only, topology kept; shape: shape and texture (3D prior loss); "
                             "sds: score distillation from the diffusion model")
    parser.add_argument("--strength", type=float, default=StylizeConfig.strength,
                        help="0 = preserve the shape most, 1 = follow the style most (default 0.5)")
    parser.add_argument("--preset", default="auto", choices=("auto", "draft", "standard", "paper"),
                        help="quality preset (backend.presets; auto: the largest that suits this device and memory)")
    parser.add_argument("--iterations", type=int, default=None, help="overrides the preset")
    parser.add_argument("--views", type=int, default=None, help="rendered views per iteration (overrides the preset)")
    parser.add_argument("--render-resolution", type=int, default=None)
    parser.add_argument("--grid-resolution", type=int, default=None)
    parser.add_argument("--crops", action="store_true", help="random crops and perspective for CLIP (Text2Mesh)")
    parser.add_argument("--shape-name", default="", help='the [shape] in "A [shape] imitating a [style]" (sds)')


def params_from_args(args: argparse.Namespace) -> tuple[dict, list[MeshInput]]:
    from backend.geometry.io import load_mesh

    mesh = load_mesh(args.mesh)
    params = {
        "style": args.style,
        "mode": args.mode,
        "strength": args.strength,
        "iterations": args.iterations,
        "views": args.views,
        "render_resolution": args.render_resolution,
        "grid_resolution": args.grid_resolution,
        "crops": bool(args.crops),
        "shape_name": args.shape_name,
        "preset": args.preset,
    }
    return {k: v for k, v in params.items() if v is not None}, [mesh]


def _check_value(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"stylize: {name} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise InputError(f"stylize: {name} must be text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InputError(f"stylize: {name} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise InputError(f"stylize: {name} must be a whole number, got {value!r}")
    value = kind(value)
    if name in _LIMITS:
        lo, hi = _LIMITS[name]
        if not lo <= value <= hi:
            raise InputError(f"stylize: {name} must be between {lo:g} and {hi:g}, got {value}")
    return value


def validate(params: dict, inputs: list[MeshInput], profile: Any = None) -> dict:
    """Normalise ``params`` (defaults filled, types and ranges checked) and check the one input mesh.

    Raises :class:`InputError` for a missing/unknown option, an empty or too long style, no mesh or several meshes,
    and a mesh that is empty, has NaN/inf vertices, bad indices, zero size or more than ``max_faces`` faces.
    With ``profile``, a mode the profile cannot run (``sds`` without a diffusion model) is refused here too.
    """
    if not isinstance(params, dict):
        raise InputError("stylize: params must be a mapping")
    defaults = asdict(StylizeConfig())
    unknown = set(params) - set(defaults) - {"seed"}
    if unknown:
        raise InputError(f"stylize: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(defaults)}")
    out = dict(defaults)
    for k, v in params.items():
        if k == "seed":
            continue
        out[k] = _check_value(k, v, defaults[k])
    style = " ".join(out["style"].split())
    if not style:
        raise InputError('stylize: the style text is empty; type a style such as "mahogany" or "made of glacier ice"')
    if len(style) > MAX_STYLE_CHARS:
        raise InputError(f"stylize: the style text has {len(style)} characters; keep it under {MAX_STYLE_CHARS}")
    out["style"] = style
    if out["mode"] not in MODES:
        raise InputError(f"stylize: mode must be one of {', '.join(MODES)}, got {out['mode']!r}")
    if out["color"] not in ("mlp", "grid"):
        raise InputError(f"stylize: color must be 'mlp' or 'grid', got {out['color']!r}")
    if out["elevation_min"] > out["elevation_max"]:
        raise InputError("stylize: elevation_min must not exceed elevation_max")
    if not inputs:
        raise InputError("stylize needs one mesh: select the object to stylize (or pass --mesh FILE)")
    if len(inputs) > 1:
        raise InputError(f"stylize takes one mesh, got {len(inputs)}; select a single object")
    _check_input(inputs[0], out["max_faces"])
    if profile is not None:
        _check_capability(profile, out["mode"])
    return out


def _check_input(mesh: MeshInput, max_faces: int) -> None:
    from backend.geometry.validate import check_mesh
    from shared.mesh import MeshError, validate_mesh

    what = f"mesh {mesh.name!r}" if mesh.name else "mesh"
    try:
        validate_mesh(mesh.vertices, mesh.faces, mesh.colors, max_faces=max_faces, what=what)
    except MeshError as exc:
        raise InputError(str(exc)) from None
    check_mesh(mesh.vertices, mesh.faces, mesh.colors, what=what)
    if mesh.matrix_world is not None:
        m = np.asarray(mesh.matrix_world, dtype=np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise InputError(f"{what}: matrix_world must be a finite 4x4 matrix, got shape {m.shape}")
        if abs(np.linalg.det(m[:3, :3])) < 1e-12:
            raise InputError(f"{what}: its object transform has zero scale on some axis; apply or fix the scale")


def _check_capability(profile: Any, mode: str) -> None:
    """Reject a mode the profile cannot run, with the reason from ``profile.capabilities()``."""
    caps = getattr(profile, "capabilities", None)
    if not callable(caps):
        return
    st = caps().get(NAME, {})
    opt = st.get("options", {}).get("mode", {}).get(mode)
    if opt is not None and not opt.get("available", True):
        raise ModelUnavailable(f"stylize mode {mode!r} is not available with profile "
                               f"{getattr(profile, 'name', '?')!r}: {opt.get('reason', '')}")
    if opt is None and not st.get("available", True):
        raise ModelUnavailable(f"stylize is not available: {st.get('reason', '')}")


# ------------------------------------------------------------------------------------------------- helpers


@dataclass
class PreparedMesh:
    """The input mesh in the 3D core: unit-cube vertices, SDF grid and the way back to the input's space."""

    vertices_local: np.ndarray  # (N, 3) float64, the input's own space
    faces: np.ndarray  # (M, 3) int64
    vertices_unit: np.ndarray  # (N, 3) float64, unit cube
    sdf: np.ndarray  # (R, R, R) float32, unit-cube units
    normalization: Any  # backend.geometry.normalize.Normalization (world -> unit)
    matrix_world: Optional[np.ndarray]  # (4, 4) local -> world, or None

    def unit_to_local(self, points: np.ndarray) -> np.ndarray:
        world = self.normalization.from_unit(points)
        if self.matrix_world is None:
            return world
        inv = np.linalg.inv(self.matrix_world)
        return world @ inv[:3, :3].T + inv[:3, 3]


def prepare_mesh(mesh: MeshInput, resolution: int, seed: int = 0) -> PreparedMesh:
    """Normalise the mesh (in world space when a ``matrix_world`` came with it) and make its SDF grid."""
    from backend.geometry.sdf import mesh_to_sdf

    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces).astype(np.int64)
    m = None if mesh.matrix_world is None else np.asarray(mesh.matrix_world, dtype=np.float64)
    world = v if m is None else v @ m[:3, :3].T + m[:3, 3]
    sdf, norm = mesh_to_sdf(world, f, resolution=resolution, seed=seed)
    return PreparedMesh(v, f, norm.to_unit(world), sdf, norm, m)


def style_prompt_sds(shape: str, style: str) -> str:
    """ISS++ Sec. 3.4.2 / Fig. 19 stylization prompt: "A [shape] imitating a [style]"."""
    shape = " ".join((shape or "shape").replace("_", " ").replace(".", " ").split()) or "shape"
    return f"A {shape} imitating a {style}"


def _to_u8(rgb: Tensor | np.ndarray) -> np.ndarray:
    a = rgb.detach().float().cpu().numpy() if isinstance(rgb, Tensor) else np.asarray(rgb, dtype=np.float64)
    return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)


@torch.no_grad()
def bake_vertex_colors(color_fn, vertices_unit: np.ndarray, faces: np.ndarray, beta: float, device: str,
                       chunk: int = 65_536) -> np.ndarray:
    """Sample the colour field at the original vertices (texture mode keeps the topology exactly).

    The rendered colour of a surface point is a transmittance-weighted average over a band of about ``beta``
    around the surface (Eq. 9a density), so each vertex takes the mean colour at its position and ``beta / 2``
    in front of and behind it along its area-weighted normal.
    """
    import trimesh

    v = np.asarray(vertices_unit, dtype=np.float64)
    tm = trimesh.Trimesh(v, faces, process=False)
    n = np.asarray(tm.vertex_normals, dtype=np.float64)
    n = np.nan_to_num(n)
    out = np.zeros((len(v), 3), dtype=np.float64)
    offs = (-0.5 * beta, 0.0, 0.5 * beta)
    for s in range(0, len(v), chunk):
        cancel_checkpoint()
        p = torch.as_tensor(v[s : s + chunk], dtype=torch.float32, device=device)
        nn_ = torch.as_tensor(n[s : s + chunk], dtype=torch.float32, device=device)
        acc = torch.zeros_like(p)
        for o in offs:
            acc += color_fn((p + o * nn_).clamp(-0.5, 0.5))
        out[s : s + chunk] = (acc / len(offs)).cpu().numpy()
    return _to_u8(out)


@torch.no_grad()
def bake_texture(color_fn, vertices_unit: np.ndarray, faces: np.ndarray, uvs: np.ndarray, size: int, beta: float,
                 device: str, chunk: int = 65_536) -> np.ndarray:
    """The colour field baked onto a UV map: an (size, size, 4) uint8 RGBA image (alpha 0 outside the islands,
    which are padded by a few texels so mip-mapping and filtering do not bleed the background in).

    Each covered texel takes the colour of its surface point (barycentric on its triangle, unit cube), averaged
    over ``beta / 2`` in front and behind along the face normal, like :func:`bake_vertex_colors`. The rasterising
    and padding are :func:`backend.geometry.texture.bake_image`, shared with the generated results' textures."""
    from backend.geometry.texture import bake_image, surface_points

    v = np.asarray(vertices_unit, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    offs = (-0.5 * beta, 0.0, 0.5 * beta)

    def sampler(t: np.ndarray, w: np.ndarray) -> np.ndarray:
        tri = v[f[t]]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        p = torch.as_tensor(surface_points(v, f, t, w), dtype=torch.float32, device=device)
        nn_ = torch.as_tensor(n, dtype=torch.float32, device=device)
        acc = torch.zeros_like(p)
        for o in offs:
            acc += color_fn((p + o * nn_).clamp(-0.5, 0.5))
        return (acc / len(offs)).float().cpu().numpy()

    return bake_image(uvs, size, sampler, chunk=chunk)


def _png(rgba: np.ndarray) -> bytes:
    from backend.geometry.texture import png_bytes

    return png_bytes(rgba)


def _occupancy_grid(field, beta: float) -> Tensor:
    """Occupancy ``beta * sigma`` in [0, 1] at the density grid samples (= sigmoid(-sdf/beta) at initialisation)."""
    return (beta * field.density_grid()).clamp(0.0, 1.0)


def _marching_cubes(occ: np.ndarray, color_fn, level: float = 0.5):
    """Mesh the ``level`` set of an occupancy grid (unit-cube convention) with vertex colours from ``color_fn``.

    Small parts are kept (an artist's mesh may have small pieces); only specks under 0.5% of the largest part's
    area, which optimisation noise can leave, are removed.
    """
    from backend.geometry.marching import extract_mesh

    return extract_mesh(occ, level=level, inside="above", color_fn=color_fn, min_component_fraction=0.005,
                        allow_empty=True)


def _resample(grid: Tensor, resolution: int) -> Tensor:
    """A (R, R, R) grid resampled to ``resolution`` samples per axis (same unit-cube convention)."""
    if grid.shape[0] == resolution:
        return grid
    from backend.fields.grid import BBOX_MAX, BBOX_MIN, sample_grid

    lin = torch.linspace(BBOX_MIN, BBOX_MAX, resolution, device=grid.device)
    out = torch.empty((resolution,) * 3, device=grid.device, dtype=grid.dtype)
    step = max(1, (1 << 21) // (resolution * resolution))  # ~2 M samples per slab: a cancel stops between slabs
    for i in range(0, resolution, step):
        cancel_checkpoint()
        pts = torch.stack(torch.meshgrid(lin[i : i + step], lin, lin, indexing="ij"), dim=-1)
        out[i : i + step] = sample_grid(grid[None], pts)[..., 0]
    return out


def iou(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """Volumetric IoU of two boolean occupancy grids (:func:`backend.geometry.metrics.volumetric_iou`)."""
    from backend.geometry.metrics import volumetric_iou

    a = a.cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    b = b.cpu().numpy() if isinstance(b, Tensor) else np.asarray(b)
    return volumetric_iou(a, b)


class PrunedColorField(torch.nn.Module):
    """A field whose colour is evaluated only at samples that can be seen (the colour MLP dominates the cost).

    The renderer queries the samples of a chunk of rays as ``(N, K, 3)``, ordered front to back along each ray
    (:mod:`backend.render.volume`). From the (detached) densities this wrapper computes each sample's compositing
    weight ``w_i = T_i (1 - exp(-sigma_i delta_i))`` (Dream3D Eq. 7b/7c) and evaluates the colour only where
    ``w_i > weight_threshold``; elsewhere the colour is 0. The occluded inside of the object and most of the thin
    Eq. 9a haze around it skip the colour network (about 40% of the samples of a box at K = 64); the skipped
    samples carry little of a pixel's colour (measured: 0.35% mean, 2.6% max absolute difference for
    ``weight_threshold = 1e-3``; exactly 0 for 1e-4) and negligible colour gradient. Queries of another shape
    fall back to skipping only samples with ``sigma <= sigma_threshold``.
    """

    def __init__(self, field: torch.nn.Module, weight_threshold: float = 1e-3, sigma_threshold: float = 0.0) -> None:
        super().__init__()
        self.field = field
        self.weight_threshold = float(weight_threshold)
        self.sigma_threshold = float(sigma_threshold)

    def sigma(self, points: Tensor) -> Tensor:
        return self.field.sigma(points)

    def visible(self, points: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.detach()
        if points.ndim != 3 or points.shape[1] < 2:
            return s > self.sigma_threshold
        p = points.detach()
        seg = torch.linalg.norm(p[:, 1:] - p[:, :-1], dim=-1)
        delta = torch.cat([seg, seg[:, -1:]], dim=1)
        tau = s * delta
        trans = torch.exp(-(torch.cumsum(tau, dim=1) - tau))
        return trans * (1.0 - torch.exp(-tau)) > self.weight_threshold

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.field.sigma(points)
        mask = self.visible(points, sigma)
        rgb = points.new_zeros(*points.shape[:-1], 3)
        if bool(mask.any()):
            rgb = rgb.index_put((mask,), self.field.color(points[mask]).to(rgb.dtype))
        return sigma, rgb


# ------------------------------------------------------------------------------------------------- run


class _Stylizer:
    """One stylization run: fields, optimiser, losses; the generator in :func:`run` drives it."""

    def __init__(self, cfg: StylizeConfig, mesh: MeshInput, ctx: JobContext) -> None:
        from backend.fields.grid import ColorGrid, ColorMLP, DensityGridField
        from backend.fields.grid import SDFGridField

        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.mesh = mesh
        self.gen = torch.Generator().manual_seed(int(ctx.seed))
        torch.manual_seed(int(ctx.seed))
        self.prep = prepare_mesh(mesh, cfg.grid_resolution, seed=ctx.seed)
        color = ColorMLP() if cfg.color == "mlp" else ColorGrid(max(16, cfg.grid_resolution // 2))
        if cfg.mode == "texture":
            # Sec. 3.4.1 texture branch: occupancy frozen (D_o), colour optimised (D_c).
            self.field = SDFGridField(self.prep.sdf, beta=cfg.beta, color=color, trainable=False).to(self.device)
            self.params = [{"params": list(self.field.color.parameters()), "lr": cfg.lr_color}]
            self.occ0 = None
        else:
            # Sec. 3.4.1 shape branch / Sec. 3.4.2: density (occupancy) and colour optimised, L_P keeps the prior.
            self.field = DensityGridField.from_sdf(self.prep.sdf, beta=cfg.beta, color=color).to(self.device)
            self.params = [
                {"params": [self.field.density], "lr": cfg.lr_density},
                {"params": list(self.field.color.parameters()), "lr": cfg.lr_color},
            ]
            with torch.no_grad():
                self.occ0 = _occupancy_grid(self.field, cfg.beta).detach().clone()
        self.render_field = PrunedColorField(self.field)
        self.opt = torch.optim.Adam(self.params, betas=(0.9, 0.99))
        self.iterations = max(1, int(round(cfg.iterations * (0.5 + cfg.strength))))
        self.lambda_p = cfg.lambda_p * 2.0 * (1.0 - cfg.strength)
        self.clip = ctx.profile.clip() if cfg.mode != "sds" else None
        self.diffusion = ctx.profile.diffusion() if cfg.mode == "sds" else None
        self._text_target: Optional[Tensor] = None
        self._eval_clip = None

    # -------------------------------------------------------------- shared pieces

    def cameras(self, n: int):
        from backend.render import random_cameras

        return random_cameras(n, elevation_range=(self.cfg.elevation_min, self.cfg.elevation_max),
                              generator=self.gen, device=self.device)

    def render_views(self, n: int, resolution: int) -> Tensor:
        """Render ``n`` random views over the augmented background; (n, 3, H, W) in [0, 1]."""
        from backend.losses.augment import AugmentConfig, random_background_color, random_crop_perspective
        from backend.render import render

        cfg = self.cfg
        cams = self.cameras(n)
        if cfg.random_background:
            bg = random_background_color(1, generator=self.gen).to(self.device)[0]  # one colour per iteration
        else:
            bg = torch.ones(3, device=self.device)
        out = render(self.render_field, cams, resolution, resolution, n_samples=cfg.n_samples, background=bg,
                     generator=self.gen, normals=None, checkpoint=cfg.checkpoint, chunk=cfg.chunk)
        img = out["rgb"].permute(0, 3, 1, 2)
        if cfg.crops:
            img = random_crop_perspective(img, AugmentConfig(crops=True), generator=self.gen, fill=bg)
        return img.clamp(0.0, 1.0)

    def text_target(self) -> Tensor:
        if self._text_target is None:
            with torch.no_grad():
                self._text_target = self.clip.encode_text([self.cfg.style]).detach()
        return self._text_target

    def prior_loss(self) -> Tensor:
        from backend.losses.prior_3d import prior_3d_loss

        return prior_3d_loss(_occupancy_grid(self.field, self.cfg.beta), self.occ0)

    @torch.no_grad()
    def clip_score(self) -> Optional[float]:
        """Mean CLIP cosine similarity of fixed views (white background, no jitter) with the style text."""
        from backend.render import orbit_cameras, render

        clip = self.clip
        if clip is None:
            try:
                clip = self.ctx.profile.clip()
            except Exception:  # noqa: BLE001 - the score is informative only; SDS mode may lack CLIP
                return None
        n = self.cfg.eval_views
        cams = orbit_cameras(torch.arange(n) * (360.0 / n) + 30.0, 20.0, device=self.device)
        res = self.cfg.render_resolution
        out = render(self.render_field, cams, res, res, n_samples=self.cfg.n_samples, background="white",
                     stratified=False, normals=None, chunk=self.cfg.chunk)
        feats = clip.encode_image(out["rgb"].permute(0, 3, 1, 2))
        txt = clip.encode_text([self.cfg.style])
        return float((feats @ txt.t()).mean())

    # -------------------------------------------------------------- steps

    def step(self, it: int) -> dict[str, float]:
        from backend.losses.clip_consistency import clip_consistency_loss

        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        if cfg.mode == "sds":
            loss = self._sds_term(it)
            terms["sds"] = float(loss.detach())
        else:
            img = self.render_views(cfg.views, cfg.render_resolution)
            feats = self.clip.encode_image(img)
            loss = clip_consistency_loss(self.text_target(), feats)  # ISS++ Eq. 4
            terms["clip"] = float(loss.detach())
        if self.occ0 is not None and self.lambda_p > 0:
            lp = self.prior_loss()  # ISS++ Eq. 6
            loss = loss + self.lambda_p * lp
            terms["prior"] = float(lp.detach())
        loss.backward()
        self.opt.step()
        return terms

    def _sds_term(self, it: int) -> Tensor:
        from backend.losses.sds import sds_loss

        cfg = self.cfg
        if not hasattr(self, "_cond"):
            shape = cfg.shape_name or self.mesh.name or "shape"
            self.prompt = style_prompt_sds(shape, cfg.style)
            self._cond = self.diffusion.encode_prompt([self.prompt])
            self._uncond = self.diffusion.encode_prompt([""])
        res = min(cfg.render_resolution, int(self.diffusion.resolution))
        img = self.render_views(cfg.sds_views, res)
        return sds_loss(self.diffusion, img, self._cond, self._uncond, guidance_scale=cfg.guidance_scale,
                        generator=self.gen)

    # -------------------------------------------------------------- outputs

    def color_fn(self, points: Tensor) -> Tensor:
        return self.field.color(points)

    def texture_mesh(self, final: bool) -> MeshUpdate:
        colors = bake_vertex_colors(self.color_fn, self.prep.vertices_unit, self.prep.faces, self.cfg.beta,
                                    self.device)
        return MeshUpdate(
            vertices=np.asarray(self.mesh.vertices, dtype=np.float32),
            faces=np.asarray(self.mesh.faces).astype(np.uint32),
            colors=colors,
            final=final,
            name="stylized",
        )

    @torch.no_grad()
    def remeshed(self, resolution: int, final: bool) -> MeshUpdate:
        occ = _resample(_occupancy_grid(self.field, self.cfg.beta), resolution)

        def colors_at(points: np.ndarray) -> np.ndarray:
            pts = torch.as_tensor(points, dtype=torch.float32, device=self.device)
            parts = []
            for c in pts.split(65_536):
                cancel_checkpoint()
                parts.append(self.color_fn(c))
            return torch.cat(parts).float().cpu().numpy()

        v_unit, f, colors = _marching_cubes(occ.float().cpu().numpy(), colors_at)
        if len(f) == 0:
            return MeshUpdate(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32), None, final, "stylized")
        v_local = self.prep.unit_to_local(v_unit)
        return MeshUpdate(v_local.astype(np.float32), np.asarray(f).astype(np.uint32), colors, final, "stylized")

    def current_iou(self) -> Optional[float]:
        if self.occ0 is None:
            return None
        with torch.no_grad():
            return iou(_occupancy_grid(self.field, self.cfg.beta) > 0.5, self.occ0 > 0.5)


def run(params: dict, inputs: list[MeshInput], ctx: JobContext) -> Iterator[Event]:
    """Stylize ``inputs[0]`` (see the module docstring); yields Progress every iteration, a preview mesh every
    ``preview_every`` iterations and one final :class:`MeshUpdate` named ``"stylized"`` in the input's space."""
    params = validate(dict(params), inputs)
    names = {f.name for f in fields(StylizeConfig)}
    cfg = StylizeConfig(**{k: v for k, v in params.items() if k in names})
    _check_capability(ctx.profile, cfg.mode)
    ctx.cancel.check()
    t0 = time.perf_counter()
    yield Progress("prepare", 0, 1, f"mesh to SDF grid ({cfg.grid_resolution}^3), loading models")
    st = _Stylizer(cfg, inputs[0], ctx)
    ctx.cancel.check()
    yield Progress("prepare", 1, 1, f"ready in {time.perf_counter() - t0:.1f}s")
    score0 = st.clip_score() if cfg.mode != "sds" else None
    total = st.iterations
    stage = {"texture": "texture", "shape": "shape-and-texture", "sds": "sds"}[cfg.mode]
    terms: dict[str, float] = {}
    for it in range(total):
        ctx.cancel.check()
        with ctx.autocast():  # bf16 autocast on CUDA by default (issue 15); float32 on a CPU
            terms = st.step(it)
        msg = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
        yield Progress(stage, it + 1, total, msg)
        if cfg.preview_every and (it + 1) % cfg.preview_every == 0 and it + 1 < total:
            ctx.cancel.check()
            if cfg.mode == "texture":
                yield st.texture_mesh(final=False)
            else:
                yield st.remeshed(min(cfg.preview_resolution, cfg.grid_resolution), final=False)
    ctx.cancel.check()
    if cfg.mode == "texture":
        mesh = inputs[0]
        if mesh.uvs is not None and cfg.texture_size > 0:
            # the artist's mesh keeps its UV map: the style goes onto it as an image texture (sent before the
            # final mesh, so the client has it when it builds the result)
            yield Progress("bake", 0, 1, f"baking a {cfg.texture_size}^2 texture onto the UV map")
            rgba = bake_texture(st.color_fn, st.prep.vertices_unit, st.prep.faces, mesh.uvs, cfg.texture_size,
                                cfg.beta, st.device)
            yield Image(_png(rgba), "baked texture")
            yield Progress("bake", 1, 1, "texture baked")
        out = st.texture_mesh(final=True)
        if mesh.uvs is not None and cfg.texture_size > 0:
            out.info["texture"] = "baked texture"
            out.info["texture_size"] = cfg.texture_size
            out.uvs = np.asarray(mesh.uvs, dtype=np.float32)  # so the stored GLB keeps the UV map and texture
    else:
        out = st.remeshed(cfg.output_resolution or cfg.grid_resolution, final=True)
        if len(out.faces) == 0:
            raise InputError("stylization removed the whole shape; lower the strength or raise lambda_p")
    info: dict[str, Any] = {"mode": cfg.mode, "style": cfg.style, "iterations": total,
                            "lambda_p": st.lambda_p, "source": inputs[0].name, "seconds": time.perf_counter() - t0}
    score1 = st.clip_score() if cfg.mode != "sds" else None
    if score0 is not None and score1 is not None:
        info["clip_score_initial"] = score0
        info["clip_score_final"] = score1
    if st.occ0 is not None:
        info["iou"] = st.current_iou()
    if cfg.mode == "sds":
        info["prompt"] = st.prompt
    info.update({f"loss_{k}": v for k, v in terms.items()})
    out.info = {**out.info, **info}
    log.info("stylize %s done in %.1fs: %s", cfg.mode, info["seconds"], info)
    yield out
