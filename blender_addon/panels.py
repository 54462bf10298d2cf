"""The sidebar tab "Stepstone" (N panel of the 3D view): status, generate, stylize, gallery, jobs."""

from __future__ import annotations

import bpy

from . import session as _session

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
            col.label(text=f"Connected: {str(w.get('backend_id', ''))[:8]}", icon="CHECKMARK")
            col.label(text=f"Profile {w.get('profile', '?')} on {w.get('device', '?')}")
        elif s.state == "connecting":
            col.label(text="Connecting...", icon="SORTTIME")
            if s.reason:
                col.label(text=s.reason[:80])
        else:
            col.label(text="Not connected", icon="ERROR")
            if s.reason:
                for chunk in _wrap(s.reason, 48):
                    col.label(text=chunk)
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
                if not ok and why:
                    box.label(text=why[:80])
        for n in list(s.notices)[:3]:
            layout.label(text=n[:90])


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
        layout.operator("stepstone.gallery", icon="GROUP")


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
            head.label(text=f"{job.workflow}: {job.label}"[:60])
            if job.active:
                op = head.operator("stepstone.cancel", text="", icon="CANCEL")
                op.job = job.key
                box.progress(factor=job.fraction, type="BAR", text=job.status_line()[:70])
            else:
                icon = {"done": "CHECKMARK", "cancelled": "X"}.get(job.state, "ERROR")
                r = box.row()
                r.label(text=job.status_line()[:70], icon=icon)
                if job.state == "done" and job.job_id:
                    op = r.operator("stepstone.reimport", text="", icon="IMPORT")
                    op.job = job.key
            if job.images:
                box.label(text=f"images: {', '.join(job.images)[:60]}", icon="IMAGE_DATA")
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
                r = box.row()
                r.label(text=f"{info.get('workflow', '?')}: {str(text)[:40]}")
                op = r.operator("stepstone.reimport", text="", icon="IMPORT")
                op.job = info.get("job", "")


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines[:4]


classes = (STEPSTONE_PT_status, STEPSTONE_PT_generate, STEPSTONE_PT_stylize, STEPSTONE_PT_gallery, STEPSTONE_PT_jobs)
