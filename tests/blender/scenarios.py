"""Scenarios that run inside real Blender (the ``bpy`` module), one process per group, called by the tests.

``python tests/blender/scenarios.py GROUP --zip Z --home H --result R.json [--connection-file F]``

Before ``bpy`` is imported, HOME and Blender's user folders point into the throw-away ``--home``; the built
extension zip is installed there with ``bpy.ops.extensions.package_install_files(..., enable_on_install=True)``
as an artist would. Timers do not fire in background mode, so the scenarios call the add-on's poll function
(``session.get().tick()``) directly, exactly what its ``bpy.app.timers`` callback does.

Each step's outcome goes into the JSON result (``{step: {"ok": bool, ...}}``); the pytest side asserts on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADDON_MODULE = "bl_ext.user_default.stepstone"


class ErrorCounter(logging.Handler):
    """Counts ERROR records of the add-on's logger: a poll that raised would log one."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def setup_blender(home: Path):
    os.environ["HOME"] = str(home)
    for var, sub in (("BLENDER_USER_RESOURCES", "resources"), ("BLENDER_USER_CONFIG", "config"),
                     ("BLENDER_USER_SCRIPTS", "scripts"), ("BLENDER_USER_EXTENSIONS", "extensions")):
        os.environ[var] = str(home / sub)
    os.environ.setdefault("STEPSTONE_RUNTIME_DIR", str(home / "runtime"))
    import bpy  # noqa: E402  (after the environment is set)

    return bpy


def install(bpy, zip_path: str):
    res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    if res != {"FINISHED"}:
        raise RuntimeError(f"install returned {res}")
    mod = sys.modules.get(ADDON_MODULE)
    if mod is None:
        raise RuntimeError(f"{ADDON_MODULE} not imported after install")
    return mod


class Driver:
    """Calls the add-on's poll function like its timer would, until a condition holds."""

    def __init__(self, bpy, mod) -> None:
        self.bpy = bpy
        self.mod = mod

    @property
    def s(self):
        return self.mod.session.get()

    def until(self, cond, timeout: float = 60.0, what: str = "condition") -> float:
        t0 = time.monotonic()
        while True:
            self.s.tick()
            if cond():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; state {self.s.state}, "
                                   f"reason {self.s.reason!r}, jobs {[(j.workflow, j.state, j.error) for j in self.s.jobs]}"
                                   f", notices {list(self.s.notices)}")
            time.sleep(0.005)

    def prefs(self):
        return self.bpy.context.preferences.addons[ADDON_MODULE].preferences

    def connect(self, connection_file: str, timeout: float = 30.0) -> None:
        p = self.prefs()
        p.connection_mode = "AUTO"
        p.connection_file = connection_file
        p.heartbeat_s = 0.5
        p.timeout_s = 10.0  # a 2-core machine shared with torch jobs can delay heartbeats by seconds
        assert self.bpy.ops.stepstone.connect() == {"FINISHED"}
        self.until(lambda: self.s.connected, timeout, "connection")

    def job_settled(self, job) -> bool:
        return not job.active and not self.s.stream.pending_for(job.key)


def mesh_summary(bpy, obj) -> dict:
    import numpy as np

    me = obj.data
    out = {"name": obj.name, "vertices": len(me.vertices), "faces": len(me.polygons), "edges": len(me.edges),
           "location": list(obj.location), "matrix_world": [list(r) for r in obj.matrix_world],
           "collections": [c.name for c in obj.users_collection], "materials": [m.name for m in me.materials if m],
           "colour_attribute": None, "valid": not me.validate(verbose=False)}
    attr = me.color_attributes.get("Col")
    if attr is not None:
        buf = np.empty(len(attr.data) * 4, np.float32)
        attr.data.foreach_get("color_srgb", buf)
        rgb = buf.reshape(-1, 4)[:, :3]
        out["colour_attribute"] = {"domain": attr.domain, "distinct": int(len(np.unique((rgb * 255).round(), axis=0))),
                                   "mean": [float(x) for x in rgb.mean(0)]}
    mat = me.materials[0] if len(me.materials) else None
    if mat is not None and mat.use_nodes:
        out["material_uses_attribute"] = any(
            n.type == "VERTEX_COLOR" and n.layer_name == "Col" and n.outputs["Color"].is_linked
            for n in mat.node_tree.nodes)
    return out


ONLY: set = set()  # --only: run just these steps (development)


def step(results: dict, name: str):
    """Decorator-ish context: run ``fn`` and store its dict (or the error) under ``name``."""

    def run(fn):
        if ONLY and name not in ONLY:
            return {}
        t0 = time.monotonic()
        try:
            out = fn() or {}
            out["ok"] = True
        except Exception as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out["seconds"] = round(time.monotonic() - t0, 2)
        results[name] = out
        return out

    return run


# ----------------------------------------------------------------------------------------------------- groups
def group_main(bpy, mod, args, results: dict) -> None:
    """Connect, generate, re-import, stylize, gallery, cancel, selection errors, unregister."""
    d = Driver(bpy, mod)
    s = d.s
    # an undo replaces the Scene datablock: always look the scene up again (no stale reference)
    options = json.loads(args.options or "{}")

    def opts(workflow: str) -> str:
        """Small settings for the tiny profile on a 2-core CPU (passed as the operators' JSON options)."""
        return json.dumps(options.get(workflow, {}))

    @step(results, "install")
    def _():
        import zmq

        ext_dir = Path(bpy.utils.user_resource("EXTENSIONS"))
        return {"module": mod.__name__, "zmq": zmq.__file__,
                "bundled_zmq": [str(p) for p in ext_dir.rglob("zmq/__init__.py")],
                "panels": [c for c in ("STEPSTONE_PT_status", "STEPSTONE_PT_jobs") if hasattr(bpy.types, c)],
                "generate_poll_disconnected": bpy.ops.stepstone.generate.poll()}

    @step(results, "connect")
    def _():
        d.connect(args.connection_file)
        w = s.welcome
        return {"state": s.state, "backend_id": w.get("backend_id"), "profile": w.get("profile"),
                "device": w.get("device"), "capabilities": {k: v.get("available") for k, v in s.capabilities().items()},
                "generate_poll": bpy.ops.stepstone.generate.poll()}

    def generate_workflow() -> str:
        return "text-to-shape" if s.workflow_available("text-to-shape")[0] else "diagnostic"

    @step(results, "generate")
    def _():
        wf = generate_workflow()
        before = set(bpy.data.objects.keys())
        bpy.context.scene.cursor.location = (0.0, 0.0, 0.0)
        st = bpy.context.scene.stepstone
        st.spacing = 2.0
        if wf == "text-to-shape":
            st.prompt = "a chair"
            st.variants = 2
            st.quality = "fast"
            assert bpy.ops.stepstone.generate(options=opts("text-to-shape")) == {"FINISHED"}
        else:
            from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

            s.submit("diagnostic", {"steps": 4, "resolution": 24}, None, "diagnostic",
                     Placement(collection="Stepstone: diagnostic", spacing=2.0))
        job = s.jobs[0]
        seen_states: list = []
        first_obj: dict = {}
        same = {"ok": True}

        def cond():
            if job.state not in seen_states:
                seen_states.append(job.state)
            for slot, name in job.slots.items():
                first_obj.setdefault(slot, name)
                if first_obj[slot] != name:
                    same["ok"] = False  # a slot's object must be updated in place, not replaced
            return d.job_settled(job)

        elapsed = d.until(cond, 300, f"{wf} job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        from bl_ext.user_default.stepstone import scene as ascene  # type: ignore[import-not-found]

        others = [ascene.world_box(o) for o in bpy.data.objects if o.type == "MESH" and o.name not in job.slots.values()]
        mine = [ascene.world_box(o) for o in objs]
        overlaps = sum(1 for a in mine for b in others if b and ascene._overlap(a, b))
        return {"workflow": wf, "state": job.state, "error": job.error, "states": seen_states, "preset": job.preset,
                "overlaps": overlaps, "undo_pushes": s.undo_pushes,
                "pre_existing": sorted(o.name for o in bpy.data.objects if o.name in before and o.type == "MESH"),
                "meshes_received": job.meshes_received, "slots": sorted(job.slots), "finals": sorted(job.finals),
                "objects": [mesh_summary(bpy, o) for o in objs], "same_object_per_slot": same["ok"],
                "new_objects": sorted(set(bpy.data.objects.keys()) - before), "collection": job.collection_actual,
                "elapsed_s": round(elapsed, 2), "job": job.key, "longest_tick_ms": round(1000 * s.longest_tick_s, 1)}

    @step(results, "reimport")
    def _():
        gen = results.get("generate", {})
        if not gen.get("ok"):
            raise RuntimeError("generate failed")
        key = gen["job"]
        before = set(bpy.data.objects.keys())
        assert bpy.ops.stepstone.reimport(job=key) == {"FINISHED"}
        job = s.find(key)
        d.until(lambda: len(job.slots) >= len(gen["slots"]) and not s.stream.pending_for(key), 60, "re-import")
        new = sorted(set(bpy.data.objects.keys()) - before)
        return {"new_objects": new, "objects": [mesh_summary(bpy, bpy.data.objects[n]) for n in new],
                "collection": job.collection_actual}

    @step(results, "selection")
    def _():
        from bl_ext.user_default.stepstone import scene as ascene  # type: ignore[import-not-found]

        me = bpy.data.meshes.new("quad")
        me.from_pydata([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)], [], [(0, 1, 2, 3)])
        ob = bpy.data.objects.new("Quad", me)
        bpy.context.scene.collection.objects.link(ob)
        mod_ = ob.modifiers.new("sub", "SUBSURF")
        mod_.levels = 2
        dg = bpy.context.evaluated_depsgraph_get()
        p = ascene.object_payload(ob, dg)
        err = ""
        try:
            ascene.object_payload(ob, dg, max_faces=10)
        except ascene.SelectionError as exc:
            err = str(exc)
        empty = bpy.data.objects.new("AnEmpty", None)
        bpy.context.scene.collection.objects.link(empty)
        payloads, skipped = ascene.selection_payloads([ob, empty], dg)
        bpy.data.objects.remove(empty)
        bpy.data.objects.remove(ob)
        return {"vertices": list(p["vertices"].shape), "faces": list(p["faces"].shape),
                "face_limit_error": err, "skipped": skipped, "n_payloads": len(payloads)}

    def make_source():
        bpy.ops.mesh.primitive_cube_add(size=0.6, location=(3.0, -1.0, 0.5), rotation=(0.3, 0.2, 0.9))
        src = bpy.context.active_object
        src.name = "StyleSource"
        src.scale = (1.0, 1.5, 0.8)
        m = src.modifiers.new("bevel", "BEVEL")
        m.width = 0.05
        bpy.context.view_layer.update()
        return src

    @step(results, "stylize")
    def _():
        src = make_source()
        for o in bpy.context.selected_objects:
            o.select_set(False)
        src.select_set(True)
        bpy.context.view_layer.objects.active = src
        ok, why = s.workflow_available("stylize")
        out = {"available": ok, "reason": why}
        if not ok:
            out["poll"] = bpy.ops.stepstone.stylize.poll()
            raise RuntimeError(f"stylize unavailable: {why}")
        st = bpy.context.scene.stepstone
        st.style = "made of gold"
        st.mode = "texture"
        st.strength = 0.5
        st.replace_source = False
        artist = bpy.data.materials.new("ArtistMaterial")
        artist.use_nodes = True
        src.data.materials.append(artist)
        src_mesh = src.data.name
        import numpy as np

        def uv_data(me):
            buf = np.empty(len(me.loops) * 2, np.float32)
            me.uv_layers.active.uv.foreach_get("vector", buf)
            return buf

        def loop_totals(me):
            buf = np.empty(len(me.polygons), np.int32)
            me.polygons.foreach_get("loop_total", buf)
            return buf.tolist()

        src_polys, src_uv, src_totals = len(src.data.polygons), uv_data(src.data), loop_totals(src.data)
        assert bpy.ops.stepstone.stylize(options=opts("stylize")) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 300, "stylize job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        res = objs[0]
        mat = res.data.materials[0] if len(res.data.materials) else None
        tex = next((n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"), None) if mat and mat.use_nodes else None
        img = tex.image if tex is not None else None
        px = np.empty(int(img.size[0] * img.size[1] * 4), np.float32) if img is not None else None
        if img is not None:
            img.pixels.foreach_get(px)
        out["kept"] = {
            "polygons": [src_polys, len(res.data.polygons)], "loop_totals_equal": loop_totals(res.data) == src_totals,
            "uv_maps": [[u.name for u in src.data.uv_layers], [u.name for u in res.data.uv_layers]],
            "uv_equal": bool(len(res.data.uv_layers) and np.allclose(uv_data(res.data), src_uv)),
            "modifiers": [m.type for m in res.modifiers], "source_material": [m.name for m in src.data.materials],
            "result_material": mat.name if mat else None,
            "texture": None if img is None else {"name": img.name, "size": list(img.size),
                                                   "distinct": int(len(np.unique(np.round(px.reshape(-1, 4)[:, :3]
                                                                                          * 255), axis=0))),
                                                   "uv_node": next((n.uv_map for n in mat.node_tree.nodes
                                                                    if n.type == "UVMAP"), None)},
            "baked_image": job.baked_image, "preview_objects_left": [o.name for o in bpy.data.objects
                                                                     if o.get("stepstone_job") == job.key
                                                                     and o.name != res.name]}
        from bl_ext.user_default.stepstone import scene as ascene  # type: ignore[import-not-found]

        out.update({"state": job.state, "error": job.error, "objects": [mesh_summary(bpy, o) for o in objs],
                    "source_matrix": [list(r) for r in src.matrix_world], "source_mesh_kept": src.data.name == src_mesh,
                    "source_name": src.name, "preset": job.preset, "offset": list(job.placement.offset),
                    "overlaps_source": any(ascene._overlap(ascene.world_box(o), ascene.world_box(src)) for o in objs)})
        return out

    @step(results, "replace_cancel")
    def _():
        """Stylize with "Replace source mesh", cancelled while its previews stream into the source: the artist's
        own mesh comes back."""
        src = bpy.data.objects.get("StyleSource")
        if src is None:
            raise RuntimeError("the stylize step did not run")
        for o in bpy.context.selected_objects:
            o.select_set(False)
        src.select_set(True)
        bpy.context.view_layer.objects.active = src
        st = bpy.context.scene.stepstone
        st.mode = "shape"
        st.replace_source = True
        original = src.data.name
        slow = dict(json.loads(opts("stylize")), iterations=4000, preview_every=1, preview_resolution=16)
        assert bpy.ops.stepstone.stylize(options=json.dumps(slow)) == {"FINISHED"}
        job = s.jobs[0]
        try:
            d.until(lambda: src.data.name != original, 120, "a preview streamed into the source")
            during = src.data.name
            assert bpy.ops.stepstone.cancel(job=job.key) == {"FINISHED"}
            d.until(lambda: d.job_settled(job) and not job.cleanup_pending, 60, "cancellation")
        finally:
            st.replace_source = False
            st.mode = "texture"
        return {"state": job.state, "original": original, "during": during, "after": src.data.name,
                "fake_user": bpy.data.meshes[original].use_fake_user, "preview_mesh_left": during in bpy.data.meshes}

    @step(results, "replace_texture")
    def _():
        """Texture mode with "Replace source mesh": the source keeps its mesh and gets the baked material; the
        artist's material stays in the file; Ctrl-Z gives the old material back."""
        for o in bpy.context.selected_objects:
            o.select_set(False)
        bpy.ops.mesh.primitive_cube_add(size=0.4, location=(8.0, -3.0, 0.0))
        src = bpy.context.active_object
        src.name = "ReplaceTextureSource"
        mat = bpy.data.materials.new("ReplaceArtistMaterial")
        src.data.materials.append(mat)
        mesh_name = src.data.name
        bpy.ops.ed.undo_push(message="source ready")
        st = bpy.context.scene.stepstone
        st.mode, st.replace_source = "texture", True
        try:
            assert bpy.ops.stepstone.stylize(options=opts("stylize")) == {"FINISHED"}
            job = s.jobs[0]
            d.until(lambda: d.job_settled(job), 120, "replace-texture stylize")
        finally:
            bpy.context.scene.stepstone.replace_source = False
        src = bpy.data.objects["ReplaceTextureSource"]
        out = {"state": job.state, "error": job.error, "same_mesh": src.data.name == mesh_name,
               "polygons": len(src.data.polygons), "material": src.data.materials[0].name,
               "has_texture": any(n.type == "TEX_IMAGE" for n in src.data.materials[0].node_tree.nodes)
               if src.data.materials[0].use_nodes else False,
               "artist_material_kept": "ReplaceArtistMaterial" in bpy.data.materials}
        out["undo"] = sorted(bpy.ops.ed.undo())
        src = bpy.data.objects["ReplaceTextureSource"]
        out["material_after_undo"] = src.data.materials[0].name
        return out

    @step(results, "stylize_no_uv")
    def _():
        """Texture mode on a mesh without a UV map: the same polygons, the style as a colour attribute."""
        for o in bpy.context.selected_objects:
            o.select_set(False)
        bpy.ops.mesh.primitive_cube_add(size=0.5, location=(6.0, 3.0, 0.0))
        src = bpy.context.active_object
        src.name = "NoUVSource"
        while len(src.data.uv_layers):
            src.data.uv_layers.remove(src.data.uv_layers[0])
        src.data.update()
        bpy.context.view_layer.update()  # the evaluated mesh (what is sent) without the UV map too
        st = bpy.context.scene.stepstone
        st.mode = "texture"
        assert bpy.ops.stepstone.stylize(options=opts("stylize")) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 300, "stylize job (no UV map)")
        res = bpy.data.objects[list(job.slots.values())[0]]
        return {"state": job.state, "error": job.error, "polygons": [len(src.data.polygons), len(res.data.polygons)],
                "summary": mesh_summary(bpy, res), "baked_image": job.baked_image}

    @step(results, "gallery")
    def _():
        ok, why = s.workflow_available("gallery")
        if not ok:
            raise RuntimeError(f"gallery unavailable: {why}")
        for o in bpy.context.selected_objects:
            o.select_set(False)
        bpy.ops.mesh.primitive_cylinder_add(radius=0.3, depth=0.8, location=(-3, 0, 0))
        a = bpy.context.active_object
        bpy.ops.mesh.primitive_uv_sphere_add(radius=0.4, location=(-4, 0, 0), segments=16, ring_count=8)
        b = bpy.context.active_object
        cam = bpy.data.objects.new("GalleryCam", bpy.data.cameras.new("GalleryCam"))
        bpy.context.scene.collection.objects.link(cam)
        for o in (a, b, cam):
            o.select_set(True)
        st = bpy.context.scene.stepstone
        st.count = 3
        st.subjects = "tower, gate"
        st.spacing = 1.5
        assert bpy.ops.stepstone.gallery(options=opts("gallery")) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 300, "gallery job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        images = []
        for name in job.images:
            img = bpy.data.images[name]
            px = list(img.pixels[:])  # decodes the packed PNG
            images.append({"name": name, "size": list(img.size), "packed": img.packed_file is not None,
                           "pixels": len(px), "mean": sum(px) / max(len(px), 1)})
        return {"state": job.state, "error": job.error, "objects": [mesh_summary(bpy, o) for o in objs],
                "collection": job.collection_actual, "images": images,
                "collection_objects": sorted(o.name for o in bpy.data.collections[job.collection_actual].objects)
                if job.collection_actual else []}

    @step(results, "in_place")
    def _():
        """A fixed-size stream (the diagnostic torus) updates the slot's mesh datablock in place."""
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        before = s.stream.in_place_updates
        job = s.submit("diagnostic", {"steps": 4, "faces": 6000, "delay": 0.3}, None, "fixed topology",
                       Placement(collection="Stepstone: in place"))
        objects = set()

        def cond():
            if job.slots.get("diagnostic"):
                objects.add(job.slots["diagnostic"])
            return d.job_settled(job)

        d.until(cond, 60, "fixed-topology job")
        ob = bpy.data.objects[job.slots["diagnostic"]]
        return {"state": job.state, "meshes_received": job.meshes_received, "objects_used": len(objects),
                "in_place_updates": s.stream.in_place_updates - before, "object": mesh_summary(bpy, ob),
                "mesh_datablocks_of_job": sum(1 for m in bpy.data.meshes if m.name.startswith(ob.name))}

    @step(results, "cancel")
    def _():
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        job = s.submit("diagnostic", {"steps": 200, "resolution": 16, "delay": 0.05}, None, "slow diagnostic",
                       Placement(collection="Stepstone: cancel test"))
        d.until(lambda: job.meshes_received >= 1 and job.job_id is not None, 60, "first mesh of the slow job")
        d.until(lambda: bool(job.slots) and bool(bpy.data.objects.get(list(job.slots.values())[0])), 60,
                "the first preview object")
        preview = list(job.slots.values())[0]
        coll = job.collection_actual
        assert bpy.ops.stepstone.cancel(job=job.key) == {"FINISHED"}
        d.until(lambda: d.job_settled(job) and not job.cleanup_pending, 30, "cancellation")
        return {"state": job.state, "error": job.error, "meshes_received": job.meshes_received, "step": job.step,
                "preview_left": bpy.data.objects.get(preview) is not None,
                "collection_left": bpy.data.collections.get(coll) is not None,
                "objects_of_job": [o.name for o in bpy.data.objects if o.get("stepstone_job") == job.key]}

    @step(results, "panels_draw")
    def _():
        """Every panel's draw function on the real session and scene. Background mode has no UI layout, so the
        panels draw into a recorder that keeps what they put in it; the check is that long messages come whole
        (wrapped to the region's width, nothing dropped) and that no line is wider than the region."""
        from bl_ext.user_default.stepstone import panels as apanels  # type: ignore[import-not-found]
        from bl_ext.user_default.stepstone.jobs import JobRecord  # type: ignore[import-not-found]

        class Recorder:
            def __init__(self, sink):
                self.sink = sink
                self.enabled = True

            def _child(self, *a, **k):
                return Recorder(self.sink)

            row = column = box = split = _child

            def label(self, text="", icon="NONE", **k):
                self.sink.append(text)

            def prop(self, *a, **k):
                pass

            def operator(self, *a, **k):
                class Op:
                    pass
                return Op()

            def progress(self, **k):
                self.sink.append(k.get("text", ""))

            def template_ID(self, *a, **k):
                pass

        class Region:
            width = 300

        class Ctx:
            scene = bpy.context.scene
            region = Region()
            preferences = bpy.context.preferences
            active_object = bpy.context.active_object
            selected_objects = list(bpy.context.selected_objects)

        hint = ("the starter set has no text-to-image model and stabilityai/stable-diffusion-2-1-base is not "
                "downloaded \u2014 run `python -m backend models download diffusion` on the backend's machine")
        s.notice(hint)
        failed = JobRecord(request_id="long", workflow="stylize", label="a very long label " * 4)
        failed.finish("failed", "The backend ran out of memory while running stylize at the Paper preset. Choose "
                                "the Standard preset, or close other programs on the backend's machine, and run "
                                "it again.")
        s.jobs.append(failed)
        out = {}
        try:
            for cls in apanels.classes:
                sink: list = []
                fake = type("P", (), {"layout": Recorder(sink)})()
                cls.draw(fake, Ctx())
                out[cls.__name__] = sink
        finally:
            s.jobs.remove(failed)
        width = apanels._width(Ctx())
        every = [t for sink in out.values() for t in sink]
        return {"width": width, "longest": max(len(t) for t in every), "text": " ".join(every), "hint": hint,
                "error": failed.error, "label": failed.label.strip(), "panels": sorted(out)}

    @step(results, "undo")
    def _():
        """What Ctrl-Z does after a result arrived from the timer (background mode has no window: ed.undo may be
        refused there; the outcome is recorded either way)."""
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        pushes = s.undo_pushes
        try:
            bpy.ops.ed.undo_push(message="before stepstone job")
            pushed_before = True
        except RuntimeError as exc:
            pushed_before = str(exc)
        job = s.submit("diagnostic", {"steps": 2, "resolution": 16}, None, "undo me",
                       Placement(collection="Stepstone: undo"))
        d.until(lambda: d.job_settled(job), 60, "undo job")
        name = list(job.slots.values())[0]
        out = {"pushed_before": pushed_before, "result_pushes": s.undo_pushes - pushes,
               "exists_before_undo": bpy.data.objects.get(name) is not None}
        try:
            out["undo"] = sorted(bpy.ops.ed.undo())
            out["exists_after_undo"] = bpy.data.objects.get(name) is not None
        except RuntimeError as exc:
            out["undo"] = f"refused: {exc}"
            return out
        # ... and after a stylize (texture mode: a copy of the source with a baked texture, beside it)
        for o in bpy.context.selected_objects:
            o.select_set(False)
        bpy.ops.mesh.primitive_cube_add(size=0.4, location=(-6.0, 4.0, 0.0))
        src = bpy.context.active_object
        src.name = "UndoSource"
        bpy.ops.ed.undo_push(message="add the source")
        st = bpy.context.scene.stepstone
        st.mode, st.replace_source = "texture", False
        assert bpy.ops.stepstone.stylize(options=opts("stylize")) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 120, "stylize job to undo")
        res = list(job.slots.values())[0]
        out["stylize_result_before_undo"] = bpy.data.objects.get(res) is not None
        out["stylize_undo"] = sorted(bpy.ops.ed.undo())
        out["stylize_result_after_undo"] = bpy.data.objects.get(res) is not None
        src = bpy.data.objects.get("UndoSource")
        out["source_after_undo"] = None if src is None else {"polygons": len(src.data.polygons),
                                                             "materials": [m.name for m in src.data.materials if m]}
        # the timer keeps running after an undo: a later tick must not bring the result back or fail
        for _ in range(20):
            s.tick()
        out["stylize_result_after_ticks"] = bpy.data.objects.get(res) is not None
        return out

    @step(results, "image_to_shape")
    def _():
        ok, why = s.workflow_available("image-to-shape")
        if not ok:
            raise RuntimeError(f"image-to-shape unavailable: {why}")
        import numpy as np

        img = bpy.data.images.new("Red block \u2014 concept", 48, 48)
        px = np.zeros((48, 48, 4), np.float32)
        px[..., 3] = 1.0
        px[12:36, 12:36, :3] = (0.8, 0.1, 0.1)
        img.pixels.foreach_set(px.ravel())
        st = bpy.context.scene.stepstone  # after an undo the old Scene reference is gone
        st.image_source = "IMAGE"
        st.image = img
        poll = bpy.ops.stepstone.image_to_shape.poll()
        assert bpy.ops.stepstone.image_to_shape(options=opts("image-to-shape")) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 300, "image-to-shape job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        return {"poll": poll, "state": job.state, "error": job.error, "workflow": job.workflow,
                "objects": [mesh_summary(bpy, o) for o in objs]}

    @step(results, "connect_errors")
    def _():
        """Settings problems are messages (operator reports), never tracebacks."""
        p = d.prefs()
        out = {}

        def attempt(label):
            try:
                s.connect(p)
                out[label] = "connected?!"
            except mod.session.ConnectError as exc:
                out[label] = str(exc)

        p.connection_mode = "MANUAL"
        p.address, p.key, p.curve_server_key = "tcp://10.1.2.3:5555", "00ff", ""
        attempt("remote_without_online_access")
        p.address, p.key = "127.0.0.1:5555", "00ff"
        attempt("bad_address")
        p.address, p.key = "tcp://127.0.0.1:5555", "not hex"
        attempt("bad_key")
        p.connection_mode = "AUTO"
        p.connection_file = str(Path(args.home) / "nowhere" / "backend.json")
        attempt("missing_file")
        try:  # in background mode an operator's ERROR report surfaces as RuntimeError (in the UI: a report)
            out["operator"] = sorted(bpy.ops.stepstone.connect())
        except RuntimeError as exc:
            out["operator"] = str(exc)
        out["online_access"] = bpy.app.online_access
        out["state"] = s.state
        return out

    @step(results, "file_new")
    def _():
        """A job started in one file never writes into another (File > New while it runs)."""
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        if not s.connected:
            d.connect(args.connection_file)
        job = s.submit("diagnostic", {"steps": 40, "resolution": 16, "delay": 0.1}, None, "old file job",
                       Placement(collection="Stepstone: old file"))
        d.until(lambda: bool(job.slots), 60, "the first preview in the old file")
        bpy.ops.wm.read_homefile(use_empty=True)
        d.until(lambda: d.job_settled(job), 120, "the job to finish after File > New")
        leaked = [o.name for o in bpy.data.objects if o.get("stepstone_job") == job.key]
        return {"state": job.state, "detached": job.detached, "leaked": leaked, "message": job.message,
                "objects_in_new_file": len(bpy.data.objects)}

    @step(results, "unregister")
    def _():
        import bpy as _bpy

        _bpy.ops.preferences.addon_disable(module=ADDON_MODULE)
        gone = {
            "panels": not hasattr(_bpy.types, "STEPSTONE_PT_status"),
            "operator": not hasattr(_bpy.types, "STEPSTONE_OT_generate"),
            "scene_props": not hasattr(_bpy.types.Scene, "stepstone"),
            "timer": not _bpy.app.timers.is_registered(mod.session.timer),
            "session": mod.session._SESSION is None,
        }
        # enabling again works (an artist toggling the checkbox)
        _bpy.ops.preferences.addon_enable(module=ADDON_MODULE)
        again = hasattr(_bpy.types, "STEPSTONE_PT_status")
        _bpy.ops.preferences.addon_disable(module=ADDON_MODULE)
        return {"gone": gone, "re_enabled": again}


def group_restart(bpy, mod, args, results: dict) -> None:
    """Start the backend from Blender, kill it mid-job, see the status, restart it and reconnect."""
    d = Driver(bpy, mod)
    s = d.s

    @step(results, "start_local")
    def _():
        p = d.prefs()
        p.python_path = sys.executable
        p.backend_dir = str(ROOT)
        p.profile = "tiny"
        p.device = "cpu"
        p.heartbeat_s = 0.25
        p.timeout_s = 1.5
        assert bpy.ops.stepstone.start_backend() == {"FINISHED"}
        d.until(lambda: s.connected, 120, "local backend")
        return {"pid": s.local.proc.pid, "backend_id": s.welcome.get("backend_id"),
                "log_tail": s.local.log_tail(5), "status": s.local.status()}

    @step(results, "kill_mid_job")
    def _():
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        job = s.submit("diagnostic", {"steps": 400, "resolution": 16, "delay": 0.05}, None, "doomed",
                       Placement(collection="Stepstone: restart test"))
        d.until(lambda: job.meshes_received >= 1, 60, "first mesh")
        s.local.proc.kill()
        s.local.proc.wait(10)
        waited = d.until(lambda: s.state == "disconnected", 30, "disconnect")
        panel_reason = s.reason
        return {"state": s.state, "reason": panel_reason, "job_state": job.state, "job_message": job.message,
                "detect_s": round(waited, 2), "notices": list(s.notices), "job": job.key}

    @step(results, "poll_while_down")
    def _():
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            s.tick()
            n += 1
            time.sleep(0.01)
        return {"ticks": n, "state": s.state, "reason": s.reason,
                "generate_poll": bpy.ops.stepstone.diagnostic.poll()}

    @step(results, "restart")
    def _():
        old = s.backend_id_seen
        assert bpy.ops.stepstone.start_backend() == {"FINISHED"}
        d.until(lambda: s.connected and s.backend_id_seen != old, 120, "reconnect to the restarted backend")
        job = s.find(results["kill_mid_job"]["job"]) if results.get("kill_mid_job", {}).get("ok") else None
        # and it works: a quick job on the new backend
        from bl_ext.user_default.stepstone.jobs import Placement  # type: ignore[import-not-found]

        j2 = s.submit("diagnostic", {"steps": 2, "resolution": 16}, None, "after restart",
                      Placement(collection="Stepstone: restart test"))
        d.until(lambda: d.job_settled(j2), 60, "job after restart")
        return {"old": old, "new": s.backend_id_seen, "restarts": s.restarts, "notices": list(s.notices),
                "old_job_state": job.state if job else None, "old_job_error": job.error if job else None,
                "new_job_state": j2.state}

    @step(results, "unregister")
    def _():
        proc = s.local.proc
        bpy.ops.preferences.addon_disable(module=ADDON_MODULE)
        try:
            proc.wait(10)
        except Exception:
            pass
        return {"backend_stopped": proc.poll() is not None, "session": mod.session._SESSION is None}


def group_starter(bpy, mod, args, results: dict) -> None:
    """Against a ``--profile starter`` backend (the shipped models, issue 14): every workflow is available, and
    SDS stylization and a gallery of the selected exemplars run on the starter text-to-image model."""
    d = Driver(bpy, mod)
    s = d.s
    scn = bpy.context.scene
    options = json.loads(args.options or "{}")

    @step(results, "connect")
    def _():
        d.connect(args.connection_file)
        caps = s.capabilities()
        return {"profile": s.welcome.get("profile"), "capabilities": {k: v.get("available") for k, v in caps.items()},
                "options": {k: {o: {c: x.get("available") for c, x in choices.items()}
                                for o, choices in v.get("options", {}).items()} for k, v in caps.items()}}

    def select_only(objs):
        for o in bpy.context.selected_objects:
            o.select_set(False)
        for o in objs:
            o.select_set(True)
        bpy.context.view_layer.objects.active = objs[0]

    @step(results, "stylize_sds")
    def _():
        bpy.ops.mesh.primitive_cylinder_add(radius=0.3, depth=0.9, location=(3.0, 0.0, 0.45))
        src = bpy.context.active_object
        src.name = "Vase"
        select_only([src])
        st = scn.stepstone
        st.style, st.mode, st.strength, st.replace_source = "made of gold", "sds", 0.5, False
        assert bpy.ops.stepstone.stylize(options=json.dumps(options.get("stylize", {}))) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 600, "SDS stylize job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        return {"state": job.state, "error": job.error, "objects": [mesh_summary(bpy, o) for o in objs]}

    @step(results, "gallery")
    def _():
        made = []
        for i, (prim, kw) in enumerate((("primitive_cube_add", {"size": 0.6}),
                                        ("primitive_cylinder_add", {"radius": 0.3, "depth": 0.8}),
                                        ("primitive_cone_add", {"radius1": 0.35, "depth": 0.8}))):
            getattr(bpy.ops.mesh, prim)(location=(-3.0 - 1.2 * i, 0.0, 0.4), **kw)
            made.append(bpy.context.active_object)
        select_only(made)
        st = scn.stepstone
        st.count, st.subjects, st.spacing = 2, "a chair, a lamp", 1.5
        assert bpy.ops.stepstone.gallery(options=json.dumps(options.get("gallery", {}))) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 900, "gallery job")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        return {"state": job.state, "error": job.error, "objects": [mesh_summary(bpy, o) for o in objs],
                "images": list(job.images)}


def group_pretrained(bpy, mod, args, results: dict) -> None:
    """Against a ``--profile tiny-pretrained`` backend (the pretrained profile's Shap-E routes with tiny random
    models, issue 13): the status panel names each workflow's route; text to shape (Shap-E prior, then Dream3D),
    image to shape (Shap-E img2img) and a gallery of two run from the operators."""
    d = Driver(bpy, mod)
    s = d.s
    options = json.loads(args.options or "{}")

    def opts(workflow: str) -> str:
        return json.dumps(options.get(workflow, {}))

    def run_job(what: str, timeout: float = 600) -> dict:
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), timeout, what)
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        return {"state": job.state, "error": job.error, "workflow": job.workflow, "images": list(job.images),
                "meshes_received": job.meshes_received, "objects": [mesh_summary(bpy, o) for o in objs]}

    @step(results, "connect")
    def _():
        d.connect(args.connection_file)
        caps = s.capabilities()
        return {"profile": s.welcome.get("profile"), "capabilities": {k: v.get("available") for k, v in caps.items()},
                "routes": {k: s.workflow_route(k) for k in caps}}

    @step(results, "status_panel")
    def _():
        """The status panel's draw function on the real session (background mode: into a recorder of labels)."""
        from bl_ext.user_default.stepstone import panels as apanels  # type: ignore[import-not-found]

        class Recorder:
            def __init__(self, sink):
                self.sink, self.enabled = sink, True

            def _child(self, *a, **k):
                return Recorder(self.sink)

            row = column = box = split = _child

            def label(self, text="", icon="NONE", **k):
                self.sink.append(text)

            def operator(self, *a, **k):
                return type("Op", (), {})()

            def prop(self, *a, **k):
                pass

        class Ctx:
            scene = bpy.context.scene
            region = type("R", (), {"width": 400})()
            preferences = bpy.context.preferences

        sink: list = []
        apanels.STEPSTONE_PT_status.draw(type("P", (), {"layout": Recorder(sink)})(), Ctx())
        return {"text": " ".join(sink)}

    @step(results, "generate")
    def _():
        st = bpy.context.scene.stepstone
        st.prompt, st.variants, st.quality, st.spacing = "a chair", 1, "fast", 2.0
        assert bpy.ops.stepstone.generate(options=opts("text-to-shape")) == {"FINISHED"}
        return run_job("text-to-shape job")

    @step(results, "image_to_shape")
    def _():
        import numpy as np

        img = bpy.data.images.new("Red block", 48, 48)
        px = np.ones((48, 48, 4), np.float32)
        px[12:36, 12:36, :3] = (0.8, 0.1, 0.1)
        img.pixels.foreach_set(px.ravel())
        st = bpy.context.scene.stepstone
        st.image_source, st.image = "IMAGE", img
        assert bpy.ops.stepstone.image_to_shape(options=opts("image-to-shape")) == {"FINISHED"}
        return run_job("image-to-shape job")

    @step(results, "gallery")
    def _():
        bpy.ops.mesh.primitive_cube_add(size=0.6, location=(-3.0, 0.0, 0.3))
        cube = bpy.context.active_object
        for o in bpy.context.selected_objects:
            o.select_set(False)
        cube.select_set(True)
        bpy.context.view_layer.objects.active = cube
        st = bpy.context.scene.stepstone
        st.count, st.subjects, st.spacing = 2, "a barn", 1.5
        assert bpy.ops.stepstone.gallery(options=opts("gallery")) == {"FINISHED"}
        return run_job("gallery job")


def uv_summary(bpy, obj) -> dict:
    """A result's UV map and the image its material takes its Base Color from (issue 16, uv_texture)."""
    import numpy as np

    me = obj.data
    out = mesh_summary(bpy, obj)
    uv = me.uv_layers.active
    out["uv_map"] = None if uv is None else uv.name
    if uv is not None and len(me.loops):
        co = np.empty(len(me.loops) * 2, np.float32)
        uv.uv.foreach_get("vector", co)
        out["uv_range"] = [float(co.min()), float(co.max())]
        out["uv_finite"] = bool(np.isfinite(co).all())
    out["texture"] = None
    mat = me.materials[0] if len(me.materials) else None
    if mat is not None and mat.use_nodes:
        nt = mat.node_tree
        bsdf = next((n for n in nt.nodes if n.type == "BSDF_PRINCIPLED"), None)
        links = [lk for lk in nt.links if bsdf is not None and lk.to_node == bsdf
                 and lk.to_socket.name == "Base Color" and lk.from_node.type == "TEX_IMAGE"]
        if links:
            tex = links[0].from_node
            uvn = [lk.from_node for lk in nt.links if lk.to_node == tex and lk.from_node.type == "UVMAP"]
            img = tex.image
            out["texture"] = {"image": img.name if img else None, "size": list(img.size) if img else None,
                              "packed": bool(img and img.packed_file), "uv_node_map": uvn[0].uv_map if uvn else None}
    return out


def group_uv(bpy, mod, args, results: dict) -> None:
    """Generate with UV texture on: each result has a UV map and a material with its baked image (issue 16)."""
    d = Driver(bpy, mod)
    s = d.s
    options = json.loads(args.options or "{}")

    @step(results, "connect")
    def _():
        d.connect(args.connection_file)
        return {"state": s.state, "profile": s.welcome.get("profile")}

    @step(results, "generate_uv")
    def _():
        st = bpy.context.scene.stepstone
        st.prompt, st.variants, st.quality, st.spacing = "a red chair", 2, "fast", 2.0
        st.uv_texture = True
        assert bpy.ops.stepstone.generate(options=json.dumps(options.get("text-to-shape", {}))) == {"FINISHED"}
        job = s.jobs[0]
        d.until(lambda: d.job_settled(job), 300, "text-to-shape job with uv_texture")
        objs = [bpy.data.objects[n] for n in job.slots.values()]
        return {"state": job.state, "error": job.error, "job": job.key, "slots": sorted(job.slots),
                "objects": [uv_summary(bpy, o) for o in objs], "logged": list(s.notices)}

    @step(results, "reimport_uv")
    def _():
        gen = results.get("generate_uv", {})
        if not gen.get("ok"):
            raise RuntimeError("generate_uv failed")
        before = set(bpy.data.objects.keys())
        assert bpy.ops.stepstone.reimport(job=gen["job"]) == {"FINISHED"}
        job = s.find(gen["job"])
        d.until(lambda: len(job.slots) >= len(gen["slots"]) and not s.stream.pending_for(job.key), 60, "re-import")
        new = sorted(set(bpy.data.objects.keys()) - before)
        return {"objects": [uv_summary(bpy, bpy.data.objects[n]) for n in new]}


GROUPS = {"main": group_main, "restart": group_restart, "starter": group_starter, "pretrained": group_pretrained,
          "uv": group_uv}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("group", choices=sorted(GROUPS))
    ap.add_argument("--zip", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--connection-file", default="")
    ap.add_argument("--options", default="{}", help="JSON: workflow -> extra options for the operators")
    ap.add_argument("--only", default="", help="comma separated steps to run (default: all)")
    args = ap.parse_args()
    ONLY.update(x for x in args.only.split(",") if x)
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    counter = ErrorCounter()
    logging.getLogger("stepstone").addHandler(counter)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bpy = setup_blender(home)
        mod = install(bpy, args.zip)
        GROUPS[args.group](bpy, mod, args, results)
    except Exception as exc:
        results["fatal"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    results["logged_errors"] = counter.records
    Path(args.result).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
