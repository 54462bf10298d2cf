"""Operators ``stepstone.*``: connect, start/stop a local backend, generate, stylize, gallery, cancel, re-import.

Operators only send requests and return; results stream in through the session's timer. Every failure is a
``self.report`` with a message the artist can act on.
"""

from __future__ import annotations

import json

import bpy
from bpy.props import StringProperty

from . import scene, session as _session, textfit
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


def _preset_poll(cls, workflow: str, preset: str) -> bool:
    ok, why = _session.get().preset_available(workflow, preset)
    if not ok:
        cls.poll_message_set(why)
    return ok


def _with_preset(params: dict, preset: str) -> dict:
    """``params`` with the artist's preset (Auto: none, the backend chooses for its device and memory)."""
    if preset and preset != "auto":
        params["preset"] = preset
    return params


def _grid_origin(context, count: int, spacing: float, start=None) -> tuple[float, float, float]:
    """Where a grid of ``count`` results starts: at ``start`` (the 3D cursor by default), moved along +X until
    its footprint overlaps no visible mesh object."""
    cols = grid_columns(count)
    rows = (max(count, 1) + cols - 1) // cols
    origin = tuple(start) if start is not None else _cursor(context)
    return scene.free_origin(origin, ((cols - 1) * spacing, (rows - 1) * spacing))


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
    bl_options = {"UNDO"}  # no REGISTER: "Adjust last operation" would send the job again

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "text-to-shape"):
            return False
        st = context.scene.stepstone
        ok, why = _session.get().option_available("text-to-shape", "quality", st.quality)
        if not ok:
            cls.poll_message_set(f"quality {st.quality!r}: {why}")
            return False
        return _preset_poll(cls, "text-to-shape", st.t2s_preset)

    def execute(self, context):
        st = context.scene.stepstone
        prompt = st.prompt.strip()
        if not prompt:
            self.report({"ERROR"}, "type a prompt first")
            return {"CANCELLED"}
        warn = textfit.prompt_warning(prompt, str(_session.get().welcome.get("profile", "")))
        if warn:
            self.report({"WARNING"}, warn)
        params = _with_preset({"prompt": prompt, "variants": int(st.variants), "quality": st.quality,
                               "seed": int(st.seed)}, st.t2s_preset)
        if st.uv_texture:  # only when on: a backend without the option still takes the plain request
            params["uv_texture"] = True
        placement = Placement(collection=f"Stepstone: {prompt}",
                              origin=_grid_origin(context, int(st.variants), float(st.spacing)),
                              spacing=float(st.spacing), columns=grid_columns(st.variants))
        return _submit(self, "text-to-shape", params, None, textfit.fit_bytes(prompt, 48), placement)


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
    bl_options = {"UNDO"}

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
            return False
        return _preset_poll(cls, "stylize", st.stylize_preset)

    def execute(self, context):
        st = context.scene.stepstone
        obj = context.active_object
        style = st.style.strip()
        if not style:
            self.report({"ERROR"}, "type a style first")
            return {"CANCELLED"}
        try:
            payload = scene.object_payload(obj, context.evaluated_depsgraph_get(), max_faces=_max_faces(),
                                           uvs=st.mode == "texture")
        except scene.SelectionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        params = _with_preset({"style": style, "mode": st.mode, "strength": float(st.strength)}, st.stylize_preset)
        replace = bool(st.replace_source)
        placement = Placement(collection="Stepstone", source=obj.name, matrix_world=payload["matrix_world"],
                              replace_source=replace, offset=(0.0, 0.0, 0.0) if replace else scene.beside_offset(obj),
                              keep_mesh=st.mode == "texture")
        return _submit(self, "stylize", params, [payload], textfit.fit_bytes(f"{obj.name} {style}", 48), placement)


class STEPSTONE_OT_gallery(bpy.types.Operator):
    """Grow a theme gallery from the selected mesh objects (the exemplars)"""

    bl_idname = "stepstone.gallery"
    bl_label = "Make gallery"
    bl_options = {"UNDO"}

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "gallery"):
            return False
        if not any(o.type == "MESH" for o in context.selected_objects):
            cls.poll_message_set("select one or more mesh objects as exemplars")
            return False
        return _preset_poll(cls, "gallery", context.scene.stepstone.gallery_preset)

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
        params = _with_preset({"subjects": subjects, "count": int(st.count), "seed": int(st.seed)}, st.gallery_preset)
        # place the gallery to the right of the exemplars, off anything already there
        boxes = [b for b in (scene.world_box(o) for o in context.selected_objects if o.type == "MESH") if b]
        origin = _cursor(context)
        if boxes:
            origin = (max(b[1][0] for b in boxes) + float(st.spacing), origin[1], origin[2])
        origin = _grid_origin(context, int(st.count), float(st.spacing), start=origin)
        placement = Placement(collection="Stepstone gallery", origin=origin, spacing=float(st.spacing),
                              columns=grid_columns(st.count))
        label = textfit.fit_bytes(f"gallery of {', '.join(p['name'] for p in payloads)}", 48)
        return _submit(self, "gallery", params, payloads, label, placement)


class STEPSTONE_OT_image_to_shape(bpy.types.Operator):
    """Lift the image (an image datablock or a file) to a coloured 3D shape at the 3D cursor"""

    bl_idname = "stepstone.image_to_shape"
    bl_label = "Image to shape"
    bl_options = {"UNDO"}

    options: _options_prop()

    @classmethod
    def poll(cls, context):
        if not _workflow_poll(cls, "image-to-shape"):
            return False
        st = context.scene.stepstone
        if st.image_source == "IMAGE" and st.image is None:
            cls.poll_message_set("pick an image (or switch to File and choose an image file)")
            return False
        if st.image_source == "FILE" and not st.image_path.strip():
            cls.poll_message_set("choose an image file")
            return False
        return True

    def execute(self, context):
        st = context.scene.stepstone
        try:
            png, name = scene.image_png(st.image if st.image_source == "IMAGE" else None,
                                        bpy.path.abspath(st.image_path) if st.image_source == "FILE" else "")
        except scene.SelectionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        import base64

        params = {"image_png": base64.b64encode(png).decode("ascii"), "image_name": textfit.fit_bytes(name, 48),
                  "seed": int(st.seed)}
        if st.uv_texture:
            params["uv_texture"] = True
        placement = Placement(collection=f"Stepstone: {name}", origin=_grid_origin(context, 1, float(st.spacing)),
                              spacing=float(st.spacing))
        return _submit(self, "image-to-shape", params, None, textfit.fit_bytes(name, 48), placement)


class STEPSTONE_OT_job_info(bpy.types.Operator):
    """The job's whole status"""

    bl_idname = "stepstone.job_info"
    bl_label = "Job details"

    job: StringProperty(name="Job", default="", options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context, properties):
        job = _session.get().find(properties.job)
        return job_text(job) if job is not None else "no such job"

    def execute(self, context):
        job = _session.get().find(self.job)
        if job is None:
            self.report({"WARNING"}, "this job is no longer in the list")
            return {"CANCELLED"}
        self.report({"ERROR"} if job.state in ("failed", "lost", "damaged") else {"INFO"}, job_text(job))
        return {"FINISHED"}


def job_text(job) -> str:
    """Everything about a job in one text (tooltip and report: nothing cut)."""
    parts = [f"{job.workflow}: {job.label}"]
    if job.preset:
        parts.append(f"preset {job.preset}")
    parts.append(job.status_line())
    if job.job_id:
        parts.append(f"job {job.job_id}")
    return ". ".join(p.rstrip(".") for p in parts if p) + "."


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
    STEPSTONE_OT_image_to_shape,
    STEPSTONE_OT_job_info,
    STEPSTONE_OT_cancel,
    STEPSTONE_OT_reimport,
    STEPSTONE_OT_list_backend_jobs,
    STEPSTONE_OT_clear_finished,
)
