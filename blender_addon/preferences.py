"""Add-on preferences: how to reach the backend, and a local backend Blender can start and stop."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import session as _session

PROFILES = [
    ("starter", "Starter", "Small models trained by the project; runs on a laptop CPU, no download"),
    ("pretrained", "Pretrained", "Public weights (CLIP, Stable Diffusion...); needs a CUDA GPU and a one-time download"),
    ("tiny", "Tiny", "Random tiny models, for testing the installation only"),
    ("tiny-pretrained", "Tiny pretrained", "The pretrained profile's routes (Shap-E) with random tiny models, "
                                           "for testing only"),
]
DEVICES = [
    ("auto", "Auto", "CUDA when available, otherwise CPU"),
    ("cuda", "CUDA", "NVIDIA GPU"),
    ("cpu", "CPU", "Processor only (slow for the pretrained profile)"),
]


def addon_key() -> str:
    """The add-on's module name as Blender knows it (``bl_ext.<repo>.stepstone`` when installed)."""
    return __package__


def get_prefs():
    """The preferences of this add-on, or ``None`` when it is not enabled (e.g. during unregister)."""
    addon = bpy.context.preferences.addons.get(addon_key())
    return addon.preferences if addon is not None else None


class STEPSTONE_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    connection_mode: EnumProperty(
        name="Backend",
        items=[
            ("AUTO", "Local connection file", "Find the backend on this machine through its connection file"),
            ("MANUAL", "Address and key", "Give the backend's address and key (remote needs CurveZMQ keys)"),
        ],
        default="AUTO",
    )
    connection_file: StringProperty(
        name="Connection file", subtype="FILE_PATH", default="",
        description="Leave empty for the default per-user location the backend writes to",
    )
    address: StringProperty(name="Address", default="tcp://127.0.0.1:5555",
                            description="tcp://HOST:PORT of the backend")
    key: StringProperty(name="Key", subtype="PASSWORD", default="",
                        description="The hex key from the backend's connection file")
    curve_server_key: StringProperty(
        name="CurveZMQ server key", subtype="PASSWORD", default="",
        description="The backend's public CurveZMQ key (Z85); required for a backend on another machine",
    )
    auto_connect: BoolProperty(name="Connect on start", default=True,
                               description="Connect when Blender starts if a local backend is running")
    heartbeat_s: FloatProperty(name="Heartbeat (s)", default=1.0, min=0.05, max=30.0)
    timeout_s: FloatProperty(name="Timeout (s)", default=5.0, min=0.2, max=120.0,
                             description="Silence after which the backend counts as gone")
    max_faces: IntProperty(name="Face limit", default=500_000, min=1_000, max=2_000_000,
                           description="Largest selected mesh (triangles after modifiers) sent to the backend")

    python_path: StringProperty(
        name="Python interpreter", subtype="FILE_PATH", default="",
        description="Python of the environment where the backend is installed (e.g. <stepstone>/.venv/bin/python)",
    )
    backend_dir: StringProperty(
        name="Backend folder", subtype="DIR_PATH", default="",
        description="Folder that contains backend/ (guessed from the interpreter path when empty)",
    )
    profile: EnumProperty(name="Profile", items=PROFILES, default="starter")
    device: EnumProperty(name="Device", items=DEVICES, default="auto")
    port: IntProperty(name="Port", default=0, min=0, max=65535, description="0: any free port")

    def draw(self, context):
        layout = self.layout
        s = _session.get()
        box = layout.box()
        box.label(text="Connection", icon="LINKED")
        box.prop(self, "connection_mode", expand=True)
        if self.connection_mode == "AUTO":
            box.prop(self, "connection_file")
        else:
            box.prop(self, "address")
            box.prop(self, "key")
            box.prop(self, "curve_server_key")
            if not _session.is_loopback(self.address) and not bpy.app.online_access:
                box.label(text="Remote backends need Allow Online Access (System > Network)", icon="ERROR")
        row = box.row()
        row.prop(self, "auto_connect")
        row.prop(self, "max_faces")
        row = box.row()
        row.prop(self, "heartbeat_s")
        row.prop(self, "timeout_s")
        row = box.row()
        row.label(text=f"Status: {s.state}" + (f" - {s.reason}" if s.reason and s.state != 'connected' else ""))
        row.operator("stepstone.connect", icon="PLUGIN")
        row.operator("stepstone.disconnect", icon="UNLINKED")

        box = layout.box()
        box.label(text="Local backend", icon="CONSOLE")
        box.prop(self, "python_path")
        box.prop(self, "backend_dir")
        row = box.row()
        row.prop(self, "profile")
        row.prop(self, "device")
        row.prop(self, "port")
        row = box.row()
        row.label(text=f"Process: {s.local.status()}")
        row.operator("stepstone.start_backend", icon="PLAY")
        row.operator("stepstone.stop_backend", icon="PAUSE")
        tail = s.local.log_tail(10)
        if tail:
            col = box.column(align=True)
            col.label(text=f"Log ({s.local.log_path}):")
            for line in tail:
                col.label(text=line[:160])


classes = (STEPSTONE_AP_preferences,)
