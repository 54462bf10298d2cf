"""Baking colours into an image texture on a UV map, and reading a texture back (no torch here).

One bake for every workflow: stylize bakes its colour field onto the artist's UV map, generated results bake their
colour function (or their vertex colours) onto the atlas :mod:`backend.geometry.uv` unwraps.

UVs are per face corner, ``(M, 3, 2)`` float in [0, 1] with ``v`` up (Blender's UV convention, the request's
``mesh<i>.uvs``); an image is ``(size, size, 4)`` uint8 RGBA whose row 0 is the top (``v = 1``), as PNG stores it.

- :func:`uv_texels` rasterises the UV triangles: every texel whose centre lies in a triangle, with its barycentric
  weights (vectorised, in chunks with a cancellation check each).
- :func:`bake_image` asks a *sampler* ``(triangles (K,), barycentric (K, 3)) -> sRGB (K, 3) in [0, 1]`` for the
  colour of each covered texel and pads the islands by a few texels so filtering and mip-maps do not bleed the
  background in. Samplers: :func:`vertex_color_sampler` (barycentric blend of vertex colours),
  :func:`field_sampler` (a colour function at the surface point), :func:`nearest_color_sampler` (the colours of
  another, finer mesh near each surface point: what a decimated mesh keeps of the full one).
- :func:`sample_texture` reads an image back at UVs (bilinear), :func:`png_bytes` / :func:`png_rgba` encode/decode.
"""

from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np

from backend.events import checkpoint as cancel_checkpoint

Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]
TEXELS_PER_CHUNK = 1 << 21  # candidate texels tested at a time (~100 MB of temporaries); a cancel check each


def uv_texels(uvs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise per-corner UV triangles (M, 3, 2) into a ``size`` x ``size`` image: for every covered texel its
    row, column, triangle and barycentric weights (texel centres; row 0 is the top of the image, v = 1).

    A texel whose centre lies on an edge shared by two triangles appears for both, in triangle order (a later
    triangle's colour wins when written in order). Degenerate (zero-area) UV triangles cover nothing."""
    uv = np.asarray(uvs, dtype=np.float64).reshape(-1, 3, 2) * size  # pixel units; v up
    m = len(uv)
    empty = (np.zeros(0, np.int64),) * 3 + (np.zeros((0, 3)),)
    if m == 0:
        return empty
    a, b, c = uv[:, 0], uv[:, 1], uv[:, 2]
    lo = np.clip(np.floor(np.minimum(np.minimum(a, b), c) - 0.5), 0, size - 1).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(np.maximum(a, b), c) + 0.5), 0, size - 1).astype(np.int64)
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    w = hi[:, 0] - lo[:, 0] + 1
    h = hi[:, 1] - lo[:, 1] + 1
    ok = (w > 0) & (h > 0) & (np.abs(den) >= 1e-12) & np.isfinite(den)
    count = np.where(ok, w * h, 0)
    rows, cols, tris, bary = [], [], [], []
    ends = np.cumsum(count)
    start = 0
    while start < m:
        cancel_checkpoint()
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + TEXELS_PER_CHUNK, side="right"))
        stop = max(stop, start + 1)
        t_ids = np.arange(start, min(stop, m))
        n = count[t_ids]
        start = min(stop, m)
        total = int(n.sum())
        if total == 0:
            continue
        t = np.repeat(t_ids, n)
        first = np.cumsum(n) - n
        local = np.arange(total, dtype=np.int64) - np.repeat(first, n)
        px = lo[t, 0] + local % w[t] + 0.5
        py = lo[t, 1] + local // w[t] + 0.5
        at, bt, ct, dt = a[t], b[t], c[t], den[t]
        w0 = ((bt[:, 1] - ct[:, 1]) * (px - ct[:, 0]) + (ct[:, 0] - bt[:, 0]) * (py - ct[:, 1])) / dt
        w1 = ((ct[:, 1] - at[:, 1]) * (px - ct[:, 0]) + (at[:, 0] - ct[:, 0]) * (py - ct[:, 1])) / dt
        w2 = 1.0 - w0 - w1
        eps = -1e-6
        inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
        if not inside.any():
            continue
        rows.append((size - 1 - np.floor(py[inside])).astype(np.int64))
        cols.append(np.floor(px[inside]).astype(np.int64))
        tris.append(t[inside])
        bary.append(np.stack([w0[inside], w1[inside], w2[inside]], axis=1))
    if not rows:
        return empty
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(tris), np.concatenate(bary)


def to_u8(rgb: np.ndarray) -> np.ndarray:
    """Float colours in [0, 1] -> uint8 (rounded); uint8 pass through."""
    a = np.asarray(rgb)
    if a.dtype == np.uint8:
        return a
    return np.clip(np.nan_to_num(a.astype(np.float64)) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _as_unit_rgb(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c)
    if c.dtype.kind in "ui":
        c = c.astype(np.float64) / 255.0
    return np.asarray(c, dtype=np.float64)[:, :3]


def bake_image(uvs: np.ndarray, size: int, sampler: Sampler, *, chunk: int = 65_536,
               pad: Optional[int] = None) -> np.ndarray:
    """An (size, size, 4) uint8 RGBA image of the colours ``sampler`` gives on the UV map ``uvs`` (M, 3, 2).

    Each covered texel takes ``sampler(triangles, barycentric)`` at its centre's surface point; alpha is 255 on
    the islands and on a padding ring of ``pad`` texels around them (default ``max(2, size // 128)``, filled with
    the nearest island texel), 0 elsewhere, where the colour is the islands' mean (so a coarse mip-map level
    does not darken the edges)."""
    from scipy import ndimage

    r, c, t, w = uv_texels(uvs, size)
    rgb = np.zeros((len(t), 3))
    for s in range(0, len(t), chunk):
        cancel_checkpoint()
        rgb[s : s + chunk] = _as_unit_rgb(sampler(t[s : s + chunk], w[s : s + chunk]))
    img = np.zeros((size, size, 4), dtype=np.uint8)
    img[r, c, :3] = to_u8(rgb)
    img[r, c, 3] = 255
    covered = img[..., 3] > 0
    if covered.any() and not covered.all():
        cancel_checkpoint()
        dist, (ir, ic) = ndimage.distance_transform_edt(~covered, return_indices=True)
        ring = (~covered) & (dist <= (max(2, size // 128) if pad is None else pad))
        mean = img[covered, :3].mean(axis=0).round().astype(np.uint8)
        img[~covered, :3] = mean
        img[ring, :3] = img[ir[ring], ic[ring], :3]
        img[ring, 3] = 255
    return img


# ------------------------------------------------------------------------------------------------- samplers
def surface_points(vertices: np.ndarray, faces: np.ndarray, tris: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """The points (K, 3) float64 at barycentric weights ``bary`` on triangles ``tris``."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    return np.einsum("kj,kjd->kd", bary, v[f[tris]])


def vertex_color_sampler(faces: np.ndarray, colors: np.ndarray) -> Sampler:
    """Barycentric blend of the triangle's vertex colours (sRGB, as the wire carries them)."""
    f = np.asarray(faces, dtype=np.int64)
    col = _as_unit_rgb(colors)

    def sample(tris: np.ndarray, bary: np.ndarray) -> np.ndarray:
        return np.einsum("kj,kjc->kc", bary, col[f[tris]])

    return sample


def field_sampler(vertices: np.ndarray, faces: np.ndarray,
                  color_fn: Callable[[np.ndarray], np.ndarray]) -> Sampler:
    """A colour function ``points (K, 3) float32 -> colours (K, 3|4)`` (float in [0, 1] or uint8) at the surface
    point of each texel: the texture then holds the colour field itself, finer than the mesh's vertices."""

    def sample(tris: np.ndarray, bary: np.ndarray) -> np.ndarray:
        pts = surface_points(vertices, faces, tris, bary).astype(np.float32)
        return _as_unit_rgb(color_fn(pts))

    return sample


def nearest_color_sampler(vertices: np.ndarray, faces: np.ndarray, src_vertices: np.ndarray,
                          src_colors: np.ndarray, k: int = 4) -> Sampler:
    """The colours of a finer mesh (``src_vertices`` with ``src_colors``) near each surface point of this one
    (inverse-distance weights of the ``k`` nearest source vertices): a decimated mesh's texture keeps the detail
    of the colours it had before decimation."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.asarray(src_vertices, dtype=np.float64))
    col = _as_unit_rgb(src_colors)
    k = max(1, min(int(k), len(col)))

    def sample(tris: np.ndarray, bary: np.ndarray) -> np.ndarray:
        pts = surface_points(vertices, faces, tris, bary)
        d, idx = tree.query(pts, k=k)
        if k == 1:
            return col[idx]
        wt = 1.0 / np.maximum(d, 1e-9)
        wt /= wt.sum(axis=1, keepdims=True)
        return np.einsum("kn,knc->kc", wt, col[idx])

    return sample


# ------------------------------------------------------------------------------------------------- images
def sample_texture(rgba: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples (K, C) float in [0, 255] of an image (H, W, C) (row 0 = v 1) at UVs (K, 2), clamped to the
    edge (texel centres at ``(i + 0.5) / size``, as GPUs sample)."""
    img = np.asarray(rgba, dtype=np.float64)
    h, w = img.shape[:2]
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def png_bytes(rgba: np.ndarray) -> bytes:
    """PNG of an (H, W, 3|4) uint8 image (top row first)."""
    from PIL import Image as PILImage

    a = np.ascontiguousarray(rgba, dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a, mode="RGBA" if a.shape[2] == 4 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_rgba(png: bytes) -> np.ndarray:
    """(H, W, 4) uint8 RGBA pixels of a PNG (or any image PIL reads), top row first."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGBA"), dtype=np.uint8).copy()
