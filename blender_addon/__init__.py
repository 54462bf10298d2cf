"""Stepstone for Blender: text to 3D shapes, stylization and theme galleries from a local GPU backend.

The add-on never imports torch: it talks to the backend over ZeroMQ (``shared/``, bundled with pyzmq) and streams
meshes into the scene from a ``bpy.app.timers`` poll function (:func:`session.timer`). Submodules are imported in
:func:`register` so that the pure-Python parts (``meshprep``, ``jobs``, ``local_backend``) import without Blender.
"""

from __future__ import annotations

import logging

log = logging.getLogger("stepstone.addon")

_registered: list = []


def _on_load_pre(*_args) -> None:
    """Another .blend is about to load (or File > New): running jobs must not write into it."""
    from . import session

    if session._SESSION is not None:
        session._SESSION.on_file_change()


def _persistent(fn):
    import bpy

    return bpy.app.handlers.persistent(fn)


def _modules():
    from . import operators, panels, preferences, properties

    return preferences, properties, operators, panels


def register() -> None:
    import bpy

    from . import session

    preferences, properties, operators, panels = _modules()
    for mod in (preferences, properties, operators, panels):
        for cls in mod.classes:
            bpy.utils.register_class(cls)
            _registered.append(cls)
    properties.register_props()
    session.get()
    handler = _persistent(_on_load_pre)
    if not any(getattr(h, "__name__", "") == "_on_load_pre" for h in bpy.app.handlers.load_pre):
        bpy.app.handlers.load_pre.append(handler)
    if not bpy.app.timers.is_registered(session.timer):
        bpy.app.timers.register(session.timer, first_interval=0.1, persistent=True)
    prefs = preferences.get_prefs()
    if prefs is not None and prefs.auto_connect and prefs.connection_mode == "AUTO":
        try:
            session.get().connect(prefs)
        except session.ConnectError as exc:  # no backend running yet: the status panel says so
            log.info("not connecting at start: %s", exc)


def unregister() -> None:
    import bpy

    from . import session

    if bpy.app.timers.is_registered(session.timer):
        bpy.app.timers.unregister(session.timer)
    for h in [h for h in bpy.app.handlers.load_pre if getattr(h, "__name__", "") == "_on_load_pre"]:
        bpy.app.handlers.load_pre.remove(h)
    session.shutdown()
    _, properties, _, _ = _modules()
    properties.unregister_props()
    while _registered:
        bpy.utils.unregister_class(_registered.pop())
