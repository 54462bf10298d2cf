"""Operators ``stepstone.*``: connect, start/stop a local backend, generate, stylize, gallery, cancel, re-import.

Operators only send requests and return; results stream in through the session's timer. Every failure is a
``self.report`` with a message the artist can act on.
"""

from __future__ import annotations

import json

import bpy
from bpy.props import StringProperty

from . import scene, session as _session
from .jobs import Placement, grid_columns
from .local_backend import BackendStartError
from .preferences import get_prefs


def _options_prop():
    return StringProperty(
        name="Options", default="", options={"HIDDEN", "SKIP_SAVE"},
        description="Extra workflow options as a JSON object (advanced; e.g. {\"iterations\": 10})",
    )


def _merge_options(op, params: dict) -> dict | None:
    """``params`` updated with the operator's JSON ``options``; None (after a report) when they are malformed."""
    if not op.options:
        return params
    try:
        extra = json.loads(op.options)
    except ValueError as exc:
        op.report({"ERROR"}, f"options must be a JSON object: {exc}")
        return None
    if not isinstance(extra, dict):
        op.report({"ERROR"}, "options must be a JSON object, e.g. {\"iterations\": 10}")
        return None
    return {**params, **extra}


def _workflow_poll(cls, workflow: str) -> bool:
    ok, why = _session.get().workflow_available(workflow)
    if not ok:
        cls.poll_message_set(why)
    return ok


def _max_faces() -> int:
    p = get_prefs()
    return int(p.max_faces) if p is not None else scene.DEFAULT_MAX_FACES


def _cursor(context) -> tuple[float, float, float]:
    return tuple(context.scene.cursor.location)


class STEPSTONE_OT_connect(bpy.types.Operator):
    """Connect to the Stepstone backend with the settings in the add-on preferences"""

    bl_idname = "stepstone.connect"
    bl_label = "Connect"

    def execute(self, context):
        try:
            _session.get().connect(get_prefs())
        except _session.ConnectError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, "connecting to the Stepstone backend")
        return {"FINISHED"}


class STEPSTONE_OT_disconnect(bpy.types.Operator):
    """Close the connection to the backend (the backend keeps running and keeps its jobs)"""

    bl_idname = "stepstone.disconnect"
    bl_label = "Disconnect"

    def execute(self, context):
        _session.get().disconnect()
        return {"FINISHED"}


class STEPSTONE_OT_start_backend(bpy.types.Operator):
    """Start a backend process on this machine with the interpreter, profile and device from the preferences"""

    bl_idname = "stepstone.start_backend"
    bl_label = "Start local backend"

    @classmethod
    def poll(cls, context):
        if _session.get().local.running:
            cls.poll_message_set("a local backend is already running")
            return False
        return True

    def execute(self, context):
        prefs = get_prefs()
        try:
            _session.get().start_local(prefs)
        except BackendStartError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, "starting the local backend; it connects when ready")
        return {"FINISHED"}


class STEPSTONE_OT_stop_backend(bpy.types.Operator):
    """Stop the backend process started from Blender"""

    bl_idname = "stepstone.stop_backend"
    bl_label = "Stop local backend"

    @classmethod
    def poll(cls, context):
        if not _session.get().local.running:
            cls.poll_message_set("no local backend was started from this Blender")
            return False
        return True

    def execute(self, context):
        _session.get().stop_local()
        return {"FINISHED"}


class STEPSTONE_OT_generate(bpy.types.Operator):
    """Generate 3D shapes from the prompt; they stream into a new collection at the 3D cursor"""

    bl_idname = "stepstone.generate"
    bl_label = "Generate"

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "text-to-shape"):
            return False
        st = context.scene.stepstone
        ok, why = _session.get().option_available("text-to-shape", "quality", st.quality)
        if not ok:
            cls.poll_message_set(f"quality {st.quality!r}: {why}")
        return ok

    def execute(self, context):
        st = context.scene.stepstone
        prompt = st.prompt.strip()
        if not prompt:
            self.report({"ERROR"}, "type a prompt first")
            return {"CANCELLED"}
        params = {"prompt": prompt, "variants": int(st.variants), "quality": st.quality, "seed": int(st.seed)}
        placement = Placement(collection=f"Stepstone: {prompt[:40]}", origin=_cursor(context),
                              spacing=float(st.spacing), columns=grid_columns(st.variants))
        return _submit(self, "text-to-shape", params, None, prompt[:40], placement)


class STEPSTONE_OT_diagnostic(bpy.types.Operator):
    """Run the backend's diagnostic job (no models): checks the connection and the mesh stream"""

    bl_idname = "stepstone.diagnostic"
    bl_label = "Test connection"

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        return _workflow_poll(cls, "diagnostic")

    def execute(self, context):
        st = context.scene.stepstone
        placement = Placement(collection="Stepstone: diagnostic", origin=_cursor(context), spacing=float(st.spacing))
        return _submit(self, "diagnostic", {}, None, "diagnostic", placement)


class STEPSTONE_OT_stylize(bpy.types.Operator):
    """Stylize the active mesh object from the style text; the result gets the source's transform"""

    bl_idname = "stepstone.stylize"
    bl_label = "Stylize"

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "stylize"):
            return False
        obj = context.active_object
        if obj is None or obj.type != "MESH":
            cls.poll_message_set("select a mesh object to stylize")
            return False
        st = context.scene.stepstone
        ok, why = _session.get().option_available("stylize", "mode", st.mode)
        if not ok:
            cls.poll_message_set(f"mode {st.mode!r}: {why}")
        return ok

    def execute(self, context):
        st = context.scene.stepstone
        obj = context.active_object
        style = st.style.strip()
        if not style:
            self.report({"ERROR"}, "type a style first")
            return {"CANCELLED"}
        try:
            payload = scene.object_payload(obj, context.evaluated_depsgraph_get(), max_faces=_max_faces())
        except scene.SelectionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        params = {"style": style, "mode": st.mode, "strength": float(st.strength)}
        placement = Placement(collection="Stepstone", source=obj.name, matrix_world=payload["matrix_world"],
                              replace_source=bool(st.replace_source))
        return _submit(self, "stylize", params, [payload], f"{obj.name} {style[:30]}", placement)


class STEPSTONE_OT_gallery(bpy.types.Operator):
    """Grow a theme gallery from the selected mesh objects (the exemplars)"""

    bl_idname = "stepstone.gallery"
    bl_label = "Make gallery"

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "gallery"):
            return False
        if not any(o.type == "MESH" for o in context.selected_objects):
            cls.poll_message_set("select one or more mesh objects as exemplars")
            return False
        return True

    def execute(self, context):
        st = context.scene.stepstone
        try:
            payloads, skipped = scene.selection_payloads(context.selected_objects, context.evaluated_depsgraph_get(),
                                                         max_faces=_max_faces())
        except scene.SelectionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if skipped:
            self.report({"WARNING"}, "skipped: " + ", ".join(skipped))
        if not payloads:
            self.report({"ERROR"}, "no mesh objects among the selection")
            return {"CANCELLED"}
        subjects = [s.strip() for s in st.subjects.split(",") if s.strip()]
        params = {"subjects": subjects, "count": int(st.count), "seed": int(st.seed)}
        # place the gallery to the right of the exemplars
        xs = [o.matrix_world.translation.x for o in context.selected_objects if o.type == "MESH"]
        origin = _cursor(context)
        if xs:
            origin = (max(xs) + 2.0 * float(st.spacing), origin[1], origin[2])
        placement = Placement(collection="Stepstone gallery", origin=origin, spacing=float(st.spacing),
                              columns=grid_columns(st.count))
        label = f"gallery of {', '.join(p['name'] for p in payloads)[:40]}"
        return _submit(self, "gallery", params, payloads, label, placement)


def _submit(op, workflow, params, meshes, label, placement):
    params = _merge_options(op, params)
    if params is None:
        return {"CANCELLED"}
    try:
        job = _session.get().submit(workflow, params, meshes, label, placement)
    except _session.ConnectError as exc:
        op.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    op.report({"INFO"}, f"{workflow}: sent ({job.request_id[:8]})")
    return {"FINISHED"}


class STEPSTONE_OT_cancel(bpy.types.Operator):
    """Cancel this job (the backend stops at its next step)"""

    bl_idname = "stepstone.cancel"
    bl_label = "Cancel"

    job: StringProperty(name="Job", default="")

    def execute(self, context):
        s = _session.get()
        keys = [self.job] if self.job else [j.key for j in s.jobs if j.active]
        if not keys:
            self.report({"WARNING"}, "no running job to cancel")
            return {"CANCELLED"}
        for key in keys:
            try:
                s.cancel(key)
            except _session.ConnectError as exc:
                self.report({"ERROR"}, str(exc))
                return {"CANCELLED"}
        return {"FINISHED"}


class STEPSTONE_OT_reimport(bpy.types.Operator):
    """Fetch this finished job's results from the backend again, as new objects"""

    bl_idname = "stepstone.reimport"
    bl_label = "Re-import"

    job: StringProperty(name="Job", default="")

    @classmethod
    def poll(cls, context):
        if not _session.get().connected:
            cls.poll_message_set("not connected to a backend")
            return False
        return True

    def execute(self, context):
        try:
            _session.get().reimport(self.job)
        except _session.ConnectError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class STEPSTONE_OT_list_backend_jobs(bpy.types.Operator):
    """Ask the backend for its stored jobs (also those of earlier Blender sessions) to re-import their results"""

    bl_idname = "stepstone.list_backend_jobs"
    bl_label = "Backend jobs"

    @classmethod
    def poll(cls, context):
        if not _session.get().connected:
            cls.poll_message_set("not connected to a backend")
            return False
        return True

    def execute(self, context):
        _session.get().refresh_backend_jobs()
        return {"FINISHED"}


class STEPSTONE_OT_clear_finished(bpy.types.Operator):
    """Remove finished jobs from the list (their objects stay in the scene)"""

    bl_idname = "stepstone.clear_finished"
    bl_label = "Clear finished"

    def execute(self, context):
        _session.get().clear_finished()
        return {"FINISHED"}


classes = (
    STEPSTONE_OT_connect,
    STEPSTONE_OT_disconnect,
    STEPSTONE_OT_start_backend,
    STEPSTONE_OT_stop_backend,
    STEPSTONE_OT_generate,
    STEPSTONE_OT_diagnostic,
    STEPSTONE_OT_stylize,
    STEPSTONE_OT_gallery,
    STEPSTONE_OT_cancel,
    STEPSTONE_OT_reimport,
    STEPSTONE_OT_list_backend_jobs,
    STEPSTONE_OT_clear_finished,
)
