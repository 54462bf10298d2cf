"""Mesh files in and out (GLB, OBJ, PLY) with vertex colours, through trimesh.

``export_mesh`` picks the format from the suffix; ``load_mesh`` returns a :class:`backend.events.MeshInput` with
the file's scene flattened into one mesh (node transforms applied), colours as uint8 RGBA when the file has them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
import trimesh

from backend.errors import InputError
from backend.events import MeshInput
from backend.geometry.validate import check_mesh

log = logging.getLogger(__name__)

FORMATS = {".glb": "glb", ".obj": "obj", ".ply": "ply"}


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"unsupported mesh file type {path.suffix!r} for {path}; use one of {', '.join(FORMATS)}")
    return fmt


def _colors_u8(colors: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    if colors is None:
        return None
    c = np.asarray(colors)
    if c.dtype.kind == "f":
        c = np.clip(np.nan_to_num(c) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        c = np.clip(c, 0, 255).astype(np.uint8)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise InputError(f"colors must have shape ({n}, 3) or ({n}, 4), got {tuple(c.shape)}")
    if c.shape[1] == 3:
        c = np.concatenate([c, np.full((n, 1), 255, np.uint8)], axis=1)
    return c


def to_trimesh(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None) -> trimesh.Trimesh:
    """Build a ``trimesh.Trimesh`` without merging or reordering vertices (``process=False``)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces).astype(np.int64, copy=False)
    c = _colors_u8(colors, len(v))
    return trimesh.Trimesh(vertices=v, faces=f, vertex_colors=c, process=False)


def export_mesh(
    path: Union[str, Path],
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: Optional[np.ndarray] = None,
) -> Path:
    """Write a triangle mesh to ``path`` (GLB, OBJ or PLY by suffix), keeping per-vertex colours.

    ``colors`` may be uint8 (N, 3|4) or float in [0, 1]. Raises :class:`InputError` for a bad mesh or suffix.
    """
    path = Path(path)
    fmt = _format(path)
    check_mesh(vertices, faces, colors, what="mesh to export", require_extent=False)
    mesh = to_trimesh(vertices, faces, colors)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "obj":
        data = trimesh.exchange.obj.export_obj(mesh, include_color=colors is not None, include_texture=False)
        path.write_text(data)
    else:
        mesh.export(path, file_type=fmt)
    log.debug("wrote %s (%d vertices, %d faces)", path, len(mesh.vertices), len(mesh.faces))
    return path


def _flatten(loaded) -> trimesh.Trimesh:
    if isinstance(loaded, trimesh.Trimesh):
        return loaded
    if isinstance(loaded, trimesh.Scene):
        meshes = []
        for node in loaded.graph.nodes_geometry:
            transform, geom_name = loaded.graph[node]
            geom = loaded.geometry[geom_name]
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
                g = geom.copy()
                g.apply_transform(transform)
                meshes.append(g)
        if not meshes:
            raise InputError("the file holds no triangle mesh")
        return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
    raise InputError(f"the file holds a {type(loaded).__name__}, not a triangle mesh")


def _vertex_colors(mesh: trimesh.Trimesh) -> Optional[np.ndarray]:
    visual = mesh.visual
    if getattr(visual, "kind", None) != "vertex":
        return None
    c = np.asarray(visual.vertex_colors)
    if c.shape != (len(mesh.vertices), 4):
        return None
    return c.astype(np.uint8)


def load_mesh(path: Union[str, Path], name: Optional[str] = None) -> MeshInput:
    """Read a GLB/OBJ/PLY file into a :class:`MeshInput` (float32 vertices, uint32 faces, uint8 RGBA colours).

    Missing files, unknown suffixes, unreadable or empty meshes and NaN vertices raise :class:`InputError`.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise InputError(f"mesh file not found: {path}")
    try:
        loaded = trimesh.load(path, file_type=fmt, process=False, force=None)
    except InputError:
        raise
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise InputError(f"could not read {path}: {exc}") from None
    mesh = _flatten(loaded)
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    colors = _vertex_colors(mesh)
    check_mesh(vertices, faces, colors, what=f"mesh in {path.name}", require_extent=False)
    return MeshInput(name=name or path.stem, vertices=vertices, faces=faces, colors=colors, matrix_world=None)
