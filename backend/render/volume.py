"""Differentiable volume rendering of a field (Dream3D appendix D.1, Eq. 7a-7c), batched over views.

For every pixel ray, K samples between the ray's entry into and exit from the unit cube [-0.5, 0.5]^3 (the near
and far planes of Eq. 7), stratified (one uniform sample per equal bin) or at bin centres; ``delta_i`` is the
length of the ray segment that sample i stands for (bins bounded by midpoints between samples), so the deltas sum
exactly to the ray's length inside the cube.

    alpha_i = 1 - exp(-sigma_i * delta_i)                 (7b)
    T_i     = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta_j)   (7c)
    C       = sum_i T_i alpha_i c_i + T_{K+1} c_bg        (7a)

Also returned: ``alpha = 1 - T_{K+1}`` (accumulated opacity), ``depth`` = the expected termination distance along
the ray given termination (``sum w_i t_i / alpha``, 0 where alpha < 1e-4), and ``normal`` = the weighted sum of
unit normals ``n = -grad sigma / |grad sigma|`` in world space (background 0). Normals come from the density
gradient by **autograd** (``normals="autograd"``, with ``create_graph`` when gradients are on, so losses on normal
maps train the field) or by central **finite differences** (``normals="fd"``, step of half a 128^3 voxel), or are
skipped (``normals=None``, zeros).

Fields that offer ``sigma(points)`` and ``rgb(points)`` separately (the grids) get DVGO's speed-up: the colour
(often an MLP) is evaluated only where ``T_i alpha_i > color_thres`` (1e-4), and normals differentiate the density
alone. Other fields are evaluated with ``query``.

Memory is bounded by processing ``chunk`` rays at a time (on a CPU at most :data:`CPU_CHUNK_SAMPLES` samples);
with ``checkpoint=True`` each chunk is recomputed in the backward pass (torch.utils.checkpoint), so training memory
is bounded too.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from backend.events import checkpoint as cancel_checkpoint
from backend.render.cameras import Cameras, camera_rays

BBOX = 0.5
FD_STEP = 0.5 / 127.0
# On a CPU at most this many samples per chunk (issue 15): a chunk's field queries and their autograd state are
# then tens of MB, which the allocator reuses, instead of hundreds of MB mapped afresh for every chunk (8192 rays x
# 48 samples through a 128-wide decoder: 3.4 M page faults and 3 GB peak for one view; 0.8 M and 1.8 GB capped).
# Rays are independent and the jitter is drawn up front, so the images do not depend on the chunking.
CPU_CHUNK_SAMPLES = 1 << 16


def ray_box(origins: Tensor, dirs: Tensor, half: float = BBOX) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test against the cube [-half, half]^3: ``(t_near, t_far, hit)`` with t_near >= 0."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0 = (-half - origins) * inv
    t1 = (half - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near + 1e-9


def rand_on(device, shape: tuple, generator: Optional[torch.Generator]) -> Tensor:
    """``torch.rand(shape)`` on ``device``, reproducible from ``generator``. Large draws for a GPU from a CPU
    generator (a job's generator lives on the CPU) are made on the GPU by a generator seeded with one draw of the
    CPU one: drawing 32 M jitter samples per stylize iteration on the CPU and copying them over took most of an
    H100 iteration (issue 15's profile). Small draws, and draws for a CPU, stay on the generator's device."""
    device = torch.device(device)
    gen_dev = generator.device if generator is not None else device
    if device.type != "cpu" and gen_dev.type == "cpu" and math.prod(shape) >= 1 << 16:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator, gen_dev = torch.Generator(device).manual_seed(seed), device
    return torch.rand(shape, generator=generator, device=gen_dev).to(device)


def _background(background, n_views: int, height: int, width: int, generator, device, dtype) -> Tensor:
    """Background as (V, H, W, 3)."""
    if isinstance(background, str):
        if background == "white":
            bg = torch.ones(n_views, 3, device=device, dtype=dtype)
        elif background == "black":
            bg = torch.zeros(n_views, 3, device=device, dtype=dtype)
        elif background == "random":
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            bg = torch.rand(n_views, 3, generator=generator, device=gen_dev).to(device, dtype)
        else:
            raise ValueError(f"background must be 'white', 'black', 'random' or a tensor, got {background!r}")
        return bg[:, None, None, :].expand(n_views, height, width, 3)
    bg = torch.as_tensor(background, device=device, dtype=dtype)
    if bg.shape == (3,):
        bg = bg.expand(n_views, 3)
    if bg.shape == (n_views, 3):
        return bg[:, None, None, :].expand(n_views, height, width, 3)
    if bg.shape == (n_views, height, width, 3):
        return bg
    raise ValueError(f"background tensor must be (3,), (V, 3) or (V, H, W, 3), got {tuple(bg.shape)}")


def _field_sigma(field, points: Tensor) -> Tensor:
    fn = getattr(field, "sigma", None)
    return fn(points) if callable(fn) else field.query(points)[0]


def _split_field(field):
    """``(sigma_fn, rgb_fn)`` when the field offers density and colour separately, else None."""
    sig, col = getattr(field, "sigma", None), getattr(field, "rgb", None)
    return (sig, col) if callable(sig) and callable(col) else None


def _composite(
    field, o: Tensor, d: Tensor, t_near: Tensor, t_far: Tensor, u: Tensor, normals: Optional[str], color_thres: float
):
    """Render rays (N,) with sample offsets ``u`` (N, K) in [0, 1); returns (rgb, acc, depth_sum, normal)."""
    cancel_checkpoint()  # a cancelled job stops within one chunk (also while backward recomputes chunks)
    t = t_near[:, None] + (t_far - t_near)[:, None] * u  # (N, K)
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    edges = torch.cat([t_near[:, None], mids, t_far[:, None]], dim=-1)
    delta = (edges[:, 1:] - edges[:, :-1]).clamp_min(0.0)
    pts = (o[:, None, :] + t[..., None] * d[:, None, :]).clamp(-BBOX, BBOX)
    split = _split_field(field)
    density_fn = split[0] if split is not None else (lambda p: field.query(p)[0])
    rgb = None
    normal_vec = None
    if normals == "autograd":
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            if not pts.requires_grad:
                pts = pts.detach().requires_grad_(True)
            if split is not None:
                sigma = density_fn(pts)
            else:
                sigma, rgb = field.query(pts)
            (grad,) = torch.autograd.grad(sigma.sum(), pts, create_graph=outer_grad, retain_graph=outer_grad)
        if not outer_grad:
            sigma, grad = sigma.detach(), grad.detach()
            rgb = None if rgb is None else rgb.detach()
        normal_vec = -F.normalize(grad, dim=-1, eps=1e-12)
    else:
        if split is not None:
            sigma = density_fn(pts)
        else:
            sigma, rgb = field.query(pts)
        if normals == "fd":
            offs = torch.eye(3, device=pts.device, dtype=pts.dtype) * FD_STEP
            plus = torch.stack([_field_sigma(field, pts + offs[k]) for k in range(3)], dim=-1)
            minus = torch.stack([_field_sigma(field, pts - offs[k]) for k in range(3)], dim=-1)
            normal_vec = -F.normalize(plus - minus, dim=-1, eps=1e-12)
    tau = sigma * delta  # optical depth of each segment
    alpha = 1.0 - torch.exp(-tau)  # Eq. 7b
    trans = torch.exp(-(torch.cumsum(tau, dim=-1) - tau))  # Eq. 7c, exclusive product
    w = trans * alpha
    if rgb is None:
        # DVGO's "fast colour threshold": colour is only queried where the sample's weight can matter.
        keep = w.detach() > color_thres
        rgb = torch.zeros(*w.shape, 3, device=w.device, dtype=w.dtype)
        if bool(keep.any()):
            rgb = rgb.index_put((keep,), split[1](pts.detach()[keep]).to(w.dtype))
    rgb_out = (w[..., None] * rgb).sum(-2)  # Eq. 7a without background
    acc = w.sum(-1)
    depth_sum = (w * t).sum(-1)
    if normal_vec is not None:
        nrm = (w[..., None] * normal_vec).sum(-2)
    else:
        nrm = torch.zeros_like(rgb_out)
    return rgb_out, acc, depth_sum, nrm


def render(
    field,
    cameras: Cameras,
    height: int,
    width: int,
    n_samples: int = 64,
    background: Union[str, Tensor] = "white",
    chunk: int = 8192,
    generator: Optional[torch.Generator] = None,
    stratified: bool = True,
    normals: Optional[str] = "autograd",
    checkpoint: bool = False,
    color_thres: float = 1e-4,
) -> dict[str, Tensor]:
    """Volume-render ``field`` from every camera (Dream3D Eq. 7a-7c).

    Args:
        field: object with ``query(points (..., 3)) -> (sigma (...), rgb (..., 3))`` in the unit cube.
        cameras: V cameras; rays are generated on their device.
        height, width: image size in pixels.
        n_samples: K samples per ray inside the cube.
        background: "white", "black", "random" (one uniform colour per view from ``generator``), or a tensor
            (3,), (V, 3) or (V, H, W, 3).
        chunk: rays evaluated at a time (bounds memory: about chunk * n_samples field queries alive).
        generator: torch.Generator for stratified jitter and random backgrounds (reproducible renders).
        stratified: jitter samples within their bins (training); False puts them at bin centres.
        normals: "autograd", "fd" or None (see module docstring).
        checkpoint: recompute each chunk in backward to bound training memory.
        color_thres: for fields with separate ``sigma``/``rgb`` methods, colour is evaluated only at samples whose
            weight ``T_i alpha_i`` exceeds this (DVGO's ``fast_color_thres``; 0 evaluates every sample).

    Returns:
        dict with ``rgb`` (V, H, W, 3), ``alpha`` (V, H, W), ``depth`` (V, H, W), ``normal`` (V, H, W, 3) and
        ``background`` (V, H, W, 3). Differentiable w.r.t. every tensor ``field.query`` depends on.
    """
    if height <= 0 or width <= 0 or n_samples <= 0 or chunk <= 0:
        raise ValueError("height, width, n_samples and chunk must be positive")
    if normals not in ("autograd", "fd", None):
        raise ValueError(f"normals must be 'autograd', 'fd' or None, got {normals!r}")
    device, dtype = cameras.device, cameras.c2w.dtype
    if torch.device(device).type == "cpu":
        chunk = max(1, min(chunk, CPU_CHUNK_SAMPLES // n_samples))
    n_views = len(cameras)
    bg = _background(background, n_views, height, width, generator, device, dtype)
    o, d = camera_rays(cameras, height, width)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    t_near, t_far, hit = ray_box(o, d)
    idx = torch.nonzero(hit, as_tuple=False)[:, 0]
    n_rays = o.shape[0]
    # Sample offsets are drawn up front (outside checkpointed chunks, so recomputation sees the same samples).
    base = torch.arange(n_samples, device=device, dtype=dtype)
    if stratified:
        jitter = rand_on(device, (idx.numel(), n_samples), generator).to(dtype)
    else:
        jitter = torch.full((idx.numel(), n_samples), 0.5, device=device, dtype=dtype)
    u = (base[None] + jitter) / n_samples

    parts = []
    for s in range(0, idx.numel(), chunk):
        sel = idx[s : s + chunk]
        args = (o[sel], d[sel], t_near[sel], t_far[sel], u[s : s + chunk])
        if checkpoint and torch.is_grad_enabled():
            parts.append(_checkpoint(_composite, field, *args, normals, color_thres, use_reentrant=False))
        else:
            parts.append(_composite(field, *args, normals, color_thres))

    rgb = torch.zeros(n_rays, 3, device=device, dtype=dtype)
    acc = torch.zeros(n_rays, device=device, dtype=dtype)
    depth_sum = torch.zeros(n_rays, device=device, dtype=dtype)
    nrm = torch.zeros(n_rays, 3, device=device, dtype=dtype)
    if parts:
        rgb = rgb.index_put((idx,), torch.cat([p[0] for p in parts]))
        acc = acc.index_put((idx,), torch.cat([p[1] for p in parts]))
        depth_sum = depth_sum.index_put((idx,), torch.cat([p[2] for p in parts]))
        nrm = nrm.index_put((idx,), torch.cat([p[3] for p in parts]))
    shape = (n_views, height, width)
    acc = acc.reshape(shape)
    rgb = rgb.reshape(*shape, 3) + (1.0 - acc)[..., None] * bg  # Eq. 7a: + T_{K+1} c_bg
    depth = torch.where(acc > 1e-4, depth_sum.reshape(shape) / acc.clamp_min(1e-4), torch.zeros_like(acc))
    return {"rgb": rgb, "alpha": acc, "depth": depth, "normal": nrm.reshape(*shape, 3), "background": bg}


def normal_image(normal: Tensor, alpha: Tensor, background: float = 1.0) -> Tensor:
    """Map a world-space normal map (V, H, W, 3) to colours in [0, 1] (``n * 0.5 + 0.5``) over a flat background."""
    return (normal * 0.5 + 0.5 * alpha[..., None]) + (1.0 - alpha[..., None]) * background
