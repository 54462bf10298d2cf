"""Turn prepared numpy arrays into a Blender mesh datablock in small, bounded steps on the main thread.

A 1M-face mesh costs about 50 ms of ``foreach_set`` work in all (measured with Blender 5.0 on an idle core; the
face offsets, which have no raw-buffer path, take most of it), too much for one timer tick if the UI is to stay
responsive. :class:`MeshBuild` therefore splits the work into stages of at most one large copy each; :class:`StreamQueue` runs stages until a tick's time budget is spent and continues at the
next tick. Preparing the arrays (validation, edge table) happens in a worker thread (:mod:`.meshprep`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import bpy
import numpy as np

from .meshprep import MeshError, PreparedMesh, prepare_mesh

log = logging.getLogger("stepstone.addon")

COLOR_ATTRIBUTE = "Col"
UV_MAP = "UVMap"  # the UV map of a result that came with UVs (a baked texture on it)
SYNC_PREP_FACES = 20_000  # below this, preparing inline is cheaper than a thread hand-off


def can_update_in_place(me: Optional[bpy.types.Mesh], p: PreparedMesh) -> bool:
    """True when ``me`` is one of our meshes with exactly ``p``'s element counts, used by nothing else.

    All its faces are then triangles (3M corners over M faces of at least 3 corners each), so its face offsets are
    already 0, 3, 6, ... and every remaining array has a raw ``foreach_set`` path: an update of a mesh whose size
    did not change (texture stylization, fixed-topology previews) skips the one slow stage.
    """
    return (
        me is not None
        and bool(me.get("stepstone"))
        and me.users <= 1
        and not me.is_editmode
        and len(me.vertices) == p.n_vertices
        and len(me.edges) == p.n_edges
        and len(me.polygons) == p.n_faces
        and len(me.loops) == p.n_corners
    )


class MeshBuild:
    """Builds a mesh datablock from a :class:`PreparedMesh`, one stage per :meth:`step` call.

    With ``reuse`` (see :func:`can_update_in_place`) the existing datablock is overwritten instead of a new one
    being made.
    """

    def __init__(self, prepared: PreparedMesh, datablock_name: str, *, smooth: bool = True,
                 reuse: Optional[bpy.types.Mesh] = None) -> None:
        self.p = prepared
        self.name = datablock_name
        self.smooth = smooth
        self.in_place = reuse is not None and can_update_in_place(reuse, prepared)
        self.mesh: Optional[bpy.types.Mesh] = reuse if self.in_place else None
        stages: list[Callable[[], None]] = [] if self.in_place else [self._allocate, self._allocate_faces]
        stages += [self._positions, self._edges, self._corner_verts, self._corner_edges]
        if not self.in_place:
            stages.append(self._face_offsets)
        stages += [self._colors, self._uvs, self._finish]
        self._stages = stages
        self._i = 0

    @property
    def done(self) -> bool:
        return self._i >= len(self._stages)

    @property
    def next_stage(self) -> str:
        return self._stages[self._i].__name__.lstrip("_") if not self.done else ""

    def step(self) -> bool:
        """Run the next stage; True when the mesh is complete."""
        if not self.done:
            self._stages[self._i]()
            self._i += 1
        return self.done

    def run(self) -> bpy.types.Mesh:
        """All stages at once (for small meshes and for the benchmark's single-shot timing)."""
        while not self.step():
            pass
        assert self.mesh is not None
        return self.mesh

    def discard(self) -> None:
        """Drop a half-built mesh (e.g. its job was cancelled); a mesh updated in place stays."""
        if self.mesh is not None and not self.in_place and self.mesh.users == 0:
            bpy.data.meshes.remove(self.mesh)
        self.mesh = None

    # stages -----------------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        p = self.p
        me = bpy.data.meshes.new(self.name)
        me["stepstone"] = True  # ours: safe to remove once nothing uses it
        me.vertices.add(p.n_vertices)
        me.edges.add(p.n_edges)
        self.mesh = me

    def _allocate_faces(self) -> None:
        self.mesh.loops.add(self.p.n_corners)
        self.mesh.polygons.add(self.p.n_faces)

    def _positions(self) -> None:
        if self.p.n_vertices:
            self.mesh.attributes["position"].data.foreach_set("vector", self.p.positions)

    def _edges(self) -> None:
        if self.p.n_edges:
            self.mesh.attributes[".edge_verts"].data.foreach_set("value", self.p.edge_verts)

    def _corner_verts(self) -> None:
        if self.p.n_faces:
            self.mesh.attributes[".corner_vert"].data.foreach_set("value", self.p.corner_verts)

    def _corner_edges(self) -> None:
        if self.p.n_faces:
            self.mesh.attributes[".corner_edge"].data.foreach_set("value", self.p.corner_edges)

    def _face_offsets(self) -> None:
        if self.p.n_faces:
            self.mesh.polygons.foreach_set("loop_start", self.p.loop_starts)

    def _colors(self) -> None:
        if self.p.colors is None:
            return
        me = self.mesh
        # FLOAT_COLOR + linear values: a raw buffer copy (BYTE_COLOR's color_srgb converts per element)
        attr = me.color_attributes.get(COLOR_ATTRIBUTE)
        if attr is not None and (attr.data_type != "FLOAT_COLOR" or attr.domain != "POINT"):
            me.color_attributes.remove(attr)
            attr = None
        if attr is None:
            attr = me.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
        attr.data.foreach_set("color", self.p.colors)
        me.color_attributes.active_color = attr
        try:
            me.color_attributes.render_color_index = me.color_attributes.find(COLOR_ATTRIBUTE)
        except (AttributeError, TypeError):  # older Blender
            pass

    def _uvs(self) -> None:
        if self.p.uvs is None:
            return
        me = self.mesh
        layer = me.uv_layers.get(UV_MAP) or me.uv_layers.new(name=UV_MAP)
        layer.uv.foreach_set("vector", self.p.uvs)
        me.uv_layers.active = layer

    def _finish(self) -> None:
        me = self.mesh
        if self.smooth and self.p.n_faces:
            me.shade_smooth()
        me.update()


@dataclass
class MeshUpdateItem:
    """One received mesh waiting to enter the scene."""

    job: str
    slot: str
    final: bool
    seq: int
    info: dict
    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray]
    replay: bool = False
    uvs: Optional[np.ndarray] = None  # (M, 3, 2) a UV per face corner
    superseded: bool = False
    received: float = field(default_factory=time.perf_counter)
    future: Optional[Future] = None
    prepared: Optional[PreparedMesh] = None
    error: str = ""


ApplyFn = Callable[[MeshUpdateItem, bpy.types.Mesh], None]
FailFn = Callable[[MeshUpdateItem, str], None]


class StreamQueue:
    """Received meshes -> prepared arrays (worker thread) -> staged builds -> ``apply`` into the scene.

    Intermediate meshes of one output slot coalesce, newest wins; final meshes are never dropped (DESIGN.md,
    "The wire"). Everything that touches ``bpy`` runs in :meth:`work`, on the main thread.
    """

    def __init__(self, apply: ApplyFn, fail: FailFn, *, max_faces: Optional[int] = None,
                 current: Optional[Callable[[MeshUpdateItem], Optional[bpy.types.Mesh]]] = None) -> None:
        self.apply = apply
        self.fail = fail
        self.current = current  # the slot's mesh now in the scene (a candidate for an in-place update)
        self.max_faces = max_faces
        self._pending: "OrderedDict[tuple[str, str, int], MeshUpdateItem]" = OrderedDict()
        self._counter = 0
        self._executor: Optional[ThreadPoolExecutor] = None
        self._build: Optional[tuple[MeshUpdateItem, MeshBuild]] = None
        self.longest_stage_s = 0.0
        self.stage_max_s: dict[str, float] = {}  # longest time of each build stage (benchmark)
        self.in_place_updates = 0

    # input --------------------------------------------------------------------------------------------------
    def push(self, item: MeshUpdateItem) -> None:
        """Queue a mesh; a newer intermediate replaces a queued, not yet started intermediate of the same slot."""
        for key, old in list(self._pending.items()):
            if key[0] == item.job and key[1] == item.slot and not old.final:
                # newest wins: an older intermediate of this slot is dropped (or, if its arrays are being
                # prepared right now, marked so it is dropped when the thread is done with it)
                if old.future is None or old.future.done() or old.future.cancel():
                    del self._pending[key]
                else:
                    old.superseded = True
        self._counter += 1
        # copy out of the ZeroMQ frames only when the arrays are prepared (the thread does it)
        self._pending[(item.job, item.slot, self._counter)] = item
        n_faces = int(item.faces.shape[0]) if item.faces.ndim == 2 else 0
        if n_faces > SYNC_PREP_FACES:
            item.future = self._pool().submit(self._prepare, item)

    def drop_job(self, job: str) -> None:
        """Forget queued meshes of a job (cancelled or deleted); a build in progress is discarded too."""
        for key in [k for k in self._pending if k[0] == job]:
            item = self._pending.pop(key)
            if item.future is not None:
                item.future.cancel()
        if self._build is not None and self._build[0].job == job:
            self._build[1].discard()
            self._build = None

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._build is not None

    def pending_for(self, job: str) -> int:
        n = sum(1 for k in self._pending if k[0] == job)
        if self._build is not None and self._build[0].job == job:
            n += 1
        return n

    # work ----------------------------------------------------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepstone-meshprep")
        return self._executor

    def _prepare(self, item: MeshUpdateItem) -> PreparedMesh:
        return prepare_mesh(item.slot, item.vertices, item.faces, item.colors, max_faces=self.max_faces,
                            uvs=item.uvs)

    def work(self, deadline: float) -> None:
        """Advance builds until ``deadline`` (``time.perf_counter()`` value); at least one stage per call."""
        first = True
        while first or time.perf_counter() < deadline:
            first = False
            if self._build is None and not self._start_next():
                return
            item, build = self._build  # type: ignore[misc]
            stage = build.next_stage
            t0 = time.perf_counter()
            try:
                finished = build.step()
            except Exception as exc:  # a Blender-side failure must not kill the timer
                log.exception("building mesh %s of job %s failed", item.slot, item.job)
                build.discard()
                self._build = None
                self.fail(item, f"could not build the mesh in Blender: {exc}")
                continue
            dt = time.perf_counter() - t0
            self.longest_stage_s = max(self.longest_stage_s, dt)
            self.stage_max_s[stage] = max(self.stage_max_s.get(stage, 0.0), dt)
            if finished:
                self._build = None
                try:
                    self.apply(item, build.mesh)
                except Exception as exc:
                    log.exception("placing mesh %s of job %s failed", item.slot, item.job)
                    build.discard()
                    self.fail(item, f"could not place the mesh in the scene: {exc}")

    def _start_next(self) -> bool:
        """Begin building the oldest queued mesh whose arrays are ready; False if none is."""
        for key, item in list(self._pending.items()):
            if item.future is not None and not item.future.done():
                # keep order within a slot: a later mesh of this slot waits for this one
                continue
            if any(k[0] == item.job and k[1] == item.slot for k in self._pending if k[2] < key[2]):
                continue
            del self._pending[key]
            if item.superseded:
                continue
            try:
                prepared = item.future.result() if item.future is not None else self._prepare(item)
            except MeshError as exc:
                self.fail(item, str(exc))
                continue
            except Exception as exc:  # pragma: no cover - defensive
                log.exception("preparing mesh %s failed", item.slot)
                self.fail(item, f"could not read the mesh: {exc}")
                continue
            item.prepared = prepared
            item.vertices = item.faces = item.colors = item.uvs = None  # type: ignore[assignment]  # release the frames
            reuse = self.current(item) if self.current is not None else None
            build = MeshBuild(prepared, f"{item.slot}", reuse=reuse)
            self.in_place_updates += int(build.in_place)
            self._build = (item, build)
            return True
        return False

    def close(self) -> None:
        for item in self._pending.values():
            if item.future is not None:
                item.future.cancel()
        self._pending.clear()
        if self._build is not None:
            self._build[1].discard()
            self._build = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def build_mesh_now(name: str, vertices: np.ndarray, faces: np.ndarray, colors: Any = None) -> bpy.types.Mesh:
    """Prepare and build a mesh synchronously (tests, benchmark, re-import of small results)."""
    return MeshBuild(prepare_mesh(name, vertices, faces, colors), name).run()
