"""glTF 2.0 binary (GLB) for Stepstone's results, written to the letter of the specification.

The backend works Z-up (Blender's frame); glTF is Y-up with +Z forward (glTF 2.0 spec, "Coordinate System and
Units"). :data:`Z_UP_TO_Y_UP` maps one to the other exactly as Blender's glTF exporter does, backend
``(x, y, z)`` -> glTF ``(x, z, -y)``, a rotation, so sizes, origin and triangle winding are kept.

``COLOR_0`` is linear by specification (spec 3.7.2.1) and multiplies the material's base colour; the wire's sRGB
vertex colours are converted with :mod:`shared.color` and stored as normalised unsigned shorts, fine enough that
uint8 sRGB colours come back exactly. Smooth vertex normals are written (without them a viewer must shade flat),
and one material (white, dielectric, double-sided) so that viewers do not fall back to glTF's default material,
which is fully metallic.

A textured result (per-corner ``uvs`` and a PNG ``texture``) gets ``TEXCOORD_0`` and the PNG as the material's
``baseColorTexture`` (spec 3.9.2; embedded in the binary chunk, ``image/png``, linear filtering with mip-maps,
clamped edges). glTF's UVs are per vertex with the origin at the image's top left, so vertices are split where
corners of one vertex have different UVs (normals are still the smooth normals of the unsplit mesh: no shading
seams) and ``v`` is flipped; an application-specific attribute ``_STEPSTONE_VERTEX`` (float, exact to 2^24) keeps
each vertex's index before the split, so the job store reads the mesh back as it was. ``COLOR_0`` is then left out, because it would multiply the texture (spec 3.7.2.1) and
darken it: the texture already holds the colours.
"""

from __future__ import annotations

import json
import struct
from typing import Optional

import numpy as np

from shared.color import colors_to_linear_rgba, linear_rgba_to_srgb8

# backend Z-up -> glTF Y-up (+Z forward): (x, y, z) -> (x, z, -y); its transpose maps back
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
Y_UP_TO_Z_UP = Z_UP_TO_Y_UP.T.copy()

_GLB_MAGIC = 0x46546C67  # "glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_FLOAT, _UNSIGNED_SHORT, _UNSIGNED_INT = 5126, 5123, 5125
_TRIANGLES = 4
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
SOURCE_VERTEX = "_STEPSTONE_VERTEX"  # a split vertex's index in the unsplit mesh (textured GLB)
GREY = (0.8, 0.8, 0.8, 1.0)  # linear base colour of an uncoloured mesh (Blender's default material)


def to_y_up(points: np.ndarray) -> np.ndarray:
    """Backend (Z-up) points (N, 3) -> glTF/OBJ (Y-up, +Z forward)."""
    return np.asarray(points, dtype=np.float64) @ Z_UP_TO_Y_UP.T


def to_z_up(points: np.ndarray) -> np.ndarray:
    """glTF/OBJ (Y-up, +Z forward) points (N, 3) -> backend (Z-up)."""
    return np.asarray(points, dtype=np.float64) @ Y_UP_TO_Z_UP.T


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (float32 (N, 3)); a vertex with no area gets +Y (glTF's up)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length = twice the triangle's area
    idx = f.reshape(-1)
    n = np.stack([np.bincount(idx, np.repeat(fn[:, k], 3), minlength=len(v)) for k in range(3)], axis=1)
    length = np.linalg.norm(n, axis=1)
    ok = length > 1e-20
    out = np.zeros_like(n)
    out[:, 1] = 1.0
    out[ok] = n[ok] / length[ok, None]
    return out.astype(np.float32)


def colors_from_accessor(raw: np.ndarray) -> np.ndarray:
    """A ``COLOR_0`` accessor's values (float, or normalised uint8/uint16; VEC3 or VEC4) -> sRGB uint8 RGBA."""
    c = np.asarray(raw)
    if c.dtype.kind in "ui":
        c = c.astype(np.float64) / float(np.iinfo(c.dtype).max)
    c = c.reshape(len(c), -1)
    return linear_rgba_to_srgb8(c[:, :4])


class _Buffer:
    """The GLB's one binary buffer: each appended array gets a 4-byte aligned buffer view and an accessor."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def add(self, array: np.ndarray, component: int, kind: str, target: int, **extra) -> int:
        raw = np.ascontiguousarray(array).tobytes()
        offset = len(self.data)
        self.data += raw
        self.data += b"\0" * (-len(self.data) % 4)
        self.views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(raw), "target": target})
        count = int(array.shape[0]) if kind != "SCALAR" else int(array.size)
        self.accessors.append({"bufferView": len(self.views) - 1, "componentType": component, "count": count,
                               "type": kind, **extra})
        return len(self.accessors) - 1

    def add_bytes(self, raw: bytes) -> int:
        """A buffer view of raw bytes (an embedded image): no accessor, no target."""
        offset = len(self.data)
        self.data += raw
        self.data += b"\0" * (-len(self.data) % 4)
        self.views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(raw)})
        return len(self.views) - 1


def split_seams(faces: np.ndarray, uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-corner UVs (M, 3, 2) -> glTF's per-vertex layout: ``(source vertex of each new vertex (K,), new faces
    (M, 3), UV of each new vertex (K, 2))``; a vertex whose corners share one UV stays one vertex."""
    corners = np.asarray(faces, dtype=np.int64).reshape(-1)
    cuv = np.ascontiguousarray(np.asarray(uvs, dtype=np.float32).reshape(-1, 2))
    bits = cuv.view(np.uint32).astype(np.int64)
    key = np.stack([corners, bits[:, 0], bits[:, 1]], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return corners[first], inverse.reshape(-1, 3), cuv[first]


def glb_bytes(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None, *,
              name: str = "stepstone", uvs: Optional[np.ndarray] = None, texture: Optional[bytes] = None) -> bytes:
    """One triangle mesh as GLB bytes, in glTF's frame (Y-up).

    ``vertices`` (N, 3) are backend (Z-up) coordinates in metres; ``colors`` (N, 3|4) sRGB uint8 or float in
    [0, 1] (the wire's convention) or None; ``uvs`` (M, 3, 2) per face corner (v up) or None; ``texture`` PNG bytes
    of the base colour on ``uvs`` or None (module docstring). The caller has validated the mesh (at least one face,
    indices in range).
    """
    pos = to_y_up(vertices).astype(np.float32)
    tri = np.ascontiguousarray(faces, dtype=np.uint32)
    normals = vertex_normals(pos, tri)
    col = None if colors is None else np.asarray(colors)
    texcoord = None
    if uvs is not None:
        src, tri, uv = split_seams(tri, uvs)
        pos, normals = pos[src], normals[src]
        col = None if col is None else col[src]
        texcoord = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1).astype(np.float32)  # glTF: origin top left
        tri = tri.astype(np.uint32)
    if texture is not None and texcoord is None:
        raise ValueError("a texture needs uvs")
    if texture is not None:
        col = None  # COLOR_0 would multiply the texture (spec 3.7.2.1)
    buf = _Buffer()
    attributes = {
        "POSITION": buf.add(pos, _FLOAT, "VEC3", _ARRAY_BUFFER,
                            min=pos.min(axis=0).tolist(), max=pos.max(axis=0).tolist()),
        "NORMAL": buf.add(normals, _FLOAT, "VEC3", _ARRAY_BUFFER),
    }
    if texcoord is not None:
        attributes["TEXCOORD_0"] = buf.add(texcoord, _FLOAT, "VEC2", _ARRAY_BUFFER)
        # glTF allows UNSIGNED_INT only for indices: the source index as a float (exact below 2^24 vertices)
        attributes[SOURCE_VERTEX] = buf.add(src.astype(np.float32), _FLOAT, "SCALAR", _ARRAY_BUFFER)
    if col is not None:
        linear = colors_to_linear_rgba(col).reshape(-1, 4)
        ushort = np.floor(np.clip(linear, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
        attributes["COLOR_0"] = buf.add(ushort, _UNSIGNED_SHORT, "VEC4", _ARRAY_BUFFER, normalized=True)
    indices = buf.add(tri.reshape(-1), _UNSIGNED_INT, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    white = col is not None or texture is not None
    material = {
        "name": f"{name}_material",
        "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0] if white else list(GREY),
                                 "metallicFactor": 0.0, "roughnessFactor": 0.5},
        "doubleSided": True,
    }
    extra: dict = {}
    if texture is not None:
        view = buf.add_bytes(texture)
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0, "texCoord": 0}
        extra = {
            "images": [{"name": f"{name}_texture", "bufferView": view, "mimeType": "image/png"}],
            "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE,
                          "wrapT": _CLAMP_TO_EDGE}],
            "textures": [{"sampler": 0, "source": 0}],
        }
    doc = {
        "asset": {"version": "2.0", "generator": "Stepstone"},
        "scene": 0,
        "scenes": [{"name": "Scene", "nodes": [0]}],
        "nodes": [{"name": name, "mesh": 0}],
        "meshes": [{"name": name, "primitives": [{"attributes": attributes, "indices": indices, "material": 0,
                                                  "mode": _TRIANGLES}]}],
        "materials": [material],
        **extra,
        "accessors": buf.accessors,
        "bufferViews": buf.views,
        "buffers": [{"byteLength": len(buf.data)}],
    }
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    total = 12 + 8 + len(js) + 8 + len(buf.data)
    return b"".join([
        struct.pack("<III", _GLB_MAGIC, 2, total),
        struct.pack("<II", len(js), _CHUNK_JSON), js,
        struct.pack("<II", len(buf.data), _CHUNK_BIN), bytes(buf.data),
    ])
