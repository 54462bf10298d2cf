"""Job records as the add-on sees them (plain Python, no ``bpy``): state, progress and where results go."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

ACTIVE_STATES = frozenset({"submitting", "queued", "running"})
FINISHED_STATES = frozenset({"done", "failed", "cancelled", "lost", "damaged"})  # damaged: unreadable job folder


@dataclass
class Placement:
    """Where a job's meshes go in the scene.

    ``collection``: name of the collection created for the job (variants and gallery items, laid on a grid of
    ``spacing`` metres starting at ``origin``). ``source`` and ``matrix_world`` (16 floats, row-major): the
    object a stylize job started from; results take that transform. ``replace_source``: stream into the source
    object's mesh data instead of a new object (only when the artist asked for it).
    """

    collection: str = "Stepstone"
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: float = 1.5
    columns: int = 1  # grid columns (square-ish for the requested count, see grid_columns)
    source: Optional[str] = None
    matrix_world: Optional[list[float]] = None
    replace_source: bool = False
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # world offset added to ``matrix_world`` (beside source)
    avoid_overlap: bool = True  # move a finished result along +X off objects it would overlap
    keep_mesh: bool = False  # stylize texture mode: the result is the source's own mesh with the style baked on


@dataclass
class JobRecord:
    """One request the artist made, from submit to its final meshes."""

    request_id: str
    workflow: str
    label: str
    placement: Placement = field(default_factory=Placement)
    job_id: Optional[str] = None
    state: str = "submitting"
    stage: str = ""
    step: int = 0
    total: int = 0
    message: str = ""
    error: str = ""
    results: list[str] = field(default_factory=list)  # final mesh names the backend reported
    slots: dict[str, str] = field(default_factory=dict)  # output slot -> Blender object name
    slot_order: list[str] = field(default_factory=list)  # grid position of each slot
    finals: set = field(default_factory=set)  # slots whose final mesh is in the scene
    images: list[str] = field(default_factory=list)  # image datablock names
    collection_actual: Optional[str] = None  # the collection made for this job's objects
    meshes_received: int = 0
    submitted: float = field(default_factory=time.time)
    finished: Optional[float] = None
    params: dict[str, Any] = field(default_factory=dict)
    preset: Optional[str] = None  # the quality preset the backend runs it at
    file_token: str = ""  # the .blend session it was started in; results never go into another file
    detached: bool = False  # the file changed while it ran: its meshes are ignored (Re-import fetches them)
    cleanup_pending: bool = False  # failed/cancelled: remove its unfinished previews once the stream is drained
    source_mesh: Optional[str] = None  # replace_source: the artist's original mesh datablock
    baked_image: Optional[str] = None  # stylize texture mode: the baked image texture's datablock
    textures: dict = field(default_factory=dict)  # image label -> datablock name (a result's info["texture"])

    @property
    def key(self) -> str:
        """The id the UI uses: the backend's job id once known, the request id before."""
        return self.job_id or self.request_id

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        if self.total > 0:
            return max(0.0, min(1.0, self.step / self.total))
        return 0.0

    def finish(self, state: str, error: str = "") -> None:
        self.state = state
        if error:
            self.error = error
        self.finished = time.time()

    def grid_index(self, slot: str) -> int:
        """A stable grid cell per output slot, in order of first arrival."""
        if slot not in self.slot_order:
            self.slot_order.append(slot)
        return self.slot_order.index(slot)

    def status_line(self) -> str:
        if self.state in ("failed", "lost", "damaged"):
            return self.error or self.state
        if self.state == "cancelled":
            return self.error or "cancelled"
        if self.state == "done":
            n = len(self.finals) or len(self.results)
            return f"done: {n} result{'s' if n != 1 else ''}"
        if self.state == "submitting":
            return "sending..."
        if self.state == "queued" and not self.stage:
            return "queued"
        text = self.stage or self.state
        if self.total:
            text += f" {self.step}/{self.total}"
        if self.message:
            text += f": {self.message}"
        return text


def grid_columns(count: int) -> int:
    """Columns of a square-ish grid holding ``count`` cells."""
    columns = 1
    while columns * columns < max(count, 1):
        columns += 1
    return columns


def grid_offset(index: int, spacing: float, columns: int) -> tuple[float, float, float]:
    """Position of cell ``index`` of a grid with ``columns`` columns (columns along +X, rows along -Y)."""
    row, col = divmod(index, max(columns, 1))
    return (col * spacing, -row * spacing, 0.0)
