#!/usr/bin/env python
"""Render the README picture: a shape generated through the Blender extension, rendered with Cycles.

    .venv/bin/python scripts/render_readme.py [--profile starter] [--prompt "a chair"] [--out docs/readme_render.png]

Everything goes the artist's way: the extension zip is built and installed into a throw-away Blender user folder,
the add-on starts a local backend (``--profile``), the Generate operator runs the text-to-shape workflow and the
streamed result lands in the scene with its vertex colours; then a camera, lights and a floor are added and Cycles
(CPU) renders a PNG. With ``--workflow diagnostic`` no models are needed at all. With ``--workflow gallery`` three
exemplars of the procedural world's held-out split (the first theme of ``bench quality``'s galleries: one colour,
three categories) are added to the scene as coloured meshes, selected, and the Theme gallery operator grows
``--variants`` new assets of the ``--subjects`` beside them; exemplars and gallery are rendered together.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDON = "bl_ext.user_default.stepstone"


def drive(s, cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        s.tick()
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}: {s.state} {s.reason}; "
                             f"{[(j.workflow, j.state, j.error) for j in s.jobs]}; log:\n" + "\n".join(s.local.log_tail(20)))
        time.sleep(0.01)


def stage(bpy, objects: list, out: Path, resolution: tuple[int, int], samples: int) -> None:
    """Camera, lights, floor and Cycles settings around ``objects``; render to ``out``."""
    from mathutils import Vector

    scn = bpy.context.scene
    for ob in list(scn.objects):
        if ob not in objects:
            bpy.data.objects.remove(ob)
    import numpy as np

    bpy.context.view_layer.update()  # matrix_world follows location only after an update
    boxes = []
    for ob in objects:
        co = np.empty(len(ob.data.vertices) * 3, np.float32)
        ob.data.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3) @ np.array(ob.matrix_world)[:3, :3].T + np.array(ob.matrix_world)[:3, 3]
        boxes += [co.min(0), co.max(0)]
    lo, hi = Vector(np.min(boxes, axis=0).tolist()), Vector(np.max(boxes, axis=0).tolist())
    center, size = (lo + hi) / 2, max((hi - lo).length, 1e-3)
    print(f"framing {len(objects)} objects: bounds {tuple(lo)} .. {tuple(hi)}")

    bpy.ops.mesh.primitive_plane_add(size=size * 20, location=(center.x, center.y, lo.z))
    floor = bpy.context.active_object
    mat = bpy.data.materials.new("Floor")
    mat.use_nodes = True
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Base Color"].default_value = (0.82, 0.82, 0.85, 1.0)
    bsdf.inputs["Roughness"].default_value = 0.8
    floor.data.materials.append(mat)

    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 50
    cam = bpy.data.objects.new("Camera", cam_data)
    scn.collection.objects.link(cam)
    direction = Vector((1.0, -1.6, 0.9)).normalized()
    cam.location = center + direction * size * 1.9
    cam.rotation_euler = (center - cam.location).to_track_quat("-Z", "Y").to_euler()
    scn.camera = cam

    for name, energy, rot in (("Key", 3.0, (math.radians(50), 0, math.radians(30))),
                              ("Fill", 1.0, (math.radians(60), 0, math.radians(-120)))):
        light = bpy.data.objects.new(name, bpy.data.lights.new(name, "SUN"))
        light.data.energy = energy
        light.data.angle = math.radians(8)
        light.rotation_euler = rot
        scn.collection.objects.link(light)
    world = scn.world or bpy.data.worlds.new("World")
    scn.world = world
    world.use_nodes = True
    bg = next(n for n in world.node_tree.nodes if n.type == "BACKGROUND")
    bg.inputs["Color"].default_value = (0.55, 0.62, 0.72, 1.0)
    bg.inputs["Strength"].default_value = 0.6

    scn.render.engine = "CYCLES"
    scn.cycles.device = "CPU"
    scn.cycles.samples = samples
    scn.cycles.use_denoising = False
    scn.render.resolution_x, scn.render.resolution_y = resolution
    scn.render.resolution_percentage = 100
    scn.render.image_settings.file_format = "PNG"
    scn.render.filepath = str(out)
    scn.view_settings.view_transform = "Standard"
    out.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.render.render(write_still=True)


def add_exemplars(bpy) -> list:
    """The first held-out theme of ``bench quality`` as Blender objects with a ``Col`` colour attribute, in a row."""
    sys.path.insert(0, str(ROOT))
    from backend.bench.quality_diffusion import gallery_themes, world_mesh
    from backend.training.world import build_shape

    theme = gallery_themes(1)[0]
    objs = []
    for j, (cat, col, attrs) in enumerate(theme["descriptions"]):
        m = world_mesh(build_shape(cat, col, attrs, seed=2_000_000 + j), cat)
        me = bpy.data.meshes.new(f"exemplar {cat}")
        me.from_pydata(m.vertices.tolist(), [], m.faces.tolist())
        attr = me.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
        rgba = [c / 255.0 for row in m.colors for c in (*row[:3], 255)]
        attr.data.foreach_set("color_srgb", rgba)
        me.color_attributes.active_color = attr
        sys.modules[ADDON + ".scene"].ensure_material(me)  # the add-on's vertex-colour material
        ob = bpy.data.objects.new(f"Exemplar {cat}", me)
        ob.location = (-1.2 * (3 - j), 0.0, 0.5)  # left of the gallery; the unit cube's floor is at z = -0.5
        bpy.context.scene.collection.objects.link(ob)
        objs.append(ob)
    print(f"exemplars: {theme['colour']} {', '.join(theme['categories'])}")
    return objs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="starter")
    ap.add_argument("--workflow", default="text-to-shape", choices=["text-to-shape", "diagnostic", "gallery"])
    ap.add_argument("--subjects", default="a chair, a lamp, a mug", help="gallery: subjects of the new assets")
    ap.add_argument("--prompt", default="a chair")
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", default="{}", help="extra workflow options as JSON")
    ap.add_argument("--out", default=str(ROOT / "docs" / "readme_render.png"))
    ap.add_argument("--size", default="960x540")
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="stepstone-render-"))
    os.environ["HOME"] = str(home)
    for var, sub in (("BLENDER_USER_RESOURCES", "resources"), ("BLENDER_USER_CONFIG", "config"),
                     ("BLENDER_USER_SCRIPTS", "scripts"), ("BLENDER_USER_EXTENSIONS", "extensions")):
        os.environ[var] = str(home / sub)
    os.environ["STEPSTONE_RUNTIME_DIR"] = str(home / "runtime")
    import bpy

    sys.path.insert(0, str(ROOT))
    import build_addon

    zpath = build_addon.build(platforms=["linux-x64"], out_dir=home / "dist", cache=ROOT / "build" / "wheels",
                              stage_dir=home / "stage")
    bpy.ops.extensions.package_install_files(filepath=str(zpath), repo="user_default", enable_on_install=True)
    mod = sys.modules[ADDON]
    s = mod.session.get()
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.python_path = sys.executable
    prefs.backend_dir = str(ROOT)
    prefs.profile = args.profile
    prefs.device = "auto"
    prefs.timeout_s = 30.0
    assert bpy.ops.stepstone.start_backend() == {"FINISHED"}
    try:
        drive(s, lambda: s.connected, 300, "the local backend")
        bpy.context.scene.cursor.location = (0, 0, 0)
        st = bpy.context.scene.stepstone
        st.spacing = 1.2
        if args.workflow == "text-to-shape":
            ok, why = s.workflow_available("text-to-shape")
            if not ok:
                raise SystemExit(f"text-to-shape is not available with profile {args.profile}: {why}")
            st.prompt, st.variants, st.seed = args.prompt, args.variants, args.seed
            assert bpy.ops.stepstone.generate(options=args.options) == {"FINISHED"}
        elif args.workflow == "gallery":
            ok, why = s.workflow_available("gallery")
            if not ok:
                raise SystemExit(f"the gallery is not available with profile {args.profile}: {why}")
            exemplars = add_exemplars(bpy)
            for ob in bpy.context.selected_objects:
                ob.select_set(False)
            for ob in exemplars:
                ob.select_set(True)
            bpy.context.view_layer.objects.active = exemplars[0]
            st.count, st.subjects, st.seed = args.variants, args.subjects, args.seed
            assert bpy.ops.stepstone.gallery(options=args.options) == {"FINISHED"}
        else:
            assert bpy.ops.stepstone.diagnostic(options=args.options) == {"FINISHED"}
        job = s.jobs[0]
        drive(s, lambda: not job.active and not s.stream.busy, 3600, f"the {args.workflow} job")
        if job.state != "done":
            raise SystemExit(f"job {job.state}: {job.error}")
        objects = [bpy.data.objects[n] for n in job.slots.values()]
        if args.workflow == "gallery":
            objects = exemplars + objects
        print(json.dumps({"objects": [o.name for o in objects], "faces": [len(o.data.polygons) for o in objects]}))
    finally:
        s.stop_local()
    w, h = (int(x) for x in args.size.lower().split("x"))
    stage(bpy, objects, Path(args.out).resolve(), (w, h), args.samples)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
