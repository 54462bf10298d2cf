"""Mesh files in and out (GLB, OBJ, PLY) with vertex colours, each in the frame its format's tools expect.

The backend's frame is Z-up, metres (Blender's). At the file boundary (``docs/internals.md``, "Files"):

- GLB is Y-up with +Z forward and linear ``COLOR_0`` (glTF 2.0), written by :mod:`backend.geometry.gltf` and read
  through trimesh; backend ``(x, y, z)`` <-> file ``(x, z, -y)``, as Blender's glTF exporter and importer do.
- OBJ is Y-up, -Z forward (Blender's OBJ defaults, Maya, most DCC tools): the same mapping as glTF; its
  ``v x y z r g b`` colours are sRGB.
- PLY is Z-up, +Y forward (Blender's PLY defaults, MeshLab, scanners): no rotation; uchar colours are sRGB.

The mapping is a rotation: sizes, the origin and triangle winding are kept, and nothing is recentred or
rescaled, so an artist's mesh comes back where it was. ``export_mesh`` picks the format from the suffix;
``load_mesh`` returns a :class:`backend.events.MeshInput` in the backend's frame with the file's scene flattened
into one mesh (node transforms applied), colours as sRGB uint8 RGBA when the file has them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
import trimesh

from backend.errors import InputError
from backend.events import MeshInput
from backend.geometry.gltf import SOURCE_VERTEX, colors_from_accessor, glb_bytes, to_y_up, to_z_up
from backend.geometry.validate import check_mesh

log = logging.getLogger(__name__)

FORMATS = {".glb": "glb", ".obj": "obj", ".ply": "ply"}
Y_UP_FORMATS = ("glb", "obj")  # stored Y-up; PLY is stored Z-up like the backend


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
    *,
    uvs: Optional[np.ndarray] = None,
    texture: Optional[bytes] = None,
) -> Path:
    """Write a triangle mesh to ``path`` (GLB, OBJ or PLY by suffix), keeping per-vertex colours.

    ``vertices`` are in the backend's frame (Z-up, metres) and are stored in the format's own (module docstring);
    ``colors`` are sRGB, uint8 (N, 3|4) or float in [0, 1]. GLB also keeps a UV map ``uvs`` (M, 3, 2) per face
    corner and its base-colour ``texture`` (PNG bytes) (:func:`backend.geometry.gltf.glb_bytes`); OBJ and PLY keep
    the vertex colours only. Raises :class:`InputError` for a bad mesh or suffix.
    """
    path = Path(path)
    fmt = _format(path)
    check_mesh(vertices, faces, colors, what="mesh to export", require_extent=False)
    if uvs is not None:
        u = np.asarray(uvs)
        if u.shape != (len(faces), 3, 2) or not np.isfinite(u).all():
            raise InputError(f"uvs must be finite with shape ({len(faces)}, 3, 2), got {tuple(u.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "glb":
        path.write_bytes(glb_bytes(vertices, faces, colors, name=path.stem, uvs=uvs,
                                   texture=texture if uvs is not None else None))
    else:
        file_vertices = to_y_up(vertices) if fmt in Y_UP_FORMATS else vertices
        mesh = to_trimesh(file_vertices, faces, colors)
        if fmt == "obj":
            data = trimesh.exchange.obj.export_obj(mesh, include_color=colors is not None, include_texture=False)
            path.write_text(data)
        else:
            mesh.export(path, file_type=fmt)
    log.debug("wrote %s (%d vertices, %d faces)", path, len(vertices), len(faces))
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


def _texture_of(kw: dict) -> Optional[tuple]:
    """(per-vertex UVs (N, 2) with v up, PNG bytes of the base-colour texture, each vertex's index before the
    writer split the seams or None) of one parsed primitive, or None."""
    vis = kw.get("visual")
    uv = getattr(vis, "uv", None)
    mat = getattr(vis, "material", None)
    img = getattr(mat, "baseColorTexture", None)
    if uv is None or img is None or len(uv) != len(kw.get("vertices", ())):
        return None
    import io as _io

    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    src = (kw.get("vertex_attributes") or {}).get(SOURCE_VERTEX)
    if src is not None:
        src = np.asarray(src).reshape(-1)
        src = src.astype(np.int64) if len(src) == len(uv) and np.isfinite(src).all() else None
    return np.asarray(uv, dtype=np.float32), buf.getvalue(), src  # trimesh flipped v already (v up, Blender's)


def _load_glb(path: Path, textures: Optional[dict] = None) -> trimesh.Scene:
    """A GLB through trimesh's parser, with ``COLOR_0`` converted from linear at full precision.

    ``trimesh.load`` would store the accessor's linear values as uint8 as they are (sRGB mistaken for linear, and
    dark colours quantised away); here they become sRGB uint8 before the meshes are built. With ``textures`` (a
    dict), each textured geometry's (UVs, PNG) goes into it under the geometry's name.
    """
    from trimesh.exchange.gltf import load_glb

    with open(path, "rb") as fh:
        kwargs = load_glb(fh)
    scene = trimesh.Scene()
    for geom_name, kw in kwargs.get("geometry", {}).items():
        if "faces" not in kw:  # points or lines: not a triangle mesh
            continue
        if textures is not None:
            tex = _texture_of(kw)
            if tex is not None:
                textures[geom_name] = tex
        raw = kw.get("vertex_colors")
        if raw is None and kw.get("visual") is not None:  # with a material, trimesh keeps COLOR_0 aside
            raw = kw["visual"].vertex_attributes.get("color")
        if raw is not None:
            kw = {k: v for k, v in kw.items() if k != "visual"}
            kw["vertex_colors"] = colors_from_accessor(raw)
        scene.geometry[geom_name] = trimesh.Trimesh(**kw)
    for edge in kwargs.get("graph") or []:
        if edge.get("geometry") is not None and edge["geometry"] not in scene.geometry:
            edge = {k: v for k, v in edge.items() if k != "geometry"}  # keep the node, drop what is not a mesh
        scene.graph.update(**edge)
    if kwargs.get("base_frame"):
        scene.graph.base_frame = kwargs["base_frame"]
    return scene


def _vertex_colors(mesh: trimesh.Trimesh) -> Optional[np.ndarray]:
    visual = mesh.visual
    if getattr(visual, "kind", None) != "vertex":
        return None
    c = np.asarray(visual.vertex_colors)
    if c.shape != (len(mesh.vertices), 4):
        return None
    return c.astype(np.uint8)


def _weld_textured(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray], uv: np.ndarray,
                   png: bytes, source: Optional[np.ndarray]):
    """Undo the writer's seam split and move the UVs to the face corners: vertices with one ``source`` index
    (``_STEPSTONE_VERTEX``) become that vertex again; a file without it (another writer's) is welded where
    positions coincide. Without ``colors`` the vertices' colours are read from the texture at their UVs."""
    from backend.geometry.texture import png_rgba, sample_texture

    if colors is None:
        rgba = sample_texture(png_rgba(png), uv)
        colors = np.clip(rgba + 0.5, 0, 255).astype(np.uint8)
        colors[:, 3] = 255
    corner_uv = np.asarray(uv, dtype=np.float32)[faces]  # (M, 3, 2)
    key = source if source is not None else np.ascontiguousarray(vertices, dtype=np.float32)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first)  # the file's vertex order (by first occurrence)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keep = first[order]
    return vertices[keep], rank[inverse][faces].astype(np.uint32), colors[keep], corner_uv


def load_mesh(path: Union[str, Path], name: Optional[str] = None, *, textures: bool = False) -> MeshInput:
    """Read a GLB/OBJ/PLY file into a :class:`MeshInput` (float32 vertices, uint32 faces, uint8 RGBA colours).

    Vertices come back in the backend's frame (Z-up): a Y-up GLB or OBJ exported from Blender is upright.

    With ``textures`` (the job store reading back a textured result), a GLB holding one textured mesh comes back as
    it was sent: the writer's seam split undone, ``uvs`` per face corner, ``texture`` the PNG, and vertex colours
    from ``COLOR_0`` or else from the texture at each vertex's UV. Without it textures are not read.

    Missing files, unknown suffixes, unreadable or empty meshes and NaN vertices raise :class:`InputError`.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise InputError(f"mesh file not found: {path}")
    found: dict = {}
    try:
        if fmt == "glb":
            loaded = _load_glb(path, found if textures else None)
        else:
            loaded = trimesh.load(path, file_type=fmt, process=False, force=None)
    except InputError:
        raise
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise InputError(f"could not read {path}: {exc}") from None
    mesh = _flatten(loaded)
    vertices = np.asarray(to_z_up(mesh.vertices) if fmt in Y_UP_FORMATS else mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    colors = _vertex_colors(mesh)
    uvs = texture = None
    if len(found) == 1 and len(loaded.geometry) == 1:
        uv, texture, source = next(iter(found.values()))
        if len(uv) == len(vertices):
            vertices, faces, colors, uvs = _weld_textured(vertices, faces, colors, uv, texture, source)
        else:
            texture = None
    check_mesh(vertices, faces, colors, what=f"mesh in {path.name}", require_extent=False)
    return MeshInput(name=name or path.stem, vertices=vertices, faces=faces, colors=colors, matrix_world=None,
                     uvs=uvs, texture=texture)
