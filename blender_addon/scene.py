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

log = logging.getLogger("stepstone.addon")

MATERIAL_NAME = "Stepstone Vertex Colour"
DEFAULT_MAX_FACES = 500_000


class SelectionError(Exception):
    """The selection cannot be sent; the message tells the artist what to change."""


# ---------------------------------------------------------------------------------------------------------------
# selection -> request meshes
def object_payload(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph, *, max_faces: int = DEFAULT_MAX_FACES,
                   ) -> dict:
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
def vertex_color_material() -> bpy.types.Material:
    """One shared material that shows the ``Col`` colour attribute (Color Attribute node -> Principled BSDF)."""
    mat = bpy.data.materials.get(MATERIAL_NAME)
    if mat is not None and mat.use_nodes:
        return mat
    mat = mat or bpy.data.materials.new(MATERIAL_NAME)
    mat.use_nodes = True
    nt = mat.node_tree
    bsdf = next((n for n in nt.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nt.nodes if n.type == "OUTPUT_MATERIAL"), None) or nt.nodes.new(
            "ShaderNodeOutputMaterial")
        nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
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
    coll = bpy.data.collections.new(name)
    (parent or bpy.context.scene.collection).children.link(coll)
    return coll


def get_or_new_collection(name: str) -> bpy.types.Collection:
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
