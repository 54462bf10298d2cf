"""Numpy-only preparation of a streamed mesh for Blender (no ``bpy`` here, so it can run in a worker thread).

Blender's fast ``foreach_set`` paths copy whole buffers in about a millisecond, but only when the arrays already
have exactly the layout Blender stores: ``position`` float32 (N*3), ``.corner_vert`` / ``.corner_edge`` int32
(3M), ``.edge_verts`` int32 (E*2), face ``loop_start`` int32 (M) and colours as a FLOAT_COLOR attribute, i.e.
linear float32 RGBA (N*4). (A BYTE_COLOR attribute set through ``color_srgb`` converts per element: ~50x slower.)
Computing the edge table is the slow part (hundreds of milliseconds at 1M faces) and is done here, off the main
thread, so the UI never waits on it (DESIGN.md, "In Blender": ``foreach_set`` on prepared numpy arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

try:  # inside the installed extension
    from .shared.color import colors_to_linear_rgba, srgb_to_linear
    from .shared.mesh import MeshError, validate_mesh
except ImportError:  # running from the repository (tests of this module outside Blender)
    from shared.color import colors_to_linear_rgba, srgb_to_linear  # type: ignore[no-redef]
    from shared.mesh import MeshError, validate_mesh  # type: ignore[no-redef]


@dataclass
class PreparedMesh:
    """Arrays in Blender's own storage layout, ready for ``foreach_set`` (all C-contiguous and flat)."""

    name: str
    positions: np.ndarray  # float32 (N*3,)
    corner_verts: np.ndarray  # int32 (M*3,)
    corner_edges: np.ndarray  # int32 (M*3,)
    edge_verts: np.ndarray  # int32 (E*2,)
    loop_starts: np.ndarray  # int32 (M,)
    colors: Optional[np.ndarray]  # float32 (N*4,) linear RGBA in [0, 1], or None
    n_vertices: int
    n_faces: int
    n_edges: int
    uvs: Optional[np.ndarray] = None  # float32 (M*3*2,) a UV per face corner (corner order = face order), or None

    @property
    def n_corners(self) -> int:
        return 3 * self.n_faces


def triangle_edges(faces: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges of a triangle mesh and, for each face corner, the edge that leaves it.

    Returns ``(edge_verts (E, 2) int32, corner_edges (3M,) int32)`` where corner ``3f + k`` goes from
    ``faces[f, k]`` to ``faces[f, (k + 1) % 3]`` - Blender's convention for ``.corner_edge``.
    """
    f = np.asarray(faces, dtype=np.int64)
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    key = np.minimum(a, b)
    key *= np.int64(max(n_vertices, 1))
    key += np.maximum(a, b)
    # timsort: meshes from marching cubes or grids are nearly sorted by vertex index, where it is ~10x faster
    # than introsort (1M faces: ~0.1 s instead of ~1 s)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    new = np.empty(len(sk), dtype=bool)
    if len(sk):
        new[0] = True
        np.not_equal(sk[1:], sk[:-1], out=new[1:])
    edge_of_sorted = np.cumsum(new, dtype=np.int64) - 1
    corner_edges = np.empty(len(sk), dtype=np.int32)
    corner_edges[order] = edge_of_sorted
    uk = sk[new]
    n = np.int64(max(n_vertices, 1))
    edge_verts = np.empty((len(uk), 2), dtype=np.int32)
    edge_verts[:, 0] = uk // n
    edge_verts[:, 1] = uk % n
    return edge_verts, corner_edges


def prepare_mesh(
    name: str,
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: Optional[np.ndarray] = None,
    *,
    max_faces: Optional[int] = None,
    uvs: Optional[np.ndarray] = None,
) -> PreparedMesh:
    """Validate a wire mesh and lay it out for Blender; raises :class:`shared.mesh.MeshError` when unusable.

    Validation matters on this side too: Blender trusts face indices, and an index past the last vertex would
    crash it rather than raise.
    """
    kw = {} if max_faces is None else {"max_faces": max_faces}
    validate_mesh(vertices, faces, colors, what=f"mesh {name!r}", allow_empty=True, uvs=uvs, **kw)
    v = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1)
    f = np.ascontiguousarray(faces).astype(np.int32, copy=False)
    n_v = len(v) // 3
    n_f = f.shape[0] if f.ndim == 2 else 0
    if n_f:
        edge_verts, corner_edges = triangle_edges(f, n_v)
    else:
        edge_verts, corner_edges = np.zeros((0, 2), np.int32), np.zeros(0, np.int32)
    cols = None
    if colors is not None and len(colors) == n_v and n_v:
        cols = colors_to_linear_rgba(colors)
    return PreparedMesh(
        name=name,
        positions=v,
        corner_verts=np.ascontiguousarray(f.reshape(-1)),
        corner_edges=corner_edges,
        edge_verts=np.ascontiguousarray(edge_verts.reshape(-1)),
        loop_starts=np.arange(0, 3 * n_f, 3, dtype=np.int32),
        colors=cols,
        n_vertices=n_v,
        n_faces=n_f,
        n_edges=len(edge_verts),
        uvs=None if uvs is None or not n_f else np.ascontiguousarray(uvs, dtype=np.float32).reshape(-1),
    )


__all__ = ["PreparedMesh", "prepare_mesh", "triangle_edges", "colors_to_linear_rgba", "srgb_to_linear", "MeshError"]
