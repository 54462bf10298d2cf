"""Mesh codec and validation shared by both sides of the wire.

A mesh travels as arrays: ``vertices`` float32 (N, 3), ``faces`` uint32 (M, 3), optional ``colors`` uint8
(N, 3 or 4), ``normals`` float32 (N, 3) and ``uvs`` float32 (M, 3, 2) (a UV map per face corner, v up). :func:`validate_mesh` checks shapes, dtypes, finiteness, index range
and size limits and raises :class:`MeshError` with a message a person can act on.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MAX_FACES = 2_000_000  # default face limit for anything that crosses the wire
MAX_VERTICES = 3 * MAX_FACES


class MeshError(ValueError):
    """A mesh that cannot be used, with a human-readable reason."""


def as_mesh_arrays(
    vertices,
    faces,
    colors=None,
    normals=None,
    uvs=None,
) -> dict[str, np.ndarray]:
    """Convert array-likes to the wire dtypes (no copy when already right): float32, uint32, uint8, float32,
    float32 (uvs as (M, 3, 2)).

    Float colours in [0, 1] are scaled to uint8.
    """
    out = {
        "vertices": np.ascontiguousarray(np.asarray(vertices, dtype=np.float32)),
        "faces": np.ascontiguousarray(np.asarray(faces).astype(np.uint32, copy=False)),
    }
    if colors is not None:
        c = np.asarray(colors)
        if c.dtype.kind == "f":
            c = np.clip(np.nan_to_num(c) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out["colors"] = np.ascontiguousarray(c.astype(np.uint8, copy=False))
    if normals is not None:
        out["normals"] = np.ascontiguousarray(np.asarray(normals, dtype=np.float32))
    if uvs is not None:
        out["uvs"] = np.ascontiguousarray(np.asarray(uvs, dtype=np.float32).reshape(-1, 3, 2))
    return out


def validate_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: Optional[np.ndarray] = None,
    normals: Optional[np.ndarray] = None,
    *,
    max_faces: int = MAX_FACES,
    what: str = "mesh",
    allow_empty: bool = False,
    uvs: Optional[np.ndarray] = None,
) -> None:
    """Raise :class:`MeshError` unless the arrays form a usable triangle mesh.

    Checks: shapes (N,3)/(M,3), numeric dtypes, at least one face (unless ``allow_empty``), the face limit,
    finite vertex coordinates, face indices inside [0, N), colours/normals with one row per vertex, finite UVs
    with one (3, 2) block per face.
    """
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshError(f"{what}: vertices must have shape (N, 3), got {tuple(v.shape)}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise MeshError(f"{what}: faces must be triangles with shape (M, 3), got {tuple(f.shape)}; triangulate first")
    if v.dtype.kind not in "fiu":
        raise MeshError(f"{what}: vertices must be numbers, got dtype {v.dtype}")
    if f.dtype.kind not in "iu":
        raise MeshError(f"{what}: face indices must be integers, got dtype {f.dtype}")
    if uvs is not None:
        u = np.asarray(uvs)
        if u.shape != (len(f), 3, 2):
            raise MeshError(f"{what}: uvs must have shape ({len(f)}, 3, 2) (per face corner), got {tuple(u.shape)}")
        if u.dtype.kind != "f" or not np.isfinite(u).all():
            raise MeshError(f"{what}: uvs must be finite floating-point numbers")
    if len(f) == 0 or len(v) == 0:
        if allow_empty:
            return
        raise MeshError(f"{what} is empty (no faces); select an object with geometry")
    if len(f) > max_faces:
        raise MeshError(
            f"{what} has {len(f):,} faces, more than the limit of {max_faces:,}; decimate it (Decimate modifier) first"
        )
    if len(v) > 3 * max_faces:
        raise MeshError(f"{what} has {len(v):,} vertices, more than the limit of {3 * max_faces:,}")
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise MeshError(f"{what} has {bad:,} vertices with NaN or infinite coordinates; fix or delete them")
    if f.dtype.kind == "i" and f.size and int(f.min()) < 0:
        raise MeshError(f"{what} has negative face indices")
    if f.size and int(f.max()) >= len(v):
        raise MeshError(
            f"{what} has faces that index vertex {int(f.max())}, past the last of its {len(v):,} vertices"
        )
    if colors is not None:
        c = np.asarray(colors)
        if c.ndim != 2 or c.shape[0] != len(v) or c.shape[1] not in (3, 4):
            raise MeshError(f"{what}: colors must have shape (N, 3) or (N, 4) with N={len(v)}, got {tuple(c.shape)}")
    if normals is not None:
        n = np.asarray(normals)
        if n.shape != v.shape:
            raise MeshError(f"{what}: normals must have the vertices' shape {tuple(v.shape)}, got {tuple(n.shape)}")
