"""The sidebar tab "Stepstone" (N panel of the 3D view): status, generate, stylize, gallery, jobs."""

from __future__ import annotations

import bpy

from . import session as _session
from . import textfit

WORKFLOWS_SHOWN = ("text-to-shape", "stylize", "gallery", "image-to-shape", "diagnostic")


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Stepstone"


class STEPSTONE_PT_status(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_status"
    bl_label = "Stepstone"

    def draw(self, context):
        layout = self.layout
        s = _session.get()
        w = s.welcome
        col = layout.column(align=True)
        if s.connected:
            col.label(text=f"Connected: {w.get('backend_id', '')}", icon="CHECKMARK")
            mem = (w.get("presets") or {}).get("memory_gib")
            label_wrapped(col, context, f"Profile {w.get('profile', '?')} on {w.get('device', '?')}"
                          + (f", {mem} GiB for jobs" if mem else ""))
        elif s.state == "connecting":
            col.label(text="Connecting...", icon="SORTTIME")
            if s.reason:
                label_wrapped(col, context, s.reason)
        else:
            col.label(text="Not connected", icon="ERROR")
            if s.reason:
                label_wrapped(col, context, s.reason)
        row = layout.row(align=True)
        if s.connected:
            row.operator("stepstone.disconnect", icon="UNLINKED")
            row.operator("stepstone.diagnostic", icon="MODIFIER", text="Test")
        else:
            row.operator("stepstone.connect", icon="PLUGIN")
            if s.local.running:
                row.operator("stepstone.stop_backend", icon="PAUSE", text="Stop backend")
            else:
                row.operator("stepstone.start_backend", icon="PLAY", text="Start backend")
        if s.connected:
            caps = s.capabilities()
            box = layout.box()
            for name in WORKFLOWS_SHOWN:
                if name not in caps:
                    continue
                ok, why = s.workflow_available(name)
                r = box.row()
                r.enabled = ok
                r.label(text=name, icon="CHECKBOX_HLT" if ok else "CHECKBOX_DEHLT")
                route = s.workflow_route(name)
                if route and name != "diagnostic":  # which models this profile runs it with (issue 13)
                    label_wrapped(box, context, f"Route: {route}")
                if not ok and why:
                    label_wrapped(box, context, why)
        for n in list(s.notices)[:3]:
            label_wrapped(layout, context, n)


class STEPSTONE_PT_generate(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_generate"
    bl_label = "Generate from text"

    def draw(self, context):
        st = context.scene.stepstone
        layout = self.layout
        layout.prop(st, "prompt", text="")
        row = layout.row(align=True)
        row.prop(st, "variants")
        row.prop(st, "seed")
        layout.prop(st, "quality", expand=True)
        layout.prop(st, "uv_texture")
        preset_ui(layout, context, st, "t2s_preset", "text-to-shape")
        warn = textfit.prompt_warning(st.prompt, str(_session.get().welcome.get("profile", "")))
        if warn:
            label_wrapped(layout, context, warn, icon="ERROR")
        layout.operator("stepstone.generate", icon="SHADERFX")


class STEPSTONE_PT_stylize(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_stylize"
    bl_label = "Stylize selected"

    def draw(self, context):
        st = context.scene.stepstone
        layout = self.layout
        obj = context.active_object
        layout.label(text=f"Source: {obj.name}" if obj is not None else "Source: (select a mesh)",
                     icon="OBJECT_DATA")
        layout.prop(st, "style", text="")
        layout.prop(st, "mode")
        layout.prop(st, "strength")
        preset_ui(layout, context, st, "stylize_preset", "stylize")
        if st.mode != "texture":
            label_wrapped(layout, context, "Shape modes remesh: the result is a new triangle mesh without the "
                          "source's UVs and materials.", icon="INFO")
        layout.prop(st, "replace_source")
        layout.operator("stepstone.stylize", icon="BRUSH_DATA")


class STEPSTONE_PT_gallery(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_gallery"
    bl_label = "Theme gallery"

    def draw(self, context):
        st = context.scene.stepstone
        layout = self.layout
        n = sum(1 for o in context.selected_objects if o.type == "MESH")
        layout.label(text=f"Exemplars: {n} selected mesh object{'s' if n != 1 else ''}", icon="OUTLINER_OB_GROUP_INSTANCE")
        layout.prop(st, "subjects")
        row = layout.row(align=True)
        row.prop(st, "count")
        row.prop(st, "spacing")
        preset_ui(layout, context, st, "gallery_preset", "gallery")
        layout.operator("stepstone.gallery", icon="GROUP")


class STEPSTONE_PT_image(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_image"
    bl_label = "Image to shape"

    def draw(self, context):
        st = context.scene.stepstone
        layout = self.layout
        layout.prop(st, "image_source", expand=True)
        if st.image_source == "IMAGE":
            layout.template_ID(st, "image", open="image.open")
        else:
            layout.prop(st, "image_path", text="")
        layout.prop(st, "uv_texture")
        layout.operator("stepstone.image_to_shape", icon="IMAGE_DATA")


class STEPSTONE_PT_jobs(_Panel, bpy.types.Panel):
    bl_idname = "STEPSTONE_PT_jobs"
    bl_label = "Jobs"

    def draw(self, context):
        layout = self.layout
        s = _session.get()
        st = context.scene.stepstone
        row = layout.row()
        row.prop(st, "show_finished", text="Finished")
        row.operator("stepstone.clear_finished", text="", icon="TRASH")
        if not s.jobs:
            layout.label(text="No jobs yet")
        for job in s.jobs:
            if not job.active and not st.show_finished:
                continue
            box = layout.box()
            head = box.row()
            title = f"{job.workflow}: {job.label}" + (f" ({job.preset})" if job.preset else "")
            title_lines = textfit.wrap(title, _width(context) - 6) or [""]
            head.label(text=title_lines[0])  # the rest of a long title on the lines below: nothing is cut
            info = head.operator("stepstone.job_info", text="", icon="INFO")
            info.job = job.key
            if job.active:
                op = head.operator("stepstone.cancel", text="", icon="CANCEL")
                op.job = job.key
            for line in title_lines[1:]:
                box.label(text=line)
            if job.active:
                box.progress(factor=job.fraction, type="BAR", text=f"{int(round(100 * job.fraction))}%")
                label_wrapped(box, context, job.status_line())
            else:
                icon = {"done": "CHECKMARK", "cancelled": "X"}.get(job.state, "ERROR")
                if job.state == "done" and job.job_id:
                    op = head.operator("stepstone.reimport", text="", icon="IMPORT")
                    op.job = job.key
                label_wrapped(box, context, job.status_line(), icon=icon)
            if job.images:
                label_wrapped(box, context, f"images: {', '.join(job.images)}", icon="IMAGE_DATA")
        # finished jobs the backend keeps from earlier sessions (closed or crashed Blender)
        row = layout.row()
        row.operator("stepstone.list_backend_jobs", icon="FILE_REFRESH")
        known = {j.job_id for j in s.jobs}
        older = [j for j in s.backend_jobs if j.get("state") == "done" and j.get("job") not in known]
        if older:
            box = layout.box()
            box.label(text="Stored on the backend:")
            for info in older[-8:][::-1]:
                params = info.get("params") or {}
                text = params.get("prompt") or params.get("style") or info.get("job", "")
                lines = textfit.wrap(f"{info.get('workflow', '?')}: {text}", _width(context) - 4) or [""]
                r = box.row()
                r.label(text=lines[0])
                op = r.operator("stepstone.reimport", text="", icon="IMPORT")
                op.job = info.get("job", "")
                for line in lines[1:]:
                    box.label(text=line)


def _width(context) -> int:
    """Characters of the UI font that fit a label of this panel (from the region's width and the UI scale)."""
    region = getattr(context, "region", None)
    width = getattr(region, "width", 0) or 300
    prefs = getattr(context, "preferences", None)
    scale = getattr(getattr(prefs, "system", None), "ui_scale", 1.0) or 1.0
    return textfit.chars_per_line(width, scale)


def label_wrapped(layout, context, text: str, icon: str = "NONE") -> None:
    """``text`` as labels wrapped to the panel's width: the whole message, never cut."""
    col = layout.column(align=True)
    for i, line in enumerate(textfit.wrap(text, _width(context))):
        if icon != "NONE":
            col.label(text=line, icon=icon if i == 0 else "BLANK1")
        else:
            col.label(text=line)


def _duration(seconds, measured: bool, gpu: bool) -> str:
    if seconds is None:
        return "" if gpu else "; long on a CPU (tens of minutes to hours)"
    seconds = float(seconds)
    text = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f"; about {text} " + ("(measured on this backend)" if measured else "(estimated)")


def preset_ui(layout, context, st, prop: str, workflow: str) -> None:
    """The preset buttons and what the chosen one means on the connected backend: memory, time, and whether it
    fits (a preset that does not is refused by the backend; the button says why)."""
    layout.prop(st, prop, expand=True)
    s = _session.get()
    info = s.preset_info(workflow)
    if not info:
        return
    chosen = getattr(st, prop)
    name = info.get("default", "standard") if chosen == "auto" else chosen
    p = (info.get("presets") or {}).get(name) or {}
    gpu = str(s.welcome.get("device", "")).startswith("cuda")
    head = f"Auto = {name.capitalize()} here" if chosen == "auto" else name.capitalize()
    text = f"{head}: about {p.get('peak_gib', '?')} GiB peak" + _duration(p.get("seconds"), bool(p.get("measured")),
                                                                         gpu)
    ok = p.get("fits", True)
    if not ok:
        text += f". It does not fit this backend's {(s.welcome.get('presets') or {}).get('memory_gib', '?')} GiB: "
        text += f"choose {str(info.get('default', 'draft')).capitalize()}."
    label_wrapped(layout, context, text, icon="INFO" if ok else "ERROR")


classes = (STEPSTONE_PT_status, STEPSTONE_PT_generate, STEPSTONE_PT_stylize, STEPSTONE_PT_gallery, STEPSTONE_PT_image,
           STEPSTONE_PT_jobs)
