"""Mesh to SDF grid for any mesh an artist may select (closed, open, several parts, non-manifold).

Inside test: **flood fill of free space around an unsigned-distance band** (no reliance on face orientation,
manifoldness or closedness):

1. The mesh is normalised into the unit cube with a margin, and a resolution-R grid (samples on the cube faces,
   see :mod:`backend.fields.grid`) is laid over it; ``h = 1 / (R - 1)``.
2. Exact unsigned distance in a narrow band: voxels near dense surface samples get the exact point-triangle
   distance to the triangles of their nearest samples (``trimesh.triangles.closest_point``); farther voxels get
   the distance through the nearest band voxel (Euclidean distance transform), an upper bound that is exact along
   straight lines to the surface.
3. Voxels within ``seal * h`` of the surface (default 0.87 h, half a voxel diagonal) block; a voxel path that
   crosses a surface must pass through one, so a closed surface is watertight for the flood fill, and cracks
   narrower than about 1.7 voxels are sealed. The free voxels connected (6-neighbourhood) to the border of the
   grid are *outside*; free voxels not reached are *inside* (overlapping parts simply unite).
4. The blocked voxels right at the surface take the side whose region (inside or outside) is nearer.
5. Surfaces with no inside next to them (open sheets, a cup's wall, parts thinner than ~2 voxels) become a thin
   shell: ``sdf = udf - shell`` with ``shell = h`` (a wall two voxels thick), so they survive marching cubes.

So an open mesh whose holes are wider than ~2 voxels is treated as a surface with thickness, not as a solid.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

from backend.geometry.normalize import Normalization, fit_normalization
from backend.geometry.validate import check_mesh
from backend.events import cancellable
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

MAX_RESOLUTION = 512
SHELL_FREE_VOXELS = 3.5  # surfaces farther than this (voxels) from any inside region become shells


def _surface_samples(tri: np.ndarray, spacing: float, seed: int, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the triangles about ``spacing`` apart (area-weighted random + vertices + centroids), face ids."""
    area = trimesh.triangles.area(tri)
    total = float(area.sum())
    n = int(np.clip(total / (spacing * spacing), 1000, max_samples))
    rng = np.random.default_rng(seed)
    if total > 0:
        face = rng.choice(len(tri), size=n, p=area / total)
    else:
        face = rng.integers(0, len(tri), size=n)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bary = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=1)
    pts = np.einsum("nk,nkj->nj", bary, tri[face])
    centroids = tri.mean(axis=1)
    all_faces = np.arange(len(tri))
    # each distinct corner once (a shared vertex repeated per face would crowd the nearest-neighbour lists)
    corner_pts, first = np.unique(tri.reshape(-1, 3), axis=0, return_index=True)
    corner_faces = first // 3
    return (
        np.concatenate([pts, centroids, corner_pts]),
        np.concatenate([face, all_faces, corner_faces]),
    )


def unsigned_distance_grid(
    tri: np.ndarray,
    resolution: int,
    band_voxels: int = 2,
    k_faces: int = 6,
    seed: int = 0,
    return_closest: bool = False,
):
    """Unsigned distance (R, R, R) from the unit-cube grid samples to triangles ``tri`` (M, 3, 3) in unit space.

    Exact within ``band_voxels`` of the surface (nearest ``k_faces`` candidate triangles), upper bound beyond.
    With ``return_closest`` also returns the band mask (R, R, R) and the closest surface points of its voxels
    (in ``np.argwhere(mask)`` order).
    """
    R = resolution
    h = 1.0 / (R - 1)
    samples, sample_face = _surface_samples(tri, 0.5 * h, seed, max_samples=4_000_000)
    ijk = np.clip(np.rint((samples + 0.5) / h).astype(np.int64), 0, R - 1)
    cand = np.zeros((R, R, R), dtype=bool)
    cand[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    cand = ndimage.binary_dilation(cand, structure=np.ones((3, 3, 3), bool), iterations=band_voxels)
    idx = np.argwhere(cand)
    pts = idx * h - 0.5
    cancel_checkpoint()
    tree = cKDTree(samples)
    k = min(k_faces, len(samples))
    udf_c = np.full(len(pts), np.inf)
    closest_c = np.zeros_like(pts)
    step = 32_768  # ~0.1-0.5 s per slab: a cancelled job stops between slabs
    for s in range(0, len(pts), step):
        cancel_checkpoint()
        p = pts[s : s + step]
        _, nn = tree.query(p, k=k, workers=-1)
        fc = np.sort(sample_face[nn.reshape(len(p), k)], axis=1)  # (n, k) candidate triangles; repeats are harmless
        closest = trimesh.triangles.closest_point(tri[fc.ravel()], np.repeat(p, k, axis=0))
        d = np.linalg.norm(closest - np.repeat(p, k, axis=0), axis=1).reshape(len(p), k)
        best = d.argmin(axis=1)
        udf_c[s : s + step] = d[np.arange(len(p)), best]
        closest_c[s : s + step] = closest.reshape(len(p), k, 3)[np.arange(len(p)), best]
    cancel_checkpoint()
    udf = np.zeros((R, R, R))
    udf[cand] = udf_c
    # Beyond the band: distance to the nearest band voxel plus that voxel's own distance (triangle inequality).
    if not cand.all():
        cancel_checkpoint()
        dist, nearest = cancellable(ndimage.distance_transform_edt, ~cand, return_indices=True)
        far = ~cand
        nb = tuple(nearest[a][far] for a in range(3))
        udf[far] = dist[far] * h + udf[nb]
    if return_closest:
        return udf, cand, closest_c
    return udf


def mesh_to_sdf(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = 64,
    padding: Optional[float] = None,
    normalization: Optional[Normalization] = None,
    seal: float = 0.87,
    seed: int = 0,
) -> tuple[np.ndarray, Normalization]:
    """Signed distance grid (R, R, R) float32 of a mesh in the unit cube (negative inside) and its normalisation.

    Args:
        vertices, faces: any triangle mesh (validated; bad input raises :class:`InputError`).
        resolution: R, grid samples per axis (64-128 typical; 8..512).
        padding: margin of the unit cube left around the mesh (default ``max(0.05, 3 h)``) so the border is free.
        normalization: use this transform instead of fitting one (e.g. to compare two meshes on one grid).
        seal: blocking distance of the flood fill in voxels (see module docstring).
        seed: surface sampling seed (results are deterministic for a seed).

    Distances are in unit-cube units; multiply by ``1 / normalization.scale`` for the mesh's own units.
    """
    if not 8 <= int(resolution) <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be in [8, {MAX_RESOLUTION}], got {resolution}")
    R = int(resolution)
    h = 1.0 / (R - 1)
    v, f = check_mesh(vertices, faces, what="mesh")
    if normalization is None:
        normalization = fit_normalization(v[np.unique(f)], max(0.05, 3.0 * h) if padding is None else padding)
    tri = normalization.to_unit(v)[f]
    udf, band, closest = unsigned_distance_grid(tri, R, seed=seed, return_closest=True)

    cancel_checkpoint()
    blocked = udf <= seal * h
    free = ~blocked
    labels, _ = ndimage.label(free)  # 6-connectivity
    border = np.concatenate(
        [labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel(),
         labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    border = np.unique(border[border > 0])
    cancel_checkpoint()
    outside = np.isin(labels, border)
    core = free & ~outside

    inside = core.copy()
    if core.any():
        cancel_checkpoint()
        d_core = cancellable(ndimage.distance_transform_edt, ~core)
        cancel_checkpoint()
        d_out = cancellable(ndimage.distance_transform_edt, ~outside) if outside.any() else np.full(udf.shape, np.inf)
        # Side of each blocked voxel: probe 2 voxels away from its closest surface point along the direction to
        # the voxel (a free voxel for locally flat surfaces); if the probe lands on a blocked voxel, the nearer
        # region (inside core or outside) decides.
        cancel_checkpoint()
        region = np.zeros(udf.shape, np.int8)  # 1 inside core, -1 outside, 0 blocked
        region[core] = 1
        region[outside] = -1
        band_idx = np.argwhere(band)
        is_blocked = blocked[band]
        bidx = band_idx[is_blocked]
        p = bidx * h - 0.5
        c = closest[is_blocked]
        u = p - c
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        q = np.clip(np.rint((c + 2.0 * h * u + 0.5) / h).astype(np.int64), 0, R - 1)
        probe = region[q[:, 0], q[:, 1], q[:, 2]]
        fallback = np.where(d_core[tuple(bidx.T)] < d_out[tuple(bidx.T)], 1, -1)
        side = np.where(probe != 0, probe, fallback)
        inside[tuple(bidx[side > 0].T)] = True
        cancel_checkpoint()
        near_core = d_core <= SHELL_FREE_VOXELS
    else:
        near_core = np.zeros_like(core)
    cancel_checkpoint()
    sdf = np.where(inside, -udf, udf)
    # Open sheets and very thin parts: a shell ``h`` thick on each side of the surface.
    shell = ~near_core
    sdf[shell] = np.minimum(sdf[shell], udf[shell] - h)
    log.debug("mesh_to_sdf: R=%d inside voxels=%d shell voxels=%d", R, int(inside.sum()), int((sdf[shell] < 0).sum()))
    return sdf.astype(np.float32), normalization


def mesh_occupancy(
    vertices: np.ndarray, faces: np.ndarray, resolution: int, normalization: Optional[Normalization] = None
) -> tuple[np.ndarray, Normalization]:
    """Boolean occupancy grid (R, R, R) of a mesh (``mesh_to_sdf < 0``) and its normalisation."""
    sdf, norm = mesh_to_sdf(vertices, faces, resolution, normalization=normalization)
    return sdf < 0, norm
