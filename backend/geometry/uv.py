"""UV atlas unwrapping with xatlas, in a child process so that a crash cannot take the backend down.

xatlas (``xatlas`` on PyPI, the Python binding of jpcy/xatlas) segments a triangle mesh into charts, flattens each
and packs them into one atlas. Its C++ code has crashed (segmentation fault) on large meshes and crashes on float64
/ int64 input, so :func:`unwrap` never calls it in the backend's process: the mesh goes to ``_xatlas_child.py``
(numpy + xatlas only) through a temporary ``.npz`` file, and the atlas comes back the same way. While the child
works the caller's job token is checked every 50 ms (:func:`backend.events.checkpoint`): a cancel kills the child
and returns within that time. A child that dies (a signal, an exit code, no result) or runs past ``timeout_s``
raises :class:`UnwrapError` with what happened and what to change; the backend keeps running.

The result is per face corner, ``(M, 3, 2)`` float32 UVs in [0, 1] with ``v`` up (Blender's convention, what the
wire and :mod:`backend.geometry.texture` use); face order and vertex indices are the input's (xatlas splits
vertices at chart seams; here the split is undone into corners, so the mesh itself is unchanged).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from backend.errors import StepstoneError
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("_xatlas_child.py")
POLL_S = 0.05
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_PADDING = 4  # texels between charts at the atlas's resolution (the bake pads islands by 2-8 texels)


class UnwrapError(StepstoneError):
    """The UV unwrapper failed (crashed, timed out, or gave no usable atlas); the message says what to change."""

    code = "unwrap_failed"


@dataclass
class Atlas:
    """UVs per face corner and what xatlas reported about the atlas."""

    uvs: np.ndarray  # (M, 3, 2) float32 in [0, 1], v up
    charts: int
    width: int
    height: int
    utilization: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _child_command(inp: str, out: str) -> list[str]:
    return [sys.executable, str(CHILD_SCRIPT), inp, out]


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"crashed ({name})"
    return f"exited with status {rc}"


def unwrap(vertices: np.ndarray, faces: np.ndarray, resolution: int = 512, *, padding: int = DEFAULT_PADDING,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Atlas:
    """Unwrap a triangle mesh into one UV atlas of about ``resolution``^2 texels (see the module docstring).

    Raises :class:`UnwrapError` when the child crashes, fails, runs past ``timeout_s`` or returns an atlas that
    does not fit the mesh; :class:`backend.errors.Cancelled` (the child killed) when the job is cancelled."""
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces, dtype=np.uint32)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise UnwrapError(f"cannot unwrap a mesh of shape vertices {v.shape}, faces {f.shape}")
    if not np.isfinite(v).all() or int(f.max()) >= len(v):
        raise UnwrapError("cannot unwrap a mesh with non-finite vertices or face indices out of range")
    cancel_checkpoint()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stepstone-uv-") as tmp:
        inp = os.path.join(tmp, "mesh.npz")
        out = os.path.join(tmp, "atlas.npz")
        np.savez(inp, vertices=v, faces=f, resolution=np.int64(resolution), padding=np.int64(padding))
        errf = open(os.path.join(tmp, "stderr.txt"), "w+b")  # a file, not a pipe: a chatty child never blocks
        proc = subprocess.Popen(_child_command(inp, out), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errf, cwd=tmp)
        try:
            while True:
                try:
                    proc.wait(POLL_S)
                    break
                except subprocess.TimeoutExpired:  # still running: a cancel or the time limit stops it
                    cancel_checkpoint()
                if time.perf_counter() - t0 > timeout_s:
                    raise UnwrapError(f"UV unwrapping of {len(f):,} faces took longer than {timeout_s:.0f} s and "
                                      "was stopped; lower texture_faces or turn uv_texture off")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            errf.seek(0)
            err = errf.read()[-20_000:].decode("utf-8", "replace")
            errf.close()
        rc = proc.returncode
        if rc != 0 or not os.path.isfile(out):
            tail = " ".join(err.strip().splitlines()[-3:])[-300:]
            log.warning("xatlas child %s on %d faces: %s", _describe_exit(rc), len(f), err[-2000:])
            raise UnwrapError(f"the UV unwrapper (xatlas) {_describe_exit(rc)} on a mesh of {len(f):,} faces"
                              + (f": {tail}" if tail else "") + "; lower texture_faces or turn uv_texture off")
        with np.load(out) as d:
            res = {k: d[k] for k in d.files}
    seconds = time.perf_counter() - t0
    vmap, idx, uv = res["vmapping"], res["indices"].reshape(-1, 3), res["uvs"].reshape(-1, 2)
    if idx.shape != f.shape or len(vmap) != len(uv) or (len(idx) and int(idx.max()) >= len(vmap)):
        raise UnwrapError(f"the UV unwrapper returned {len(idx):,} faces for {len(f):,}; turn uv_texture off")
    if not np.array_equal(vmap[idx], f.astype(np.int64)):
        raise UnwrapError("the UV unwrapper changed the mesh's faces; turn uv_texture off")
    if int(res.get("atlases", 1)) > 1:
        raise UnwrapError(f"the UV unwrapper needed {int(res['atlases'])} atlases for {len(f):,} faces; "
                          "raise texture_size or lower texture_faces")
    corner = np.clip(uv[idx], 0.0, 1.0).astype(np.float32)  # (M, 3, 2)
    return Atlas(uvs=corner, charts=int(res["charts"]), width=int(res["width"]), height=int(res["height"]),
                 utilization=float(res["utilization"]), seconds=seconds)
