"""Blender's side of the file round trips (run by ``test_files_in_blender.py`` in a fresh process with ``bpy``).

``export OUT.glb RESULT.json``: builds a known object (a cone 1.8 tall standing on z = 0.3 at x = 1, y = 2, turned
and stretched by its object transform, with a colour attribute), exports it with Blender's glTF exporter (Y-up, its defaults) and records its world bounding box
and mean colour.

``compare STREAM.npz RESULT.json FILE...``: builds the streamed mesh from the arrays with the add-on's own builder
(``blender_addon.meshbuild``), imports each file with Blender's importer at its defaults (glTF, OBJ, PLY), and
records for each the world bounding box, the mean sRGB colour over face corners, and the largest distance of its
vertices to the streamed mesh's (matched by sorting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402

KNOWN_COLOR = (0.9, 0.25, 0.05)  # sRGB of the known object's colour attribute


def summary(obj) -> dict:
    """World-space bounding box, vertices and mean sRGB colour over corners of a mesh object."""
    me = obj.data
    n = len(me.vertices)
    co = np.empty(n * 3, np.float32)
    me.vertices.foreach_get("co", co)
    m = np.array(obj.matrix_world, dtype=np.float64)
    world = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    out = {"name": obj.name, "vertices": n, "bbox_min": world.min(axis=0).tolist(),
           "bbox_max": world.max(axis=0).tolist(), "mean_srgb": None, "color_attribute": None}
    attr = me.color_attributes.active_color or (me.color_attributes[0] if len(me.color_attributes) else None)
    if attr is not None:
        c = np.empty(len(attr.data) * 4, np.float32)
        attr.data.foreach_get("color_srgb", c)
        c = c.reshape(-1, 4)
        if attr.domain == "POINT":
            corner_verts = np.empty(len(me.loops), np.int32)
            me.loops.foreach_get("vertex_index", corner_verts)
            c = c[corner_verts]
        out["mean_srgb"] = c[:, :3].mean(axis=0).tolist()
        out["color_attribute"] = f"{attr.name} {attr.data_type} {attr.domain}"
    return out, world


def import_file(path: Path):
    before = set(bpy.data.objects)
    suffix = path.suffix.lower()
    if suffix == ".glb":
        bpy.ops.import_scene.gltf(filepath=str(path))
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    else:
        raise ValueError(path)
    new = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    assert len(new) == 1, f"{path.name}: expected one mesh object, got {[o.name for o in new]}"
    return new[0]


def sorted_rows(a: np.ndarray) -> np.ndarray:
    r = np.round(a, 5)
    return a[np.lexsort(r.T)]


def cmd_export(out: Path, result: Path) -> None:
    # the object's own transform (turned about Z, stretched along Z) travels as the glTF node's TRS
    bpy.ops.mesh.primitive_cone_add(vertices=24, radius1=0.3, depth=1.2, location=(1.0, 2.0, 1.2),
                                    rotation=(0.0, 0.0, 0.5))
    obj = bpy.context.active_object
    obj.scale = (1.0, 1.0, 1.5)
    obj.name = "known_cone"
    attr = obj.data.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    values = np.tile([*KNOWN_COLOR, 1.0], len(obj.data.vertices)).astype(np.float32)
    attr.data.foreach_set("color_srgb", values)
    obj.data.color_attributes.active_color = attr
    bpy.context.view_layer.update()
    bpy.ops.export_scene.gltf(filepath=str(out), export_format="GLB", use_selection=True,
                              export_vertex_color="ACTIVE")
    info, _ = summary(obj)
    result.write_text(json.dumps({"known": info, "known_srgb": KNOWN_COLOR}))


def cmd_compare(stream: Path, result: Path, files: list[Path]) -> None:
    from blender_addon.meshbuild import build_mesh_now

    arrays = np.load(stream)
    me = build_mesh_now("streamed", arrays["vertices"], arrays["faces"], arrays["colors"])
    streamed_obj = bpy.data.objects.new("streamed", me)
    bpy.context.scene.collection.objects.link(streamed_obj)
    streamed, streamed_world = summary(streamed_obj)
    out = {"streamed": streamed, "files": {}}
    for path in files:
        obj = import_file(path)
        info, world = summary(obj)
        info["rotation"] = list(obj.rotation_euler)
        if len(world) == len(streamed_world):
            info["max_vertex_distance"] = float(np.abs(sorted_rows(world) - sorted_rows(streamed_world)).max())
        out["files"][path.name] = info
    result.write_text(json.dumps(out))


def main() -> int:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    cmd, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    if cmd == "export":
        cmd_export(*args)
    elif cmd == "compare":
        cmd_compare(args[0], args[1], args[2:])
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
