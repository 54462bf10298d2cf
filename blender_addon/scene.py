"""Scene-side helpers: selected objects -> request meshes, results -> objects, materials, collections, images.

All of this runs on Blender's main thread; array traffic goes through ``foreach_get``/``foreach_set``.
"""

from __future__ import annotations

import logging
import struct
from typing import Iterable, Optional

import bpy
import numpy as np

from .meshbuild import COLOR_ATTRIBUTE
from .textfit import fit_bytes

log = logging.getLogger("stepstone.addon")

MATERIAL_NAME = "Stepstone Vertex Colour"
DEFAULT_MAX_FACES = 500_000


class SelectionError(Exception):
    """The selection cannot be sent; the message tells the artist what to change."""


# ---------------------------------------------------------------------------------------------------------------
# selection -> request meshes
def object_payload(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph, *, max_faces: int = DEFAULT_MAX_FACES,
                   uvs: bool = False) -> dict:
    """The evaluated mesh of ``obj`` (modifiers applied), triangulated, in local space, plus its world matrix.

    Returns a request mesh dict: ``name``, ``vertices`` float32 (N, 3), ``faces`` uint32 (M, 3), ``colors`` uint8
    (N, 4) when the mesh has a colour attribute, ``matrix_world`` (16 floats, row-major).
    """
    if obj.type != "MESH":
        raise SelectionError(f"{obj.name!r} is a {obj.type.lower()} object, not a mesh")
    ob_eval = obj.evaluated_get(depsgraph)
    me = ob_eval.to_mesh()
    try:
        me.calc_loop_triangles()
        n_tri = len(me.loop_triangles)
        if n_tri == 0:
            raise SelectionError(f"{obj.name!r} has no faces; select an object with geometry")
        if n_tri > max_faces:
            raise SelectionError(
                f"{obj.name!r} has {n_tri:,} triangles after modifiers, more than the limit of {max_faces:,}; "
                "add a Decimate modifier or raise the limit in the add-on preferences"
            )
        n_v = len(me.vertices)
        verts = np.empty(n_v * 3, dtype=np.float32)
        me.vertices.foreach_get("co", verts)
        tris = np.empty(n_tri * 3, dtype=np.int32)
        me.loop_triangles.foreach_get("vertices", tris)
        colors = _vertex_colors(me)
        corner_uvs = None
        uv_layer = me.uv_layers.active if uvs else None
        if uv_layer is not None and len(me.loops):
            loop_uv = np.empty(len(me.loops) * 2, dtype=np.float32)
            uv_layer.uv.foreach_get("vector", loop_uv)
            tri_loops = np.empty(n_tri * 3, dtype=np.int32)
            me.loop_triangles.foreach_get("loops", tri_loops)
            corner_uvs = loop_uv.reshape(-1, 2)[tri_loops].reshape(n_tri, 3, 2)
    finally:
        ob_eval.to_mesh_clear()
    mw = np.array(obj.matrix_world, dtype=np.float64).reshape(-1)
    out = {
        "name": obj.name,
        "vertices": verts.reshape(-1, 3),
        "faces": tris.reshape(-1, 3).astype(np.uint32),
        "matrix_world": [float(x) for x in mw],
    }
    if colors is not None:
        out["colors"] = colors
    if corner_uvs is not None:
        out["uvs"] = corner_uvs
    return out


def _vertex_colors(me: bpy.types.Mesh) -> Optional[np.ndarray]:
    """The active colour attribute as uint8 sRGB per vertex (corner colours: the last corner of each vertex)."""
    attr = me.color_attributes.active_color
    if attr is None:
        return None
    n_v = len(me.vertices)
    if attr.domain == "POINT":
        buf = np.empty(len(attr.data) * 4, dtype=np.float32)
        attr.data.foreach_get("color_srgb", buf)
        per_vertex = buf.reshape(-1, 4)
    elif attr.domain == "CORNER":
        buf = np.empty(len(attr.data) * 4, dtype=np.float32)
        attr.data.foreach_get("color_srgb", buf)
        vi = np.empty(len(me.loops), dtype=np.int32)
        me.loops.foreach_get("vertex_index", vi)
        per_vertex = np.ones((n_v, 4), dtype=np.float32)
        per_vertex[vi] = buf.reshape(-1, 4)
    else:
        return None
    return np.clip(per_vertex * 255.0 + 0.5, 0, 255).astype(np.uint8)


def selection_payloads(objects: Iterable[bpy.types.Object], depsgraph: bpy.types.Depsgraph, *,
                       max_faces: int = DEFAULT_MAX_FACES) -> tuple[list[dict], list[str]]:
    """Payloads of the mesh objects among ``objects``; the second list names what was skipped and why.

    A mesh over the face limit is an error for the whole request (raised), not a silent skip.
    """
    payloads, skipped = [], []
    for obj in objects:
        if obj.type != "MESH":
            skipped.append(f"{obj.name} ({obj.type.lower()}, not a mesh)")
            continue
        payloads.append(object_payload(obj, depsgraph, max_faces=max_faces))
    return payloads, skipped


# ---------------------------------------------------------------------------------------------------------------
# results -> scene
def principled_bsdf(nt):
    """The node tree's Principled BSDF, made and wired to a material output when it has none."""
    bsdf = next((n for n in nt.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nt.nodes if n.type == "OUTPUT_MATERIAL"), None) or nt.nodes.new(
            "ShaderNodeOutputMaterial")
        nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return bsdf


def vertex_color_material() -> bpy.types.Material:
    """One shared material that shows the ``Col`` colour attribute (Color Attribute node -> Principled BSDF)."""
    mat = bpy.data.materials.get(MATERIAL_NAME)
    if mat is not None and mat.use_nodes:
        return mat
    mat = mat or bpy.data.materials.new(MATERIAL_NAME)
    mat.use_nodes = True
    nt = mat.node_tree
    bsdf = principled_bsdf(nt)
    col = nt.nodes.new("ShaderNodeVertexColor")
    col.layer_name = COLOR_ATTRIBUTE
    col.location = (bsdf.location.x - 300, bsdf.location.y)
    nt.links.new(col.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.6
    return mat


def ensure_material(me: bpy.types.Mesh) -> None:
    if me.color_attributes.get(COLOR_ATTRIBUTE) is not None and len(me.materials) == 0:
        me.materials.append(vertex_color_material())


def new_collection(name: str, parent: Optional[bpy.types.Collection] = None) -> bpy.types.Collection:
    """A new collection under ``parent`` (the scene's master collection by default); Blender makes the name unique."""
    coll = bpy.data.collections.new(fit_bytes(name))
    (parent or bpy.context.scene.collection).children.link(coll)
    return coll


def get_or_new_collection(name: str) -> bpy.types.Collection:
    name = fit_bytes(name)
    coll = bpy.data.collections.get(name)
    if coll is None:
        return new_collection(name)
    scene_coll = bpy.context.scene.collection
    if coll.name not in scene_coll.children and coll.users == 0:
        scene_coll.children.link(coll)
    return coll


def replace_mesh(obj: bpy.types.Object, me: bpy.types.Mesh) -> None:
    """Give ``obj`` a new mesh datablock; the old one is removed only when it was ours and is now unused."""
    old = obj.data
    obj.data = me
    if old is not None and old is not me and old.get("stepstone") and old.users == 0:
        bpy.data.meshes.remove(old)


# ---------------------------------------------------------------------------------------------------------------
# placement: results next to the 3D cursor, beside their source, never on top of what is there
Box = tuple[tuple[float, float, float], tuple[float, float, float]]
GAP = 0.1  # metres between a placed result and its neighbour


def world_box(obj: bpy.types.Object) -> Optional[Box]:
    """The world-space axis-aligned box of a mesh object's own vertices (None when it has none)."""
    if obj.type != "MESH" or obj.data is None or len(obj.data.vertices) == 0:
        return None
    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float64)
    obj.data.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    lo, hi = co.min(axis=0), co.max(axis=0)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    m = np.array(obj.matrix_world, dtype=np.float64)
    w = corners @ m[:3, :3].T + m[:3, 3]
    return tuple(w.min(axis=0)), tuple(w.max(axis=0))


def _overlap(a: Box, b: Box, gap: float = 0.0) -> bool:
    return all(a[0][i] < b[1][i] + gap and b[0][i] < a[1][i] + gap for i in range(3))


def scene_boxes(ignore: Iterable[str] = ()) -> list[Box]:
    """Boxes of the visible mesh objects of the current view layer (except those named in ``ignore``)."""
    skip = set(ignore)
    out = []
    for obj in bpy.context.view_layer.objects:
        if obj.name in skip or obj.type != "MESH" or not obj.visible_get():
            continue
        b = world_box(obj)
        if b is not None:
            out.append(b)
    return out


def free_origin(origin: tuple[float, float, float], size: tuple[float, float], ignore: Iterable[str] = ()
                ) -> tuple[float, float, float]:
    """The first position from ``origin`` along +X where a grid footprint of ``size`` (x, -y extents from the
    origin, each cell centred on a grid point) overlaps no visible mesh object."""
    boxes = scene_boxes(ignore)
    sx, sy = size
    ox, oy, oz = origin
    for _ in range(200):
        foot = ((ox - 0.5, oy - sy - 0.5, oz - 0.5), (ox + sx + 0.5, oy + 0.5, oz + 0.5))
        hits = [b for b in boxes if _overlap(foot, b, GAP)]
        if not hits:
            return (ox, oy, oz)
        ox = max(b[1][0] for b in hits) + GAP + 0.5
    return (ox, oy, oz)


def move_off_others(obj: bpy.types.Object, ignore: Iterable[str] = ()) -> float:
    """Move ``obj`` along +X until its box overlaps no other visible mesh object; returns the distance moved."""
    mine = world_box(obj)
    if mine is None:
        return 0.0
    boxes = scene_boxes(set(ignore) | {obj.name})
    moved = 0.0
    for _ in range(200):
        hits = [b for b in boxes if _overlap(mine, b)]
        if not hits:
            break
        dx = max(b[1][0] for b in hits) + GAP - mine[0][0]
        mine = ((mine[0][0] + dx, mine[0][1], mine[0][2]), (mine[1][0] + dx, mine[1][1], mine[1][2]))
        moved += dx
    if moved:
        obj.location.x += moved
    return moved


def beside_offset(obj: bpy.types.Object) -> tuple[float, float, float]:
    """A world offset that puts a copy of ``obj`` right next to it along +X (a stylized result beside its source,
    not z-fighting on top of it)."""
    b = world_box(obj)
    if b is None:
        return (0.0, 0.0, 0.0)
    return (b[1][0] - b[0][0] + 2 * GAP, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# image to shape: an image datablock or a file -> PNG bytes
MAX_IMAGE_SIDE = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def encode_png(rgba: np.ndarray) -> bytes:
    """A PNG file of an (H, W, 4) uint8 array, top row first (zlib, no other dependency)."""
    import zlib

    h, w = rgba.shape[:2]
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def image_png(image: Optional[bpy.types.Image], path: str = "") -> tuple[bytes, str]:
    """PNG (or the file's own JPEG/PNG) bytes of ``image`` or of the file at ``path``, and a name for results.

    A datablock with pixels in memory (rendered, painted, generated) is encoded from its pixels, larger sides scaled
    down to ``MAX_IMAGE_SIDE``; a file is sent as it is. Raises :class:`SelectionError` with what to do."""
    import os

    if image is None:
        if not path:
            raise SelectionError("choose an image file or an image datablock first")
        if not os.path.isfile(path):
            raise SelectionError(f"the image file {path} does not exist; choose another file")
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise SelectionError(f"{os.path.basename(path)} is not a PNG, JPEG, WebP or BMP image")
        size = os.path.getsize(path)
        if size > 32 * 2**20:
            raise SelectionError(f"{os.path.basename(path)} is {size / 2**20:.0f} MB; use an image under 32 MB")
        with open(path, "rb") as fh:
            return fh.read(), os.path.splitext(os.path.basename(path))[0]
    w, h = int(image.size[0]), int(image.size[1])
    if w < 1 or h < 1:
        fp = bpy.path.abspath(image.filepath) if image.filepath else ""
        if fp and os.path.isfile(fp):
            return image_png(None, fp)[0], image.name
        raise SelectionError(f"the image {image.name!r} has no pixels (its file is missing); reload or pick another")
    src = image
    if max(w, h) > MAX_IMAGE_SIDE:
        f = MAX_IMAGE_SIDE / max(w, h)
        src = image.copy()
        src.scale(max(1, int(w * f)), max(1, int(h * f)))
        w, h = int(src.size[0]), int(src.size[1])
    try:
        px = np.empty(w * h * 4, dtype=np.float32)
        src.pixels.foreach_get(px)
    finally:
        if src is not image:
            bpy.data.images.remove(src)
    rgba = np.clip(px.reshape(h, w, 4) * 255.0 + 0.5, 0, 255).astype(np.uint8)[::-1]  # Blender: bottom row first
    return encode_png(np.ascontiguousarray(rgba)), image.name


# ---------------------------------------------------------------------------------------------------------------
# stylize texture mode: the artist's own mesh with the style baked onto its UV map
def baked_material(old: Optional[bpy.types.Material], image: bpy.types.Image, uv_map: str) -> bpy.types.Material:
    """A new material for a slot: a copy of ``old`` (or a plain one) whose Principled BSDF takes its Base Color from
    ``image`` on the UV map ``uv_map``. ``old`` itself is left as it was (and kept in the file)."""
    if old is not None:
        mat = old.copy()
        mat.name = fit_bytes(f"{old.name} stylized")
        old.use_fake_user = True
    else:
        mat = bpy.data.materials.new(fit_bytes(f"{image.name} material"))
    mat.use_nodes = True
    nt = mat.node_tree
    bsdf = principled_bsdf(nt)
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.name = tex.label = "Stepstone baked texture"
    tex.location = (bsdf.location.x - 320, bsdf.location.y)
    uvn = nt.nodes.new("ShaderNodeUVMap")
    uvn.uv_map = uv_map
    uvn.location = (tex.location.x - 220, tex.location.y)
    nt.links.new(uvn.outputs["UV"], tex.inputs["Vector"])
    nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def colour_material(old: Optional[bpy.types.Material]) -> bpy.types.Material:
    """A copy of ``old`` (or a plain material) whose Base Color is the ``Col`` colour attribute."""
    if old is None:
        return vertex_color_material()
    mat = old.copy()
    mat.name = fit_bytes(f"{old.name} stylized")
    old.use_fake_user = True
    mat.use_nodes = True
    nt = mat.node_tree
    bsdf = next((n for n in nt.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        return vertex_color_material()
    col = nt.nodes.new("ShaderNodeVertexColor")
    col.layer_name = COLOR_ATTRIBUTE
    col.location = (bsdf.location.x - 300, bsdf.location.y)
    nt.links.new(col.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def _nearest(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each point of ``src`` the index of the nearest point of ``dst`` (numpy only; chunked)."""
    out = np.empty(len(src), dtype=np.int64)
    step = max(1, int(2e7 // max(len(dst), 1)))
    for s in range(0, len(src), step):
        d = ((src[s : s + step, None, :] - dst[None, :, :]) ** 2).sum(-1)
        out[s : s + step] = d.argmin(axis=1)
    return out


def stylized_copy(src: bpy.types.Object, name: str, collection: Optional[bpy.types.Collection],
                  offset: tuple[float, float, float], image: Optional[bpy.types.Image],
                  vertices: Optional[np.ndarray], colors: Optional[np.ndarray], replace: bool) -> bpy.types.Object:
    """The texture-mode result that keeps the artist's mesh: a copy of ``src`` (its own polygons, UV maps, material
    slots and modifiers) placed ``offset`` beside it, or ``src`` itself when ``replace``; the style comes as the baked
    ``image`` on the active UV map, or (no UV map) as a ``Col`` colour attribute from the per-vertex ``colors`` of
    the evaluated ``vertices`` it was sent as. Each slot gets a new material; the old ones stay in the file."""
    if replace:
        obj = src
    else:
        obj = src.copy()
        obj.data = src.data.copy()
        obj.name = fit_bytes(name)
        obj.data.name = obj.name
        (collection or bpy.context.scene.collection).objects.link(obj)
        obj.matrix_world = src.matrix_world.copy()
        obj.location = tuple(a + b for a, b in zip(src.matrix_world.translation, offset))
    me = obj.data
    uv = me.uv_layers.active
    slots = list(me.materials) if len(me.materials) else [None]
    if image is not None and uv is not None:
        mats = [baked_material(m, image, uv.name) for m in slots]
    elif colors is not None and vertices is not None and len(vertices):
        co = np.empty(len(me.vertices) * 3, dtype=np.float32)
        me.vertices.foreach_get("co", co)
        idx = _nearest(co.reshape(-1, 3), np.asarray(vertices, dtype=np.float32))
        rgb = np.asarray(colors)[idx, :3].astype(np.float32) / 255.0
        rgba = np.concatenate([rgb, np.ones((len(rgb), 1), np.float32)], axis=1)
        attr = me.color_attributes.get(COLOR_ATTRIBUTE) or me.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR",
                                                                                   "POINT")
        attr.data.foreach_set("color_srgb", rgba.ravel())
        me.color_attributes.active_color = attr
        mats = [colour_material(m) for m in slots]
    else:
        return obj
    if len(me.materials) == 0:
        me.materials.append(mats[0])
    else:
        for i, m in enumerate(mats):
            me.materials[i] = m
    return obj


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (no decoding)."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", png[16:24])


def image_from_png(name: str, png: bytes) -> bpy.types.Image:
    """An image datablock holding ``png`` packed into the .blend (no temporary file)."""
    w, h = png_size(png)
    img = bpy.data.images.new(name, max(1, w), max(1, h))
    img.pack(data=png, data_len=len(png))
    img.source = "FILE"
    img.file_format = "PNG"
    return img
