"""The Stepstone wire protocol: signed JSON headers plus raw binary array frames (stdlib + numpy only).

A message is a ZeroMQ multipart message of ``2 + k`` frames::

    [signature, header, array_0, ..., array_{k-1}]

* ``header`` is UTF-8 JSON: ``{"v", "kind", "id", "ts", "fields", "arrays": [{"name", "dtype", "shape",
  "nbytes"}, ...]}``. ``fields`` holds the message's JSON values; each binary frame is the raw little-endian bytes
  of one C-contiguous array, described (dtype, shape, byte size) in ``arrays``.
* ``signature`` is the hex HMAC-SHA256 of the header bytes under the connection key (as in Jupyter's messaging
  protocol). Because the header names the number and the byte size of every binary frame, the signature binds
  them too, without hashing the arrays themselves (hashing 20 MB costs ~90 ms, too much for Blender's main
  thread). For a remote backend, CurveZMQ encrypts and authenticates every frame underneath.
* ``id`` (random) and ``ts`` (sender's clock) let a :class:`Decoder` reject replays: an id seen before, or a
  timestamp outside the time window, is refused.

No pickle anywhere: arrays are rebuilt with ``numpy.frombuffer`` from a whitelist of plain dtypes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
import uuid
import heapq
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Message kinds. Client -> backend:
HELLO = "hello"  # fields: client (stable client id), protocol, credit (bytes of in-flight window), name
SUBMIT = "submit"  # fields: workflow, params, meshes (list of {name, matrix_world}); arrays <i>.vertices ...
CANCEL = "cancel"  # fields: job
LIST_JOBS = "list_jobs"  # fields: -
FETCH = "fetch"  # fields: job
PING = "ping"  # fields: -
SHUTDOWN = "shutdown"  # fields: -
CREDIT = "credit"  # fields: bytes (flow-control credit given back to the backend)
BYE = "bye"  # fields: - (the client is closing; its session can be forgotten)
# Backend -> client:
WELCOME = "welcome"  # fields: protocol, backend_id, profile, device, capabilities, heartbeat_s
ACCEPTED = "accepted"  # fields: job, ref (the submit's message id), workflow, position
REJECTED = "rejected"  # fields: ref, code, message
PROGRESS = "progress"  # fields: job, stage, step, total, message
MESH = "mesh"  # fields: job, seq, final, name, info; arrays vertices, faces, colors?, normals?, uvs?
IMAGE = "image"  # fields: job, label; arrays png (uint8 bytes of a PNG file)
DONE = "done"  # fields: job, results (final mesh names), elapsed_s
FAILED = "failed"  # fields: job, code, message
CANCELLED = "cancelled"  # fields: job, reason
JOBS = "jobs"  # fields: jobs (list of job summaries)
RESULT = "result"  # fields: job, summary (then one final MESH per stored result, with replay=True)
PONG = "pong"  # fields: ref
ERROR = "error"  # fields: code, message, ref?
# Both ways:
HEARTBEAT = "heartbeat"  # fields: -
# (BYE also goes backend -> client when the backend stops; fields: reason)

CLIENT_KINDS = frozenset({HELLO, SUBMIT, CANCEL, LIST_JOBS, FETCH, PING, SHUTDOWN, CREDIT, BYE, HEARTBEAT})
SERVER_KINDS = frozenset(
    {WELCOME, ACCEPTED, REJECTED, PROGRESS, MESH, IMAGE, DONE, FAILED, CANCELLED, JOBS, RESULT, PONG, ERROR,
     HEARTBEAT, BYE}
)
ALL_KINDS = CLIENT_KINDS | SERVER_KINDS
TERMINAL_KINDS = frozenset({DONE, FAILED, CANCELLED})

# Dtypes allowed in binary frames (always little-endian on the wire).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
}

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # default cap on the whole message (frames summed)
MAX_HEADER_BYTES = 1024 * 1024
MAX_ARRAYS = 64
MAX_DIMS = 4
MAX_DIM = 2**31 - 1  # largest extent of one array axis
MAX_DEPTH = 32  # nesting of JSON objects/arrays in a header
MAX_INT_DIGITS = 19  # integers in a header fit in int64 (10**400 is refused, not converted)
DEFAULT_WINDOW_S = 120.0  # replay window: messages older (or further in the future) than this are refused


class ProtocolError(Exception):
    """A message that cannot be accepted. ``code`` is stable (``bad_signature``, ``replay``, ``stale``,
    ``too_large``, ``bad_frame``, ``bad_header``, ``bad_dtype``, ``bad_shape``, ``version``); ``message`` is for
    people."""

    def __init__(self, code: str, message: str, *, ref: str = ""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref  # the refused message's id, when its signature could be checked (for the error's ``ref``)


@dataclass
class Message:
    """A decoded message: ``kind``, its ``id``, JSON ``fields`` and named numpy ``arrays`` (read-only views)."""

    kind: str
    id: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    ts: float = 0.0
    nbytes: int = 0  # total size on the wire (all frames)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def new_key() -> bytes:
    """A fresh random 32-byte connection key."""
    return os.urandom(32)


def new_id() -> str:
    return uuid.uuid4().hex


def sign(key: bytes, header: bytes) -> bytes:
    """Hex HMAC-SHA256 of the header bytes."""
    return hmac.new(key, header, hashlib.sha256).hexdigest().encode("ascii")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 64:
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; send arrays as arrays")


def _frame_array(name: str, arr: Any) -> tuple[dict, Any]:
    a = np.asarray(arr)
    dname = a.dtype.name
    if dname not in DTYPES:
        raise ProtocolError("bad_dtype", f"array {name!r} has dtype {dname}, not one of {', '.join(DTYPES)}")
    if a.ndim > MAX_DIMS:
        raise ProtocolError("bad_shape", f"array {name!r} has {a.ndim} dimensions, at most {MAX_DIMS} allowed")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(DTYPES[dname])
    a = np.ascontiguousarray(a)
    meta = {"name": name, "dtype": dname, "shape": list(a.shape), "nbytes": int(a.nbytes)}
    # a memoryview shares the array's memory: ZeroMQ can send it without a copy
    return meta, memoryview(a.reshape(-1).view(np.uint8)) if a.size else b""


def encode(
    kind: str,
    fields: Optional[Mapping[str, Any]] = None,
    arrays: Optional[Mapping[str, Any]] = None,
    *,
    key: bytes,
    msg_id: Optional[str] = None,
    ts: Optional[float] = None,
) -> list:
    """Build the frames of one message: ``[signature, header, *array_frames]``.

    Array frames are zero-copy memoryviews of the (contiguous) arrays, so keep the arrays alive and unchanged
    until the frames are sent. Raises :class:`ProtocolError` for an unknown kind or a dtype outside the whitelist.
    """
    if kind not in ALL_KINDS:
        raise ProtocolError("bad_header", f"unknown message kind {kind!r}")
    metas = []
    frames = []
    for name, arr in (arrays or {}).items():
        meta, buf = _frame_array(str(name), arr)
        metas.append(meta)
        frames.append(buf)
    header = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "id": msg_id or new_id(),
        "ts": time.time() if ts is None else float(ts),
        "fields": dict(fields or {}),
        "arrays": metas,
    }
    hbytes = json.dumps(header, separators=(",", ":"), default=_json_default).encode("utf-8")
    return [sign(key, hbytes), hbytes, *frames]


_ID_TEXT = re.compile(rb'"id"\s*:\s*"([0-9A-Za-z_.:-]{1,64})"')


class _JSONLimit(ValueError):
    pass


def _parse_constant(name: str) -> Any:
    raise _JSONLimit(f"{name} is not a number this protocol accepts (numbers must be finite)")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _JSONLimit(f"integer with {len(text.lstrip('-'))} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _JSONLimit(f"number {text[:40]} is out of range (numbers must be finite)")
    return v


def _depth_ok(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests at most ``limit`` levels of lists/dicts (iterative: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in o)
    return True


def loads(data: "bytes | str", *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with the protocol's limits: finite numbers only (no NaN/Infinity, no float overflow),
    integers of at most 19 digits, and at most ``max_depth`` levels of nesting. Raises ``ValueError``."""
    try:
        obj = json.loads(data, parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    if not _depth_ok(obj, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return obj


def _frame_bytes(frame: Any) -> memoryview:
    """A memoryview of a frame: bytes, bytearray, memoryview or a ``zmq.Frame`` (``.buffer``)."""
    buf = getattr(frame, "buffer", None)
    if buf is not None:
        return memoryview(buf)
    return memoryview(frame)


class Decoder:
    """Verifies and decodes messages from one peer (or several sharing a key); remembers ids to refuse replays.

    Checks, in order: frame count, total size (``max_bytes``), header size, HMAC-SHA256 of the header (constant
    time), header JSON and version, time window and message id (replay), then every binary frame against its
    description (dtype whitelist, shape, exact byte size). Any failure raises :class:`ProtocolError`.
    """

    def __init__(
        self,
        key: bytes,
        *,
        max_bytes: int = MAX_MESSAGE_BYTES,
        window_s: float = DEFAULT_WINDOW_S,
        max_header_bytes: int = MAX_HEADER_BYTES,
        kinds: Optional[Iterable[str]] = None,
    ) -> None:
        if not key:
            raise ValueError("a non-empty key is required")
        self.key = bytes(key)
        self.max_bytes = int(max_bytes)
        self.window_s = float(window_s)
        self.max_header_bytes = int(max_header_bytes)
        self.kinds = frozenset(kinds) if kinds is not None else ALL_KINDS
        # ids of correctly signed messages -> until when a copy could still fall inside the time window
        self._seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (until, id)

    def _remember(self, mid: str, ts: float) -> None:
        until = ts + self.window_s
        self._seen[mid] = until
        heapq.heappush(self._expiry, (until, mid))

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            until, mid = heapq.heappop(self._expiry)
            if self._seen.get(mid) == until:
                del self._seen[mid]

    def _ref_of(self, hbytes: bytes, sig: Any) -> str:
        """The id of a message refused before its header was parsed, if its signature holds (for ``ref``): from
        the parsed header, else (the header is not acceptable JSON) from its text."""
        try:
            if not hmac.compare_digest(sign(self.key, hbytes), bytes(sig)):
                return ""
        except Exception:
            return ""
        try:
            header = loads(hbytes.decode("utf-8"))
            mid = header.get("id") if isinstance(header, dict) else None
        except Exception:
            m = _ID_TEXT.search(hbytes)
            mid = m.group(1).decode("ascii") if m else None
        return mid if isinstance(mid, str) and 0 < len(mid) <= 64 else ""

    def decode(self, frames: list, *, now: Optional[float] = None) -> Message:
        if len(frames) < 2:
            raise ProtocolError("bad_frame", f"a message needs at least 2 frames (signature, header), got {len(frames)}")
        views = [_frame_bytes(f) for f in frames]
        total = sum(v.nbytes for v in views)
        sig, hdr = views[0], views[1]
        if total > self.max_bytes:
            raise ProtocolError(
                "too_large", f"message of {total:,} bytes is larger than the limit of {self.max_bytes:,} bytes",
                ref=self._ref_of(hdr.tobytes(), sig) if hdr.nbytes <= 4 * self.max_header_bytes else "",
            )
        if hdr.nbytes > self.max_header_bytes:
            raise ProtocolError(
                "too_large", f"header of {hdr.nbytes:,} bytes exceeds {self.max_header_bytes:,} (a prompt or "
                "parameter that long is refused; large data goes in array frames)",
                ref=self._ref_of(hdr.tobytes(), sig) if hdr.nbytes <= 16 * self.max_header_bytes else "",
            )
        hbytes = hdr.tobytes()
        if not hmac.compare_digest(sign(self.key, hbytes), sig.tobytes()):
            raise ProtocolError("bad_signature", "HMAC signature does not match; wrong key or a forged message")
        try:
            header = loads(hbytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError("bad_header", f"header is not valid JSON within the limits: {exc}",
                                ref=self._ref_of(hbytes, sig)) from None
        if not isinstance(header, dict):
            raise ProtocolError("bad_header", "header must be a JSON object")
        mid = header.get("id")
        if not isinstance(mid, str) or not mid or len(mid) > 64:
            raise ProtocolError("bad_header", "header needs a message id (string of at most 64 characters)")
        if header.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(
                "version", f"protocol version {str(header.get('v'))[:20]!r} is not {PROTOCOL_VERSION}; update the "
                "older side", ref=mid
            )
        kind = header.get("kind")
        if not isinstance(kind, str) or kind not in self.kinds:
            raise ProtocolError("bad_header", f"unexpected message kind {str(kind)[:40]!r}", ref=mid)
        ts = header.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or abs(ts) > 1e12:
            raise ProtocolError("bad_header", "header needs a numeric timestamp 'ts' (Unix seconds)", ref=mid)
        ts = float(ts)
        now = time.time() if now is None else now
        self._prune(now)
        if mid in self._seen:
            raise ProtocolError("replay", f"message id {mid} was already received; replay refused", ref=mid)
        if abs(now - ts) > self.window_s:
            if ts > now:  # a clock ahead: this very message would fall inside the window later; refuse it then too
                self._remember(mid, ts)
            raise ProtocolError(
                "stale", f"message timestamp is {now - ts:+.1f} s off, outside the {self.window_s:.0f} s window "
                "(a replay, or the two clocks disagree)", ref=mid
            )
        # a signed message in the window: its id is spent whether or not the rest of it is acceptable
        self._remember(mid, ts)
        fields = header.get("fields", {})
        metas = header.get("arrays", [])
        if not isinstance(fields, dict) or not isinstance(metas, list):
            raise ProtocolError("bad_header", "'fields' must be an object and 'arrays' a list", ref=mid)
        if len(metas) > MAX_ARRAYS:
            raise ProtocolError("bad_header", f"{len(metas)} arrays, at most {MAX_ARRAYS}", ref=mid)
        if len(metas) != len(views) - 2:
            raise ProtocolError(
                "bad_frame", f"header describes {len(metas)} binary frames but {len(views) - 2} arrived (truncated?)",
                ref=mid,
            )
        arrays: dict[str, np.ndarray] = {}
        for meta, view in zip(metas, views[2:]):
            try:
                arrays_name, arr = self._array(meta, view)
            except ProtocolError as exc:
                exc.ref = mid
                raise
            if arrays_name in arrays:
                raise ProtocolError("bad_header", f"two arrays named {arrays_name!r}", ref=mid)
            arrays[arrays_name] = arr
        return Message(kind=kind, id=mid, fields=fields, arrays=arrays, ts=ts, nbytes=total)

    @staticmethod
    def _array(meta: Any, view: memoryview) -> tuple[str, np.ndarray]:
        if not isinstance(meta, dict):
            raise ProtocolError("bad_header", "array description must be an object")
        name, dname, shape, nbytes = meta.get("name"), meta.get("dtype"), meta.get("shape"), meta.get("nbytes")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ProtocolError("bad_header", "array description needs a name (at most 128 characters)")
        if not isinstance(dname, str) or dname not in DTYPES:
            raise ProtocolError("bad_dtype", f"array {name!r}: dtype {str(dname)[:40]!r} is not allowed "
                                f"({', '.join(DTYPES)})")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
        ):
            raise ProtocolError("bad_shape", f"array {name!r}: shape {str(shape)[:80]} must be a list of at most "
                                f"{MAX_DIMS} integers in [0, {MAX_DIM}]")
        dtype = DTYPES[dname]
        # Python integers: the byte count cannot wrap around (int64 products of [2**31, 2**31, 4] wrap to 0)
        expect = math.prod(shape) * dtype.itemsize
        if nbytes != expect:
            raise ProtocolError(
                "bad_shape", f"array {name!r}: {str(nbytes)[:40]} bytes declared, but shape {shape} of {dname} "
                f"needs {expect}"
            )
        if view.nbytes != expect:
            raise ProtocolError(
                "bad_frame", f"array {name!r}: frame has {view.nbytes:,} bytes, header says {expect:,} (truncated?)"
            )
        if expect == 0:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = np.frombuffer(view, dtype=dtype).reshape(shape)
        return name, arr


def mesh_arrays(vertices, faces, colors=None, normals=None, uvs=None) -> dict[str, np.ndarray]:
    """The arrays of a ``mesh`` message in wire dtypes (see :func:`shared.mesh.as_mesh_arrays`)."""
    from .mesh import as_mesh_arrays

    return as_mesh_arrays(vertices, faces, colors, normals, uvs)
