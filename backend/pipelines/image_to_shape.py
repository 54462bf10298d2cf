"""Workflow ``image-to-shape``: lift one image to a coloured mesh (CISP, paper 002; or the ISS SVR model, paper 000).

Two lifting methods, both from the profile:

- ``cisp`` (paper 002): image -> CISP joint embedding ``E_i(I)`` -> voxel DDPM conditioned on it with
  classifier-free guidance ``eps_u + w (eps_c - eps_u)`` -> occupancy voxels -> marching cubes. The voxel model has
  no colour, so vertices take the colour of the image projected from the view the image was drawn from (front).
- ``svr`` (ISS, paper 000, Sec. 3): image -> shape latent ``z = E_S(I)`` -> implicit decoder ``D(p, z)`` ->
  occupancy logits on a grid -> marching cubes at occupancy 0.5; colours from the decoder's colour head.
- ``shap-e`` (issue 13, the ``pretrained`` profile's public 3D prior): Shap-E img2img samples a latent from the
  image's CLIP ViT-L/14 tokens, the latent's NeRSTF field gives an SDF grid, marching cubes at 0 and colours from
  its texture head (:mod:`backend.models.shap_e`); ``steps`` / ``guidance_scale`` are Shap-E's (64 / 3.0).

``auto`` takes CISP when the profile has it (better image-to-shape coherence than CLIP conditioning, paper 002),
else the SVR model, else Shap-E img2img. ThemeStation (paper 003, Sec. 3.2) uses this step for its rough initial model.

Simplification: with untrained (tiny) or weak models the surface may be missing at the nominal iso-level; then the
level is lowered to enclose ``fill_fraction`` of the grid (reported in ``info["iso_fallback"]``), so the workflow
still returns a shape to refine instead of failing.

CLI: ``python -m backend run image-to-shape --image concept.png --out shape.glb [--method cisp|svr]``.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.errors import InputError, ModelUnavailable
from backend.events import Event, JobContext, MeshInput, MeshUpdate, Progress
from backend.events import checkpoint as cancel_checkpoint
from backend.pipelines import uv_texture

log = logging.getLogger(__name__)

NAME = "image-to-shape"
METHODS = ("auto", "cisp", "svr", "shap-e")
MAX_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass
class ImageToShapeConfig:
    """Lifting options (paper 002 for CISP, paper 000 for SVR)."""

    method: str = "auto"  # auto | cisp | svr
    guidance_scale: Optional[float] = None  # CISP classifier-free guidance w (None: the model's own)
    steps: Optional[int] = None  # CISP DDIM steps (None: the model's own)
    mesh_resolution: int = 64  # SVR: decoder grid for marching cubes
    voxel_upsample: int = 4  # CISP: trilinear upsampling of the occupancy before marching cubes (smoother surface)
    fill_fraction: float = 0.1  # fallback iso-level encloses this fraction of the grid (see module docstring)
    view_azimuth: float = 0.0  # viewpoint the image shows (front), for projecting its colours (CISP)
    view_elevation: float = 0.0
    target_faces: Optional[int] = 50_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"image-to-shape method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 8 <= int(self.mesh_resolution) <= 256:
            raise InputError(f"mesh_resolution must be in [8, 256], got {self.mesh_resolution}")
        if not 1 <= int(self.voxel_upsample) <= 8:
            raise InputError(f"voxel_upsample must be in [1, 8], got {self.voxel_upsample}")
        if not 0.0 < float(self.fill_fraction) < 0.5:
            raise InputError(f"fill_fraction must be in (0, 0.5), got {self.fill_fraction}")
        if self.steps is not None and int(self.steps) < 1:
            raise InputError("steps must be >= 1")


@dataclass
class LiftedShape:
    """A lifted mesh in the unit cube: vertices f32 (N, 3), faces u32 (M, 3), colours u8 (N, 3), and facts."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray]
    method: str
    info: dict


# ----------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, what: str = "image") -> Tensor:
    """PNG/JPEG bytes -> (1, 3, H, W) float in [0, 1]; transparency is composited over white."""
    from PIL import Image as PILImage, UnidentifiedImageError

    if not data:
        raise InputError(f"{what} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{what} is {len(data) / 2**20:.0f} MiB, more than the limit of {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        im = PILImage.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{what} is not a readable image (PNG or JPEG): {exc}") from None
    im = im.convert("RGBA")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    rgb = arr[..., :3] * arr[..., 3:] + (1.0 - arr[..., 3:])
    if min(rgb.shape[:2]) < 4:
        raise InputError(f"{what} is too small ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def encode_png(image: Tensor) -> bytes:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> PNG bytes."""
    from PIL import Image as PILImage

    x = image.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def square(image: Tensor) -> Tensor:
    """Centre-pad a (B, 3, H, W) image to a square with white (keeps the aspect ratio for the encoders)."""
    h, w = image.shape[-2:]
    if h == w:
        return image
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return F.pad(image, (left, s - w - left, top, s - h - top), value=1.0)


# ----------------------------------------------------------------------------------------------- lifting


def choose_method(profile: Any, method: str) -> str:
    """Resolve ``auto`` and check the profile can run the method (reason from ``profile.capabilities()``)."""
    caps = profile.capabilities().get(NAME, {})
    opts = caps.get("options", {}).get("method", {})
    if method == "auto":
        for m in ("cisp", "svr", "shap-e"):
            if opts.get(m, {}).get("available"):
                return m
        raise ModelUnavailable(f"image-to-shape is not available with the {profile.name!r} profile: "
                               f"{caps.get('reason') or 'no CISP or SVR model'}")
    o = opts.get(method, {"available": False, "reason": "unknown method"})
    if not o.get("available"):
        raise ModelUnavailable(f"image-to-shape method {method!r} is not available with the {profile.name!r} "
                               f"profile: {o.get('reason')}")
    return method


def _iso_mesh(grid: np.ndarray, level: float, bbox, fill_fraction: float, color_fn, target_faces) -> tuple:
    """Marching cubes at ``level`` (inside above); if no surface there, at the level enclosing ``fill_fraction``."""
    from backend.errors import StepstoneError
    from backend.geometry import extract_mesh

    info: dict = {}
    g = np.asarray(grid, dtype=np.float32)
    lvl = float(level)
    if not (g.min() < lvl < g.max()):
        q = float(np.quantile(g, 1.0 - fill_fraction))
        if not (g.min() < q < g.max()):
            raise StepstoneError("the image-to-shape model produced no shape at all (a constant grid); "
                                 "try another image or seed, or a trained profile")
        log.warning("no surface at level %.3g (values %.3g..%.3g); using level %.3g", lvl, g.min(), g.max(), q)
        info["iso_fallback"] = q
        lvl = q
    v, f, c = extract_mesh(g, level=lvl, bbox=bbox, color_fn=color_fn, inside="above", target_faces=target_faces)
    return v, f, c, info


def project_colors(image: Tensor, azimuth: float, elevation: float) -> Any:
    """A ``color_fn``: each vertex takes the pixel of ``image`` it projects to from the given orbit camera."""
    from backend.render import orbit_cameras

    cam = orbit_cameras([azimuth], elevation)
    c2w = cam.c2w[0]
    img = square(image)[:1].float().cpu()
    h = img.shape[-2]
    f = float(cam.focal(h)[0])

    @torch.no_grad()
    def color_fn(points: np.ndarray) -> np.ndarray:
        p = torch.as_tensor(points, dtype=torch.float32)
        pc = (p - c2w[:3, 3]) @ c2w[:3, :3]  # camera frame (x right, y up, -z forward)
        depth = (-pc[:, 2]).clamp_min(1e-6)
        u = f * pc[:, 0] / depth / (h * 0.5)  # [-1, 1] across the image
        v = -f * pc[:, 1] / depth / (h * 0.5)
        grid = torch.stack([u, v], -1).view(1, 1, -1, 2)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0, :, 0].t().clamp(0, 1).numpy()

    return color_fn


def lift_cisp(image: Tensor, cisp: Any, cfg: ImageToShapeConfig, generator: torch.Generator) -> LiftedShape:
    """CISP (paper 002): ``E_i(I)`` -> CFG voxel DDPM -> occupancy (cell centres) -> marching cubes."""
    dev = next(cisp.parameters()).device
    with torch.no_grad():
        emb = cisp.encode_image(square(image).to(dev))
        occ = cisp.sample(emb, guidance_scale=cfg.guidance_scale, steps=cfg.steps, generator=generator)[0]
    r = occ.shape[-1]
    half = 0.5 - 0.5 / r  # voxel values sit at cell centres -0.5 + (i + 0.5) / r
    grid = occ.float().cpu()
    k = int(cfg.voxel_upsample)
    if k > 1:
        n = (r - 1) * k + 1
        grid = F.interpolate(grid[None, None], size=(n, n, n), mode="trilinear", align_corners=True)[0, 0]
    color_fn = project_colors(image, cfg.view_azimuth, cfg.view_elevation)
    v, f, c, info = _iso_mesh(grid.numpy(), 0.5, ((-half,) * 3, (half,) * 3), cfg.fill_fraction, color_fn,
                              cfg.target_faces)
    info.update(voxel_resolution=r, occupied=float((occ > 0.5).float().mean()))
    return LiftedShape(v, f, c, "cisp", info)


def lift_svr(image: Tensor, svr: Any, cfg: ImageToShapeConfig) -> LiftedShape:
    """ISS SVR (paper 000): ``z = E_S(I)``, decoder occupancy logits on a grid, marching cubes at logit 0."""
    from backend.fields import DecoderField, field_color_fn, grid_points

    dev = next(svr.parameters()).device
    with torch.no_grad():
        z = svr.encode(square(image).to(dev))
    field = DecoderField(svr.decoder, z[0])
    r = int(cfg.mesh_resolution)
    pts = grid_points(r, device=dev).reshape(-1, 3)
    parts = []
    with torch.no_grad():
        for s in range(0, len(pts), 65536):
            cancel_checkpoint()  # 256^3 samples take seconds: a cancelled job stops between chunks
            parts.append(field.occupancy_logits(pts[s : s + 65536]))
    logits = torch.cat(parts)
    grid = logits.reshape(r, r, r).float().cpu().numpy()
    v, f, c, info = _iso_mesh(grid, 0.0, ((-0.5,) * 3, (0.5,) * 3), cfg.fill_fraction, field_color_fn(field, device=dev),
                              cfg.target_faces)
    return LiftedShape(v, f, c, "svr", info)


def lift_shap_e(image: Tensor, model: Any, cfg: ImageToShapeConfig, generator: torch.Generator) -> LiftedShape:
    """Shap-E img2img (issue 13): latent from the image, SDF grid, marching cubes, colours, unit cube."""
    from backend.models.shap_e import DEFAULT_STEPS

    steps = int(cfg.steps) if cfg.steps is not None else DEFAULT_STEPS
    latent = model.sample(square(image), steps=steps, guidance_scale=cfg.guidance_scale, generator=generator,
                          on_step=lambda i, n: cancel_checkpoint())
    shape = model.decode_mesh(latent, int(cfg.mesh_resolution), target_faces=cfg.target_faces,
                              fill_fraction=cfg.fill_fraction, checkpoint=cancel_checkpoint)
    info = dict(shape.info, steps=steps)
    return LiftedShape(shape.vertices, shape.faces, shape.colors, "shap-e", info)


def lift_image(image: Tensor, profile: Any, cfg: ImageToShapeConfig, generator: Optional[torch.Generator] = None
               ) -> LiftedShape:
    """Lift ``image`` (1, 3, H, W) in [0, 1] to a coloured mesh in the unit cube with the profile's models."""
    method = choose_method(profile, cfg.method)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if method == "shap-e":
        return lift_shap_e(image, profile.shap_e_img2img(), cfg, gen)
    if method == "cisp":
        return lift_cisp(image, profile.cisp(), cfg, gen)
    return lift_svr(image, profile.svr(), cfg)


# ----------------------------------------------------------------------------------------------- workflow


def config_from_params(params: dict) -> ImageToShapeConfig:
    known = {f.name for f in fields(ImageToShapeConfig)}
    cfg = {k: v for k, v in (params.get("config") or {}).items() if k in known}
    unknown = set((params.get("config") or {})) - known
    if unknown:
        raise InputError(f"unknown image-to-shape config keys: {', '.join(sorted(unknown))}")
    if "method" in params:
        cfg["method"] = params["method"]
    try:
        return ImageToShapeConfig(**cfg)
    except TypeError as exc:
        raise InputError(f"bad image-to-shape config: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="PNG or JPEG image of one object (concept art, render)")
    parser.add_argument("--method", default="auto", choices=METHODS,
                        help="lifting model (auto: CISP if present, else SVR, else Shap-E img2img)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance weight (CISP w, Shap-E's guidance scale)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (CISP voxel diffusion, Shap-E)")
    parser.add_argument("--resolution", type=int, default=64, help="marching-cubes grid resolution (SVR, Shap-E)")
    uv_texture.add_arguments(parser)


def params_from_args(args: argparse.Namespace) -> tuple[dict, list[MeshInput]]:
    path = Path(args.image)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    params = {
        "image_png": base64.b64encode(path.read_bytes()).decode("ascii"),
        "image_name": path.stem,
        "method": args.method,
        "config": {"guidance_scale": args.guidance, "steps": args.steps, "mesh_resolution": args.resolution},
        **uv_texture.params_from_args(args),
    }
    return params, []


def validate(params: dict, inputs: list, profile: Any = None) -> dict:
    """Check the image decodes and the config is sane; returns params with ``config`` normalised."""
    data = params.get("image_png")
    if not isinstance(data, str) or not data:
        raise InputError("image-to-shape needs an image: pass --image FILE (or 'image_png', base64, on the wire)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise InputError("'image_png' must be base64-encoded image bytes") from None
    decode_image(raw)
    cfg = config_from_params(params)
    out = dict(params)
    out["method"] = cfg.method
    out["config"] = asdict(cfg)
    out.update(uv_texture.check_options(params, NAME))  # issue 16: UV map + baked texture (off by default)
    if profile is not None:
        choose_method(profile, cfg.method)
    return out


def run(params: dict, inputs: list, ctx: JobContext) -> Iterator[Event]:
    cfg = config_from_params(params)
    image = decode_image(base64.b64decode(params["image_png"]))
    yield Progress("lift", 0, 1, "lifting the image to 3D")
    ctx.cancel.check()
    gen = torch.Generator().manual_seed(int(ctx.seed))
    shape = lift_image(image, ctx.profile, cfg, gen)
    ctx.cancel.check()
    yield Progress("lift", 1, 1, f"{len(shape.faces)} faces ({shape.method})")
    info = {"method": shape.method, **shape.info}
    # the lifted mesh's vertex colours are what the texture bakes (each lifting route has its own field)
    yield from uv_texture.finish(MeshUpdate(shape.vertices, shape.faces, shape.colors, final=True,
                                            name=str(params.get("image_name") or "shape"), info=info),
                                 uv_texture.options(params))
