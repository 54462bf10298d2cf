"""Typed events a pipeline yields (DESIGN.md, "The backend, as layers").

Pipelines are plain generators of these; they know nothing of ZeroMQ. The CLI, the server and the tests drive the
same pipeline objects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from backend.errors import Cancelled


@dataclass
class Progress:
    stage: str
    step: int
    total: int
    message: str = ""


@dataclass
class MeshUpdate:
    """A mesh in the job's output space. ``final`` meshes are never dropped; intermediate ones may coalesce.

    vertices float32 (N, 3); faces uint32 (M, 3); colors uint8 (N, 3 or 4) or None; normals float32 (N, 3) or None.
    ``name`` identifies the output slot (one per variant / gallery item) so a client replaces the right object.
    ``uvs`` float32 (M, 3, 2) or None: a UV map per face corner (v up, Blender's convention); a final mesh with
    ``uvs`` and ``info["texture"] = label`` is textured by the ``Image`` of that label the job yielded before it
    (stylize's baked texture, :mod:`backend.pipelines.uv_texture`): the GLB writer and the add-on use it.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray] = None
    final: bool = False
    name: str = "result"
    normals: Optional[np.ndarray] = None
    info: dict[str, Any] = field(default_factory=dict)
    uvs: Optional[np.ndarray] = None


@dataclass
class Image:
    png: bytes
    label: str


Event = Union[Progress, MeshUpdate, Image]


class CancelToken:
    """Thread-safe cancellation flag checked by pipelines at every optimisation step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled by request") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled by request")


# The token of the job this thread runs, so that inner loops that know nothing of jobs (renderer chunks, sampler
# steps, SDF slabs, marching cubes) can stop within a fraction of a second: they call :func:`checkpoint`.
_CURRENT = threading.local()


def set_current_cancel(token: Optional["CancelToken"]) -> None:
    """Make ``token`` the one :func:`checkpoint` checks in this thread (None: no job)."""
    _CURRENT.token = token


def current_cancel() -> Optional["CancelToken"]:
    return getattr(_CURRENT, "token", None)


def checkpoint() -> None:
    """Raise :class:`Cancelled` when the job running in this thread was cancelled (cheap: one attribute read and
    one ``Event.is_set``); a no-op outside a job. Called inside every loop that can run longer than ~0.1 s."""
    tok = getattr(_CURRENT, "token", None)
    if tok is not None and tok._event.is_set():
        raise Cancelled(tok.reason or "cancelled by request")


def cancellable(fn: Callable[..., Any], *args: Any, poll_s: float = 0.05, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a single long native call that releases the GIL (SciPy's distance transform at
    256^3 takes ~3 s): inside a job it runs on a helper thread while this one checks the job's token every
    ``poll_s``, so a cancel returns within that time; the abandoned call finishes in the background and its result
    is dropped. Outside a job it is a plain call."""
    tok = current_cancel()
    if tok is None:
        return fn(*args, **kwargs)
    tok.check()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the job's thread below
            box["error"] = exc

    th = threading.Thread(target=work, name="stepstone-cancellable", daemon=True)
    th.start()
    while th.is_alive():
        th.join(poll_s)
        tok.check()
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class MeshInput:
    """A mesh sent with a request (selected Blender object or file), in its local space plus its world matrix."""

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    colors: Optional[np.ndarray] = None
    matrix_world: Optional[np.ndarray] = None  # (4, 4) float64, row-major
    uvs: Optional[np.ndarray] = None  # (M, 3, 2) float32: the active UV map at each face corner (texture baking)
    texture: Optional[bytes] = None  # PNG of the base-colour texture on ``uvs`` (a textured GLB read back)


@dataclass
class JobContext:
    """Everything a pipeline needs besides its parameters.

    ``profile`` is a :class:`backend.models.registry.Profile` (models are loaded lazily through it and cached),
    ``device`` a torch device string ("cpu", "cuda"), ``cancel`` the job's token, ``seed`` the base seed.
    """

    profile: Any
    device: str = "cpu"
    cancel: CancelToken = field(default_factory=CancelToken)
    seed: int = 0
    workdir: Optional[str] = None
    precision: str = "auto"  # mixed precision of the iterative stages (backend.models.device.autocast)

    def autocast(self):
        """The job's mixed-precision context: bf16 autocast on CUDA by default, none on a CPU (issue 15)."""
        from backend.models.device import autocast

        return autocast(self.device, self.precision)


Pipeline = Callable[[dict, list, JobContext], Iterator[Event]]
