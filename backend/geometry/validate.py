"""Mesh validation for backend code: :func:`shared.mesh.validate_mesh` re-raised as :class:`InputError`, plus extent."""

from __future__ import annotations

from typing import Optional

import numpy as np

from backend.errors import InputError
from shared.mesh import MeshError, validate_mesh

MIN_EXTENT = 1e-8  # a mesh whose bounding box is smaller than this in every axis has no usable size


def check_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: Optional[np.ndarray] = None,
    *,
    what: str = "mesh",
    require_extent: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a triangle mesh and return ``(vertices float64 (N,3), faces int64 (M,3))``.

    Raises :class:`InputError` (code ``bad_input``) for an empty mesh, NaN/inf vertices, out-of-range face
    indices, wrong shapes, and (with ``require_extent``) a mesh whose used vertices span zero size in every axis.
    """
    try:
        validate_mesh(vertices, faces, colors, what=what)
    except MeshError as exc:
        raise InputError(str(exc)) from None
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces).astype(np.int64, copy=False)
    if require_extent:
        used = v[np.unique(f)]
        extent = float((used.max(axis=0) - used.min(axis=0)).max())
        if not extent > MIN_EXTENT:
            raise InputError(
                f"{what} has zero size (all its vertices are at one point); scale it up or pick another object"
            )
    return v, f
