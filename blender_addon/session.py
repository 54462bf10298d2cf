"""The add-on's live state: the backend client, the job list and the stream of meshes into the scene.

One :class:`Session` exists while the add-on is enabled. :meth:`Session.tick` is the poll function: a
``bpy.app.timers`` callback (tests call it directly, timers do not fire in background mode) that drains the
socket with ``poll(0)`` within a time budget, applies events to the job list, advances mesh builds and returns
at once. Network faults become a status line and job messages, never an exception.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Any, Optional

import bpy
import numpy as np

from .jobs import FINISHED_STATES, JobRecord, Placement, grid_offset
from .local_backend import LocalBackend
from .meshbuild import UV_MAP, MeshUpdateItem, StreamQueue
from . import scene, textfit

log = logging.getLogger("stepstone.addon")

TICK_BUDGET_S = 0.02  # work per tick (receiving + building); the rest of the frame belongs to Blender
FAST_INTERVAL_S = 0.02
IDLE_INTERVAL_S = 0.25
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SUBMIT_ACK_TIMEOUT_S = 20.0  # a request not acknowledged by then is looked up in the backend's job list
SUBMIT_LOST_S = 120.0  # ...and counted as lost when it is still not in that list after this long
RECONCILE_EVERY_S = 10.0


class ConnectError(Exception):
    """Connecting is not possible with the current settings; the message says what to change."""


def _shared():
    """Import the wire package lazily, so a missing pyzmq is a status line and not a failed registration."""
    from . import _shared as s

    return s


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOOPBACK_HOSTS


class Session:
    """Backend connection + jobs + streaming; see the module docstring."""

    def __init__(self) -> None:
        self.client: Any = None
        self.jobs: list[JobRecord] = []
        self.notices: deque[str] = deque(maxlen=8)
        self.last_error = ""
        self.stream = StreamQueue(self._apply_mesh, self._mesh_failed, current=self._current_mesh)
        self.local = LocalBackend()
        self.longest_tick_s = 0.0
        self.ticks = 0
        self.backend_jobs: list[dict] = []  # last answer to list_jobs
        self._pending_local_connect = False
        self._ui_dirty = False
        self.backend_id_seen: Optional[str] = None  # survives client re-creation: restart detection
        self.lost_reason = ""  # why the last connection dropped (kept while reconnecting)
        self._local_exit_reported = False
        self.restarts = 0
        self._last_reconcile = 0.0
        self.file_token = "file-0"  # changes when another .blend is loaded or File > New (load_pre handler)
        self._files = 0
        self.undo_pushes = 0  # undo steps pushed for arrived results (tests)

    # ---------------------------------------------------------------------------------------------- status
    @property
    def state(self) -> str:
        if self.client is None:
            return "disconnected"
        return self.client.state

    @property
    def reason(self) -> str:
        if self.client is None:
            return self.last_error or "not connected"
        if self.client.state == "connecting" and self.lost_reason:
            return f"reconnecting; connection lost: {self.lost_reason}"
        if self.client.state == "disconnected" and self.lost_reason and self.client.reason != self.lost_reason:
            return f"{self.lost_reason}; retrying: {self.client.reason}"
        return self.client.reason or ""

    @property
    def welcome(self) -> dict:
        return (self.client.welcome if self.client is not None else None) or {}

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def capabilities(self) -> dict:
        return self.welcome.get("capabilities") or {}

    def workflow_available(self, workflow: str) -> tuple[bool, str]:
        """Whether the connected backend's profile can run ``workflow``, and why not."""
        if not self.connected:
            return False, f"not connected to a backend ({self.reason})" if self.reason else "not connected"
        caps = self.capabilities()
        if workflow not in caps:
            return False, f"the backend (profile {self.welcome.get('profile', '?')}) has no {workflow!r} workflow"
        c = caps[workflow]
        if not c.get("available", False):
            return False, c.get("reason") or f"{workflow} is not available with this profile"
        return True, ""

    def workflow_route(self, workflow: str) -> str:
        """The route the backend's profile takes for ``workflow`` (e.g. "Shap-E shape prior, then Dream3D ..."), or
        "" when the backend does not say."""
        return str((self.capabilities().get(workflow) or {}).get("route") or "")

    def preset_info(self, workflow: str) -> dict:
        """The backend's presets for ``workflow`` (default, and per preset memory / time / fits), or {}."""
        return ((self.welcome.get("presets") or {}).get(workflow)) or {}

    def preset_available(self, workflow: str, preset: str) -> tuple[bool, str]:
        """Whether ``preset`` ("auto" always is) fits the connected backend's memory, and why not."""
        info = self.preset_info(workflow)
        p = (info.get("presets") or {}).get(preset)
        if preset == "auto" or p is None or p.get("fits", True):
            return True, ""
        mem = (self.welcome.get("presets") or {}).get("memory_gib", "?")
        return False, (f"the {preset.capitalize()} preset needs about {p.get('peak_gib')} GiB, more than this "
                       f"backend's {mem} GiB; choose {str(info.get('default', 'draft')).capitalize()} or Auto")

    def option_available(self, workflow: str, option: str, value: str) -> tuple[bool, str]:
        opts = (self.capabilities().get(workflow) or {}).get("options") or {}
        entry = (opts.get(option) or {}).get(value)
        if entry is None:
            return True, ""
        return bool(entry.get("available", False)), entry.get("reason", "")

    def notice(self, text: str) -> None:
        log.info("%s", text)
        self.notices.appendleft(time.strftime("%H:%M:%S ") + text)
        self._ui_dirty = True

    # ---------------------------------------------------------------------------------------------- connect
    def connect(self, prefs: Any = None) -> None:
        """Connect with the preferences' settings (``prefs`` None: the default connection file).

        Raises :class:`ConnectError` with an actionable message; the connection itself completes in :meth:`tick`.
        """
        try:
            s = _shared()
        except ImportError as exc:
            raise ConnectError(f"pyzmq is not available in this Blender ({exc}); reinstall the extension") from None
        heartbeat = float(getattr(prefs, "heartbeat_s", 1.0) or 1.0)
        timeout = float(getattr(prefs, "timeout_s", 5.0) or 5.0)
        kw = dict(heartbeat_s=heartbeat, timeout_s=timeout, name="blender")
        mode = getattr(prefs, "connection_mode", "AUTO")
        self.disconnect(quiet=True)
        try:
            if mode == "MANUAL":
                address = (prefs.address or "").strip()
                if not address.startswith("tcp://"):
                    raise ConnectError(f"address {address!r} must look like tcp://HOST:PORT")
                try:
                    key = bytes.fromhex((prefs.key or "").strip())
                except ValueError:
                    raise ConnectError("the key must be the hex string from the backend's connection file") from None
                if not key:
                    raise ConnectError("set the key (hex, from the backend's connection file)")
                curve = (prefs.curve_server_key or "").strip().encode("ascii") or None
                if not is_loopback(address):
                    if not bpy.app.online_access:
                        raise ConnectError(
                            "connecting to a remote backend needs online access: enable Preferences > System > "
                            "Network > Allow Online Access"
                        )
                    if curve is None:
                        raise ConnectError(
                            f"{address} is not on this machine: set the backend's CurveZMQ server key so the "
                            "connection is encrypted"
                        )
                self.client = s.client.Client(address, key, curve_server_key=curve, **kw)
            else:
                path = None
                if self.local.running:
                    path = str(self.local.connection_file)
                elif getattr(prefs, "connection_file", ""):
                    path = bpy.path.abspath(prefs.connection_file)
                info = s.connection.read_connection_file(path)
                if not is_loopback(info["address"]):
                    if not bpy.app.online_access:
                        raise ConnectError(f"the connection file names a remote backend ({info['address']}) and "
                                           "Blender's online access is off (Preferences > System > Network)")
                    if info.get("curve_server_key") is None:
                        raise ConnectError(f"the connection file names a remote backend ({info['address']}) "
                                           "without a CurveZMQ server key; refusing an unencrypted connection")
                self.client = s.client.Client.from_connection_file(path, **kw)
            self.client.connect()
        except s.connection.ConnectionFileError as exc:
            self.client = None
            self.last_error = str(exc)
            raise ConnectError(str(exc)) from None
        except ConnectError as exc:
            self.client = None
            self.last_error = str(exc)
            raise
        except Exception as exc:  # zmq errors (bad address...) are settings problems for the artist
            self.client = None
            self.last_error = f"cannot connect: {exc}"
            raise ConnectError(self.last_error) from None
        self.last_error = ""
        self._ui_dirty = True

    def disconnect(self, quiet: bool = False) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # pragma: no cover - closing must never raise into the UI
                log.exception("closing the client")
            self.client = None
            if not quiet:
                self.last_error = "disconnected by request"
                self.notice("disconnected")
        self._ui_dirty = True

    # ---------------------------------------------------------------------------------------------- local backend
    def start_local(self, prefs: Any) -> None:
        self.local.start(bpy.path.abspath(prefs.python_path), profile=prefs.profile, device=prefs.device,
                         port=prefs.port, backend_dir=bpy.path.abspath(prefs.backend_dir),
                         heartbeat_s=min(float(prefs.heartbeat_s), float(prefs.timeout_s) / 3))
        self._pending_local_connect = True
        self.notice(f"starting local backend ({prefs.profile}, {prefs.device})")
        self._prefs_for_local = prefs

    def stop_local(self) -> None:
        if self.local.proc is None:
            return
        if self.client is not None and self.client.connection_file is not None and \
                str(self.client.connection_file) == str(self.local.connection_file):
            self.disconnect(quiet=True)
        self.local.stop()
        self._pending_local_connect = False
        self.notice("local backend stopped")

    # ---------------------------------------------------------------------------------------------- requests
    def submit(self, workflow: str, params: dict, meshes: Optional[list[dict]], label: str,
               placement: Placement) -> JobRecord:
        """Send a job; raises :class:`ConnectError` when not connected (the operator reports it)."""
        ok, why = self.workflow_available(workflow)
        if not ok:
            raise ConnectError(why)
        try:
            rid = self.client.submit(workflow, params, meshes)
        except _shared().client.ClientError as exc:
            raise ConnectError(str(exc)) from None
        job = JobRecord(request_id=rid, workflow=workflow, label=label, placement=placement, params=dict(params),
                        file_token=self.file_token)
        self.jobs.insert(0, job)
        self._ui_dirty = True
        return job

    def find(self, key: str) -> Optional[JobRecord]:
        for j in self.jobs:
            if j.job_id == key or j.request_id == key:
                return j
        return None

    def cancel(self, key: str) -> None:
        job = self.find(key)
        if job is None:
            raise ConnectError(f"no job {key}")
        if not job.active:
            return
        if job.job_id is None:
            raise ConnectError("the backend has not accepted this job yet; try again in a moment")
        try:
            self.client.cancel(job.job_id)
        except (AttributeError, _shared().client.ClientError) as exc:
            raise ConnectError(f"cannot cancel: {exc}") from None
        job.message = "cancelling..."
        self._ui_dirty = True

    def reimport(self, key: str) -> None:
        """Fetch a finished job's stored results again; they arrive as new objects in a new collection."""
        job = self.find(key)
        if job is None:  # a job of an earlier Blender session, from the backend's list
            info = next((j for j in self.backend_jobs if j.get("job") == key), {})
            prompt = (info.get("params") or {}).get("prompt") or (info.get("params") or {}).get("style") or ""
            job = JobRecord(request_id=key, workflow=str(info.get("workflow", "?")), job_id=key, state="done",
                            label=(textfit.fit_bytes(prompt, 48) if prompt else f"job {key[-8:]}"), placement=Placement(collection="Stepstone"))
            self.jobs.insert(0, job)
        if job.job_id is None:
            raise ConnectError("this job never reached the backend; nothing to re-import")
        if not self.connected:
            raise ConnectError(f"not connected to a backend ({self.reason})")
        try:
            self.client.fetch(job.job_id)
        except _shared().client.ClientError as exc:
            raise ConnectError(str(exc)) from None
        job.placement = dataclasses.replace(job.placement, replace_source=False)  # re-import: new objects
        job.file_token = self.file_token  # into the file open now
        job.detached = False
        job.slots = {}
        job.slot_order = []
        job.finals = set()
        job.collection_actual = None
        job.message = "re-importing..."
        self._ui_dirty = True

    def refresh_backend_jobs(self) -> None:
        if self.connected:
            try:
                self.client.list_jobs()
            except _shared().client.ClientError as exc:
                log.warning("list_jobs: %s", exc)

    def clear_finished(self) -> None:
        self.jobs = [j for j in self.jobs if j.active or self.stream.pending_for(j.key)]
        self._ui_dirty = True

    # ---------------------------------------------------------------------------------------------- the tick
    def tick(self, budget_s: float = TICK_BUDGET_S) -> float:
        """Poll once: receive, update jobs, build meshes for at most ``budget_s``; returns the next interval."""
        t0 = time.perf_counter()
        deadline = t0 + budget_s
        try:
            self._maybe_connect_local()
            if self.client is not None:
                msgs = self.client.poll(timeout_ms=0, time_budget_s=budget_s * 0.5)
                for msg in msgs:
                    self._dispatch(msg)
            self.stream.work(deadline)
            self._cleanup_finished()
            self._maybe_reconcile()
        except Exception:  # never let the timer die or an exception reach the artist
            log.exception("Stepstone poll failed")
        dt = time.perf_counter() - t0
        self.ticks += 1
        self.longest_tick_s = max(self.longest_tick_s, dt)
        if self._ui_dirty:
            self._ui_dirty = False
            _redraw()
        busy = self.stream.busy or any(j.active for j in self.jobs) or self.state == "connecting"
        return FAST_INTERVAL_S if busy else IDLE_INTERVAL_S

    def _maybe_reconcile(self) -> None:
        """Ask for the job list when a request waits too long for `accepted` (it may have been lost)."""
        if not self.connected:
            return
        now = time.time()
        if now - self._last_reconcile < RECONCILE_EVERY_S:
            return
        if any(j.state == "submitting" and now - j.submitted > SUBMIT_ACK_TIMEOUT_S for j in self.jobs):
            self._last_reconcile = now
            self.refresh_backend_jobs()

    def _maybe_connect_local(self) -> None:
        if not self._pending_local_connect:
            return
        if self.local.ready():
            self._pending_local_connect = False
            try:
                self.connect(getattr(self, "_prefs_for_local", None))
                self.notice("local backend started; connecting")
            except ConnectError as exc:
                self.notice(f"local backend started but connecting failed: {exc}")
        elif not self.local.running:
            self._pending_local_connect = False
            self.last_error = f"local backend {self.local.status()}; see its log in the preferences"
            self.notice(self.last_error)

    # ---------------------------------------------------------------------------------------------- events
    def _dispatch(self, msg: Any) -> None:
        self._ui_dirty = True
        kind = msg.kind
        f = msg.fields
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            log.debug("ignoring %s message", kind)
            return
        handler(msg, f)

    def _job_for(self, f: dict) -> Optional[JobRecord]:
        key = f.get("job") or f.get("ref")
        return self.find(key) if key else None

    def _on_welcome(self, msg, f) -> None:
        new = str(f.get("backend_id") or "")
        if self.backend_id_seen and new and new != self.backend_id_seen:
            self._backend_restarted(self.backend_id_seen, new)
        self.backend_id_seen = new or self.backend_id_seen
        self.lost_reason = ""
        self.notice(f"connected to backend {new[:8]} "
                    f"(profile {f.get('profile', '?')}, device {f.get('device', '?')})")
        # after a reconnect to the same backend, events may have been missed: ask where our jobs stand
        if any(j.active for j in self.jobs):
            self.refresh_backend_jobs()

    def _on_disconnected(self, msg, f) -> None:
        reason = f.get("reason", "connection lost")
        if self.local.proc is not None and not self.local.running and self.local.connection_file.is_file() \
                and self.client is not None and str(self.client.connection_file) == str(self.local.connection_file):
            reason += f" (the local backend {self.local.status()}; see its log in the preferences)"
        self.lost_reason = reason
        self.notice(f"disconnected: {reason}")
        for j in self.jobs:
            if j.active:
                j.message = "backend unreachable; waiting for it to come back"

    def _on_backend_restarted(self, msg, f) -> None:
        old, new = str(f.get("old") or ""), str(f.get("new") or "")
        if new and new != self.backend_id_seen:
            self._backend_restarted(old, new)
            self.backend_id_seen = new

    def _backend_restarted(self, old: str, new: str) -> None:
        """A new backend answers (Jupyter-style restart detection by id): jobs of the old one are gone."""
        self.restarts += 1
        self.notice(f"the backend restarted (id {old[:8]} -> {new[:8]}); reconnected")
        for j in self.jobs:
            if j.active:
                j.finish("lost", "the backend restarted while this job ran; run it again")
                self.stream.drop_job(j.key)
                j.cleanup_pending = True

    def _on_accepted(self, msg, f) -> None:
        job = self.find(f.get("ref", ""))
        if job is None:
            return
        job.job_id = f.get("job")
        if f.get("preset"):
            job.preset = str(f.get("preset"))
        if job.state == "submitting":
            job.state = "queued"
        pos = f.get("position")
        if pos:
            job.message = f"position {pos} in the queue"

    def _on_rejected(self, msg, f) -> None:
        job = self.find(f.get("ref", ""))
        text = f.get("message") or f.get("code") or "rejected"
        if job is not None:
            job.finish("failed", f"rejected: {text}")
        self.notice(f"request rejected: {text}")

    def _on_progress(self, msg, f) -> None:
        job = self._job_for(f)
        if job is None or not job.active:
            return
        job.state = "running"
        job.stage = str(f.get("stage", ""))
        job.step = int(f.get("step", 0) or 0)
        job.total = int(f.get("total", 0) or 0)
        job.message = str(f.get("message", "") or "")

    def _on_mesh(self, msg, f) -> None:
        job = self._job_for(f)
        if job is None or job.state in ("cancelled", "lost") or job.detached:
            return
        a = msg.arrays
        job.meshes_received += 1
        self.stream.push(MeshUpdateItem(
            job=job.key, slot=str(f.get("name") or "result"), final=bool(f.get("final")), seq=int(f.get("seq", 0)),
            info=dict(f.get("info") or {}), vertices=a["vertices"], faces=a["faces"], colors=a.get("colors"),
            replay=bool(f.get("replay")), uvs=a.get("uvs"),
        ))

    def _on_image(self, msg, f) -> None:
        job = self._job_for(f)
        png = msg.arrays.get("png")
        if png is None:
            return
        label = str(f.get("label") or "concept")
        if job is not None and job.detached:
            return
        name = textfit.fit_bytes(f"{job.label} {label}" if job is not None else label)
        try:
            img = scene.image_from_png(name, np.asarray(png, dtype=np.uint8).tobytes())
        except ValueError as exc:
            log.warning("image %s: %s", label, exc)
            return
        if job is not None:
            job.images.append(img.name)
            job.textures[label] = img.name
            if label == "baked texture":
                job.baked_image = img.name

    def _on_done(self, msg, f) -> None:
        job = self._job_for(f)
        if job is None:
            return
        job.results = [str(r) for r in (f.get("results") or [])]
        job.finish("done")
        job.message = ""
        if job.detached:
            job.message = "finished after the file changed; use Re-import to bring its results into this file"
        el = f.get("elapsed_s")
        self.notice(f"{job.label}: done" + (f" in {el:.1f} s" if isinstance(el, (int, float)) else ""))

    def _on_failed(self, msg, f) -> None:
        job = self._job_for(f)
        text = f.get("message") or f.get("code") or "failed"
        if job is not None:
            job.finish("failed", text)
            job.cleanup_pending = True  # its unfinished previews go once the meshes already sent are applied
            self.notice(f"{job.label}: failed: {text}")

    def _on_cancelled(self, msg, f) -> None:
        job = self._job_for(f)
        if job is not None:
            job.finish("cancelled", f.get("reason") or "cancelled")
            self.stream.drop_job(job.key)
            job.cleanup_pending = True

    def _on_jobs(self, msg, f) -> None:
        """Reconcile active jobs with the backend's list (after a reconnect events may have been missed)."""
        self.backend_jobs = list(f.get("jobs") or [])
        by_id = {str(j.get("job") or j.get("id")): j for j in self.backend_jobs if isinstance(j, dict)}
        by_ref = {str(j.get("ref")): j for j in self.backend_jobs if isinstance(j, dict) and j.get("ref")}
        for job in self.jobs:
            if not job.active:
                continue
            if job.job_id is None:
                info = by_ref.get(job.request_id)
                if info is None:
                    if time.time() - job.submitted > SUBMIT_LOST_S:
                        job.finish("lost", "the backend never received this request; run it again")
                    continue
                job.job_id = str(info.get("job"))  # the `accepted` message was lost; found by its ref
                job.state = "queued"
            info = by_id.get(job.job_id)
            if info is None:
                job.finish("lost", "the backend no longer knows this job")
                continue
            state = str(info.get("state") or info.get("status") or "")
            if state == "running":
                job.state = "running"
            if state in FINISHED_STATES and state != job.state:
                job.finish(state, str(info.get("error") or info.get("message") or ""))
                if state == "done":
                    job.message = "finished while disconnected; use Re-import for its results"

    def _on_result(self, msg, f) -> None:
        job = self._job_for(f)
        if job is not None:
            job.message = ""

    def _on_error(self, msg, f) -> None:
        text = f.get("message") or f.get("code") or "error"
        job = self._job_for(f)
        if job is not None and job.active and f.get("code") != "bad_mesh":
            job.finish("failed", text)
        self.notice(f"backend error: {text}")

    # ---------------------------------------------------------------------------------------------- meshes in
    def _mesh_failed(self, item: MeshUpdateItem, message: str) -> None:
        job = self.find(item.job)
        self.notice(f"mesh {item.slot}: {message}")
        if job is not None and item.final:
            job.error = message

    def _apply_mesh(self, item: MeshUpdateItem, me: bpy.types.Mesh) -> None:
        """Put a freshly built mesh into its slot's object (made on first use); called from :meth:`tick`."""
        job = self.find(item.job)
        if job is None or job.detached or job.file_token != self.file_token or job.state in ("cancelled", "lost"):
            if me.users == 0:
                bpy.data.meshes.remove(me)
            return
        if job.placement.keep_mesh:
            if item.final and self._apply_kept_mesh(job, item, me):
                return
            if not item.final and job.placement.replace_source:  # the artist's mesh stays until the result is in
                if me.users == 0:
                    bpy.data.meshes.remove(me)
                return
        if item.final and me.uv_layers.get(UV_MAP) is not None:
            # a textured result (uv_texture, issue 16): a material with its image as Base Color on its UV map; the
            # Col colour attribute stays on the mesh
            image = bpy.data.images.get(job.textures.get(str(item.info.get("texture") or ""), ""))
            if image is not None:
                me.materials.clear()
                me.materials.append(scene.baked_material(None, image, UV_MAP))
        scene.ensure_material(me)
        obj = self._slot_object(job, item.slot)
        if obj is None:
            obj = self._new_slot_object(job, item.slot, me)
        else:
            scene.replace_mesh(obj, me)
        me.name = obj.name
        obj["stepstone_job"] = job.key
        obj["stepstone_slot"] = item.slot
        for k, v in item.info.items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                obj[f"stepstone_{k}"] = v
        if item.final:
            job.finals.add(item.slot)
            if job.placement.avoid_overlap and not (job.placement.replace_source and obj.name == job.placement.source):
                scene.move_off_others(obj, ignore=set(job.slots.values()) | {job.placement.source or ""})
            self._push_undo(f"Stepstone: {job.label}" + ("" if item.slot == "result" else f" {item.slot}"))
        self._ui_dirty = True

    def _apply_kept_mesh(self, job: JobRecord, item: MeshUpdateItem, me: bpy.types.Mesh) -> bool:
        """Texture mode: the final result is the source's own mesh (polygons, UVs, materials kept) with the style
        baked onto its UV map (or a colour attribute), beside the source or in it; the preview object goes."""
        pl = job.placement
        src = bpy.data.objects.get(pl.source or "")
        if src is None or src.type != "MESH":
            self.notice(f"{job.label}: the source object is gone; the result comes as a new triangle mesh")
            return False
        preview = self._slot_object(job, item.slot)
        image = bpy.data.images.get(job.baked_image or "")
        coll = None if pl.replace_source else self._job_collection(job)
        verts = cols = None
        if image is None:  # no UV map: per-vertex colours, read back from the built mesh (the frames are freed)
            verts = np.empty(len(me.vertices) * 3, dtype=np.float32)
            me.vertices.foreach_get("co", verts)
            verts = verts.reshape(-1, 3)
            attr = me.color_attributes.get(scene.COLOR_ATTRIBUTE)
            if attr is not None and attr.domain == "POINT":
                buf = np.empty(len(attr.data) * 4, dtype=np.float32)
                attr.data.foreach_get("color_srgb", buf)
                cols = np.clip(buf.reshape(-1, 4)[:, :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        obj = scene.stylized_copy(src, f"{job.label}", coll, pl.offset, image, verts, cols, pl.replace_source)
        me_ptr = me.as_pointer()  # the stream may have updated the preview's own mesh in place
        if preview is not None and preview is not obj and preview is not src:
            old = preview.data
            bpy.data.objects.remove(preview)
            if old is not None and old.users == 0:
                if old.as_pointer() == me_ptr:
                    me_ptr = 0
                bpy.data.meshes.remove(old)
        if me_ptr and me.users == 0:
            bpy.data.meshes.remove(me)
        job.slots[item.slot] = obj.name
        obj["stepstone_job"] = job.key
        obj["stepstone_slot"] = item.slot
        for k, v in item.info.items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                obj[f"stepstone_{k}"] = v
        job.finals.add(item.slot)
        if not pl.replace_source:
            scene.move_off_others(obj, ignore={src.name})
        self._push_undo(f"Stepstone: {job.label}")
        self._ui_dirty = True
        return True

    def _push_undo(self, message: str) -> None:
        """An undo step for a result that arrived from the timer: Ctrl-Z takes that result back out, and the
        operator's own step (bl_options UNDO) is the state before the request."""
        try:
            if bpy.ops.ed.undo_push.poll():
                bpy.ops.ed.undo_push(message=textfit.fit_bytes(message, 60))
                self.undo_pushes += 1
        except Exception as exc:  # no undo stack (background mode without a window): nothing to push
            log.debug("undo push: %s", exc)

    # ---------------------------------------------------------------------------------------------- clean-up
    def _cleanup_finished(self) -> None:
        """Cancelled, failed or lost jobs: their previews that never became a final result are removed (and a
        replaced source gets its own mesh back), once no mesh of the job is still on its way."""
        for job in self.jobs:
            if not job.cleanup_pending or self.stream.pending_for(job.key):
                continue
            job.cleanup_pending = False
            if job.detached or job.file_token != self.file_token:
                continue
            removed = self.discard_partial(job)
            if removed:
                self.notice(f"{job.label}: removed {removed} unfinished preview{'s' if removed != 1 else ''}")

    def discard_partial(self, job: JobRecord) -> int:
        removed = 0
        for slot, name in list(job.slots.items()):
            if slot in job.finals:
                continue
            obj = bpy.data.objects.get(name)
            job.slots.pop(slot, None)
            if obj is None or obj.type != "MESH":
                continue
            if job.placement.replace_source and obj.name == job.placement.source:
                orig = bpy.data.meshes.get(job.source_mesh or "")
                if orig is not None:
                    scene.replace_mesh(obj, orig)
                    orig.use_fake_user = False
                removed += 1
                continue
            me = obj.data
            bpy.data.objects.remove(obj)
            if me is not None and me.users == 0 and me.get("stepstone"):
                bpy.data.meshes.remove(me)
            removed += 1
        coll = bpy.data.collections.get(job.collection_actual or "")
        if coll is not None and job.placement.matrix_world is None and len(coll.objects) == 0 \
                and len(coll.children) == 0:
            bpy.data.collections.remove(coll)
            job.collection_actual = None
        return removed

    def on_file_change(self) -> None:
        """Another .blend was loaded (or File > New): running jobs never write into it. Their objects belonged to
        the old file; they stay on the backend and Re-import brings them into this one."""
        self._files += 1
        self.file_token = f"file-{self._files}"
        for job in self.jobs:
            job.slots = {}
            job.slot_order = []
            job.collection_actual = None
            job.cleanup_pending = False
            self.stream.drop_job(job.key)
            if job.active:
                job.detached = True
                job.message = "the file changed; its results stay on the backend (Re-import when it is done)"
        self._ui_dirty = True

    def _current_mesh(self, item: MeshUpdateItem) -> Optional[bpy.types.Mesh]:
        """The mesh now shown for ``item``'s slot (the stream may update it in place when the size matches)."""
        job = self.find(item.job)
        obj = self._slot_object(job, item.slot) if job is not None else None
        return obj.data if obj is not None else None

    def _slot_object(self, job: JobRecord, slot: str) -> Optional[bpy.types.Object]:
        name = job.slots.get(slot)
        obj = bpy.data.objects.get(name) if name else None
        if obj is not None and obj.type == "MESH":
            return obj
        return None

    def _new_slot_object(self, job: JobRecord, slot: str, me: bpy.types.Mesh) -> bpy.types.Object:
        pl = job.placement
        if pl.replace_source and pl.source and bpy.data.objects.get(pl.source) is not None:
            obj = bpy.data.objects[pl.source]
            old = obj.data
            if old is not None and not old.get("stepstone"):
                old.use_fake_user = True  # the artist's original mesh stays in the file, recoverable
                job.source_mesh = old.name
            scene.replace_mesh(obj, me)
            job.slots[slot] = obj.name
            return obj
        coll = self._job_collection(job)
        base = job.label if slot == "result" else f"{job.label} {slot}"
        obj = bpy.data.objects.new(textfit.fit_bytes(base), me)
        coll.objects.link(obj)
        if pl.matrix_world is not None:
            from mathutils import Matrix

            m = pl.matrix_world
            obj.matrix_world = Matrix([m[0:4], m[4:8], m[8:12], m[12:16]])
            obj.location = tuple(a + b for a, b in zip(obj.matrix_world.translation, pl.offset))
        else:
            idx = job.grid_index(slot)
            off = grid_offset(idx, pl.spacing, pl.columns)
            obj.location = tuple(o + d for o, d in zip(pl.origin, off))
        job.slots[slot] = obj.name
        return obj

    def _job_collection(self, job: JobRecord) -> bpy.types.Collection:
        name = job.collection_actual
        coll = bpy.data.collections.get(name) if name else None
        if coll is None:
            if job.placement.matrix_world is not None:
                coll = scene.get_or_new_collection(job.placement.collection)
            else:
                coll = scene.new_collection(job.placement.collection)
            job.collection_actual = coll.name
        return coll

    # ---------------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        self.stream.close()
        self.disconnect(quiet=True)
        if self.local.running:
            self.local.stop()


def _redraw() -> None:
    """Ask the 3D views and preferences to redraw (nothing to do in background mode)."""
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for win in wm.windows:
        for area in win.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES", "IMAGE_EDITOR"):
                area.tag_redraw()


_SESSION: Optional[Session] = None


def get() -> Session:
    """The add-on's session (created at registration)."""
    global _SESSION
    if _SESSION is None:
        _SESSION = Session()
    return _SESSION


def timer() -> Optional[float]:
    """The ``bpy.app.timers`` callback."""
    if _SESSION is None:
        return None
    return _SESSION.tick()


def shutdown() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION.close()
        _SESSION = None
