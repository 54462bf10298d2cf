"""Grid to mesh: marching cubes (scikit-image), vertex colours from a colour field, clean-up, decimation."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import marching_cubes

from backend.errors import StepstoneError
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

UNIT_BBOX = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))
ColorFn = Callable[[np.ndarray], np.ndarray]


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces, dtype=np.int64)]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def _compact(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray]):
    used, inverse = np.unique(faces.ravel(), return_inverse=True)
    faces = inverse.reshape(-1, 3)
    return vertices[used], faces, None if colors is None else colors[used]


def remove_small_components(
    vertices: np.ndarray, faces: np.ndarray, min_fraction: float, colors: Optional[np.ndarray] = None
):
    """Drop connected parts whose surface area is below ``min_fraction`` of the largest part's area."""
    if min_fraction <= 0 or len(faces) == 0:
        return vertices, faces, colors
    n = len(vertices)
    f = faces.astype(np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    cancel_checkpoint()
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    if n_comp <= 1:
        return vertices, faces, colors
    face_label = label[f[:, 0]]
    area = np.bincount(face_label, weights=face_areas(vertices, f), minlength=n_comp)
    keep = area >= min_fraction * area.max()
    kept = keep[face_label]
    log.debug("removed %d of %d parts (%d faces)", int((~keep).sum()), n_comp, int((~kept).sum()))
    return _compact(vertices, f[kept], colors)


# Above this many faces a mesh is first clustered down to CLUSTER_FACTOR x the target (interruptible, chunked
# bisection) before the quadric pass, whose single C call takes ~1 s per million faces and cannot be cancelled.
QUADRIC_MAX_FACES = 1_000_000
CLUSTER_FACTOR = 4


def decimate(
    vertices: np.ndarray, faces: np.ndarray, target_faces: int, colors: Optional[np.ndarray] = None
):
    """Reduce to at most ``target_faces`` faces by quadric edge collapse (Garland & Heckbert 1997, through
    ``fast-simplification``, the library trimesh uses): edges collapse in order of the quadric error of their
    merged vertex, so flat regions lose triangles first and edges and thin parts keep theirs. Colours follow the
    nearest vertex of the input. A mesh far above the target is first reduced by :func:`cluster_decimate`.
    """
    f = np.asarray(faces, dtype=np.int64)
    if target_faces <= 0:
        raise ValueError("target_faces must be positive")
    if len(f) <= target_faces:
        return vertices, faces, colors
    import fast_simplification

    v0, f0, c0 = vertices, f, colors
    if len(f) > max(QUADRIC_MAX_FACES, CLUSTER_FACTOR * target_faces):
        v0, f0, c0 = cluster_decimate(vertices, f, CLUSTER_FACTOR * target_faces, colors)
        f0 = np.asarray(f0, dtype=np.int64)
    cancel_checkpoint()
    vf = np.asarray(v0, dtype=np.float32)
    ask = int(target_faces)
    for _ in range(4):  # the collapse can stop a little above its target on small meshes: ask for less
        nv, nf = fast_simplification.simplify(vf, f0, target_count=ask)
        cancel_checkpoint()
        nf = np.asarray(nf, dtype=np.int64)
        if len(nf) <= target_faces or ask <= 4:
            break
        ask = max(4, ask - (len(nf) - target_faces) - ask // 20)
    if len(nf) == 0:
        return cluster_decimate(vertices, f, target_faces, colors)
    nc = None
    if c0 is not None:
        from scipy.spatial import cKDTree

        _, near = cKDTree(np.asarray(v0, dtype=np.float64)).query(np.asarray(nv, dtype=np.float64))
        nc = np.asarray(c0)[near]
    out = _compact(np.asarray(nv, dtype=np.asarray(vertices).dtype), nf, nc)
    if len(out[1]) > target_faces:  # quadric collapse stopped short (few faces left): clustering meets the budget
        return cluster_decimate(vertices, f, target_faces, colors)
    return out


def cluster_decimate(
    vertices: np.ndarray, faces: np.ndarray, target_faces: int, colors: Optional[np.ndarray] = None
):
    """Reduce to at most ``target_faces`` faces by vertex clustering on a uniform grid (Rossignac-Borrel).

    Vertices in one cell merge into their mean (colours averaged); collapsed and duplicate faces are dropped. The
    cell size is found by bisection (a cancellation check per step). Coarser than quadric edge collapse, but fast
    and interruptible on meshes of millions of faces; :func:`decimate` uses it as a first pass on those.
    """
    f = np.asarray(faces, dtype=np.int64)
    if target_faces <= 0:
        raise ValueError("target_faces must be positive")
    if len(f) <= target_faces:
        return vertices, faces, colors
    v = np.asarray(vertices, dtype=np.float64)
    lo = v.min(axis=0)
    extent = float((v.max(axis=0) - lo).max()) or 1.0

    def cluster(cell: float):
        key = np.floor((v - lo) / cell).astype(np.int64)
        _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        nf = inv[f]
        ok = (nf[:, 0] != nf[:, 1]) & (nf[:, 1] != nf[:, 2]) & (nf[:, 0] != nf[:, 2])
        nf = nf[ok]
        canon = np.sort(nf, axis=1)
        _, first = np.unique(canon, axis=0, return_index=True)
        return inv, counts, nf[np.sort(first)]

    lo_cell, hi_cell = extent * 1e-4, extent * 0.5
    best = cluster(hi_cell)
    for _ in range(18):
        cancel_checkpoint()
        mid = np.sqrt(lo_cell * hi_cell)
        res = cluster(mid)
        if len(res[2]) > target_faces:
            lo_cell = mid
        else:
            hi_cell, best = mid, res
    inv, counts, nf = best
    nv = np.zeros((counts.size, 3))
    np.add.at(nv, inv, v)
    nv /= counts[:, None]
    nc = None
    if colors is not None:
        acc = np.zeros((counts.size, colors.shape[1]))
        np.add.at(acc, inv, colors.astype(np.float64))
        nc = (acc / counts[:, None]).round().astype(colors.dtype)
    return _compact(nv.astype(vertices.dtype), nf, nc)


def extract_mesh(
    grid: np.ndarray,
    level: float = 0.0,
    bbox: Sequence[Sequence[float]] = UNIT_BBOX,
    color_fn: Optional[ColorFn] = None,
    min_component_fraction: float = 0.02,
    target_faces: Optional[int] = None,
    inside: str = "below",
    allow_empty: bool = False,
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Marching cubes of ``grid`` (X, Y, Z) at ``level`` -> ``(vertices f32 (N,3), faces u32 (M,3), colors)``.

    Args:
        grid: scalar samples at the corners of ``bbox`` (see :mod:`backend.fields.grid`): an SDF (inside below the
            level, the default) or a density / occupancy (pass ``inside="above"``).
        level: iso-value (0 for an SDF; for Eq. 9 density from an SDF the surface is at ``1 / (2 beta)``).
        bbox: ``(min_xyz, max_xyz)`` world box of the grid, default the unit cube.
        color_fn: ``points (N, 3) float32 -> colours (N, 3|4)`` float in [0, 1] or uint8, evaluated at the final
            vertices; colours come back uint8.
        min_component_fraction: parts with less area than this fraction of the largest part are removed.
        target_faces: decimate to at most this many faces (quadric edge collapse, :func:`decimate`), None to keep
            all.
        inside: "below" or "above" the level.
        allow_empty: return empty arrays instead of raising when the grid has no surface.

    The grid is padded with one layer of "outside" so shapes touching the box stay closed; faces are oriented
    with outward normals (counter-clockwise seen from outside).
    """
    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 3 or min(g.shape) < 2:
        raise ValueError(f"grid must have shape (X, Y, Z) with every side >= 2, got {tuple(g.shape)}")
    if inside not in ("below", "above"):
        raise ValueError(f"inside must be 'below' or 'above', got {inside!r}")
    if not np.isfinite(g).all():
        g = np.nan_to_num(g, nan=np.inf if inside == "below" else -np.inf)
        g = np.clip(g, -1e6, 1e6)
    if inside == "above":  # turn into "inside below" so orientation logic is shared
        g, level = -g, -level
    bmin = np.asarray(bbox[0], dtype=np.float64)
    bmax = np.asarray(bbox[1], dtype=np.float64)
    spacing = (bmax - bmin) / (np.asarray(g.shape) - 1)
    empty = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32), None)
    if not (g.min() < level < g.max()):
        if allow_empty:
            return empty
        raise StepstoneError(
            f"the shape is empty: no surface at level {level:g} (values span {g.min():.4g}..{g.max():.4g}); "
            "try more iterations, another seed or a different prompt"
        )
    cancel_checkpoint()
    outside_value = max(float(g.max()), level + 1.0)
    gp = np.pad(g, 1, mode="constant", constant_values=outside_value)
    verts, faces, _, _ = marching_cubes(gp, level=level, spacing=tuple(spacing), gradient_direction="ascent")
    verts = np.clip(verts - spacing + bmin, bmin, bmax)  # caps from the padding lie on the box faces
    faces = faces.astype(np.int64)
    # scikit-image's winding depends on gradient_direction; make normals point outward (positive signed volume).
    tri = verts[faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if signed_volume < 0:
        faces = faces[:, ::-1]
    colors = None
    cancel_checkpoint()
    verts, faces, _ = remove_small_components(verts, faces, min_component_fraction)
    if target_faces is not None:
        verts, faces, _ = decimate(verts, faces, int(target_faces))
    if color_fn is not None and len(verts):
        cancel_checkpoint()
        c = np.asarray(color_fn(verts.astype(np.float32)))
        if c.ndim != 2 or c.shape[0] != len(verts) or c.shape[1] not in (3, 4):
            raise ValueError(f"color_fn must return ({len(verts)}, 3|4) colours, got {tuple(c.shape)}")
        if c.dtype.kind == "f":
            c = np.clip(np.nan_to_num(c) * 255.0 + 0.5, 0, 255)
        colors = c.astype(np.uint8)
    return verts.astype(np.float32), faces.astype(np.uint32), colors
