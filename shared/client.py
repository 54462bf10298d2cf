"""The client side of the wire: a non-blocking ZeroMQ DEALER for the Blender add-on, the selftest and the tests.

Nothing here blocks except the explicit ``timeout_ms`` of :meth:`Client.poll`, so Blender's main thread can call
``poll(0)`` from a timer. The client

* says ``hello`` and waits (through ``poll``) for ``welcome``: state ``connecting`` -> ``connected``;
* sends heartbeats and watches the backend's (ZeroMQ Guide ch. 4, "Paranoid Pirate"): silence longer than
  ``timeout_s`` means ``disconnected`` (a synthetic message with a ``reason``), then it reconnects with back-off,
  re-reading the connection file, and reports ``backend_restarted`` when the backend id changed (Jupyter-style
  restart detection);
* gives flow-control credit back for what it consumed (ZeroMQ Guide ch. 7, credit-based flow control), so a
  slow consumer never has more than the window of bytes in flight;
* validates every incoming mesh (finite, index range, shapes) and turns a bad one into an ``error`` message.

Arrays in received messages are read-only views of the ZeroMQ frames (no copy).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import zmq

from . import protocol as P
from .connection import ConnectionFileError, read_connection_file
from .mesh import MeshError, as_mesh_arrays, validate_mesh

log = logging.getLogger("stepstone.client")

# kinds the backend sends through the flow-controlled outbox: the client gives their bytes back as credit
FLOW_KINDS = frozenset(
    {P.ACCEPTED, P.REJECTED, P.PROGRESS, P.MESH, P.IMAGE, P.DONE, P.FAILED, P.CANCELLED, P.JOBS, P.RESULT}
)
DEFAULT_CREDIT = 64 * 1024 * 1024  # bytes the backend may have in flight to this client

DISCONNECTED = "disconnected"
CONNECTING = "connecting"
CONNECTED = "connected"


class ClientError(Exception):
    """The client cannot do what was asked (not connected, bad mesh to send...); the message says why."""


class Client:
    """Non-blocking client of a Stepstone backend; see the module docstring."""

    def __init__(
        self,
        address: str,
        key: bytes,
        *,
        curve_server_key: Optional[bytes] = None,
        heartbeat_s: float = 1.0,
        timeout_s: float = 5.0,
        identity: Optional[str] = None,
        credit_bytes: int = DEFAULT_CREDIT,
        auto_reconnect: bool = True,
        connection_file: Optional[Union[str, Path]] = None,
        validate_meshes: bool = True,
        max_bytes: int = P.MAX_MESSAGE_BYTES,
        name: str = "client",
    ) -> None:
        self.address = address
        self.key = bytes(key)
        self.curve_server_key = curve_server_key
        self.heartbeat_s = float(heartbeat_s)
        self.timeout_s = float(timeout_s)
        self.identity = identity or uuid.uuid4().hex
        self.credit_bytes = int(credit_bytes)
        self.auto_reconnect = auto_reconnect
        self.connection_file = Path(connection_file) if connection_file else None
        self.validate_meshes = validate_meshes
        self.max_bytes = int(max_bytes)
        self.name = name

        self.state: str = DISCONNECTED
        self.reason: str = "not connected yet"
        self.backend_id: Optional[str] = None
        self.welcome: Optional[dict] = None
        self.dropped = 0  # messages refused by the decoder (logged)

        self._ctx = zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._decoder: Optional[P.Decoder] = None
        self._hello_pending = False
        self._t_connect = 0.0
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._owed_credit = 0
        self._next_retry = 0.0
        self._backoff = self.heartbeat_s
        self._started = False
        self._pending: list[P.Message] = []  # synthetic messages to hand out at the next poll
        self._reported_down = False  # one "disconnected" message per outage, not one per retry
        self._bad_signatures = 0  # answers signed with another key (a stale connection file)

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_connection_file(cls, path: Union[str, Path, None] = None, **kw: Any) -> "Client":
        """A client for the backend described by a connection file (default: the per-user runtime folder).

        The path is remembered: after a disconnect the client re-reads it, so it follows a restarted backend.
        """
        info = read_connection_file(path)
        return cls(info["address"], info["key"], curve_server_key=info.get("curve_server_key"),
                   connection_file=info["path"], **kw)

    def _make_socket(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 200)
        s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: sends to a dead backend fail at once
        s.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        s.setsockopt(zmq.RCVHWM, 0)  # flow control is done with credit, not by dropping
        if "[" in self.address:  # an IPv6 address, e.g. tcp://[::1]:PORT
            s.setsockopt(zmq.IPV6, 1)
        if self.curve_server_key:
            pub, sec = zmq.curve_keypair()
            s.curve_publickey = pub
            s.curve_secretkey = sec
            s.curve_serverkey = self.curve_server_key
        s.connect(self.address)
        return s

    def connect(self) -> None:
        """Open the socket and say hello; returns at once. If the TCP connection is not up yet, the hello goes
        out from the next :meth:`poll` calls (which also bring the ``welcome``)."""
        self._close_socket()
        self._sock = self._make_socket()
        self._decoder = P.Decoder(self.key, max_bytes=self.max_bytes, kinds=P.SERVER_KINDS)
        self._started = True
        self.state = CONNECTING
        self.reason = f"connecting to {self.address}"
        now = time.monotonic()
        self._t_connect = now
        self._last_heard = now
        self._owed_credit = 0
        self._bad_signatures = 0
        self._hello_pending = True
        self._try_hello()

    def _try_hello(self) -> None:
        if self._hello_pending:
            if self._send(P.HELLO, {"client": self.identity, "protocol": P.PROTOCOL_VERSION,
                                    "credit": self.credit_bytes, "name": self.name}):
                self._hello_pending = False

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None

    def close(self) -> None:
        """Say goodbye (best effort) and close the socket. The backend keeps running and keeps the jobs."""
        if self._sock is not None and self.state == CONNECTED:
            self._send(P.BYE, {})
            self._sock.close(linger=200)
            self._sock = None
        self._close_socket()
        self._started = False
        self.state = DISCONNECTED
        self.reason = "closed"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- sending
    def _send(self, kind: str, fields: dict, arrays: Optional[dict] = None) -> bool:
        if self._sock is None:
            return False
        frames = P.encode(kind, fields, arrays, key=self.key)
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._last_sent = time.monotonic()
        return True

    def _request(self, kind: str, fields: dict, arrays: Optional[dict] = None) -> str:
        if self.state != CONNECTED:
            raise ClientError(f"not connected to the backend ({self.reason})")
        mid = P.new_id()
        frames = P.encode(kind, fields, arrays, key=self.key, msg_id=mid)
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)  # type: ignore[union-attr]
        except zmq.Again:
            raise ClientError("the backend connection is not ready (send would block); try again") from None
        self._last_sent = time.monotonic()
        return mid

    def submit(self, workflow: str, params: dict, meshes: Optional[list[dict]] = None) -> str:
        """Send a job; returns the request id (``accepted``/``rejected`` carry it as ``ref``).

        Each mesh dict has ``name``, ``vertices`` (N,3), ``faces`` (M,3), optional ``colors`` and ``matrix_world``
        (16 floats, row-major). Arrays are sent as they are (converted to the wire dtypes); the backend checks them.
        """
        arrays: dict[str, np.ndarray] = {}
        descs = []
        for i, m in enumerate(meshes or []):
            try:
                a = as_mesh_arrays(m["vertices"], m["faces"], m.get("colors"))
            except (KeyError, TypeError, ValueError) as exc:
                raise ClientError(f"mesh {i}: cannot convert to arrays: {exc}") from None
            for k, v in a.items():
                arrays[f"mesh{i}.{k}"] = v
            if m.get("uvs") is not None:  # per face corner UVs (M, 3, 2): stylize bakes its texture onto them
                uv = np.ascontiguousarray(m["uvs"], dtype=np.float32)
                if uv.shape != (len(a["faces"]), 3, 2):
                    raise ClientError(f"mesh {i}: uvs must have shape ({len(a['faces'])}, 3, 2), got {uv.shape}")
                arrays[f"mesh{i}.uvs"] = uv
            mw = m.get("matrix_world")
            if mw is not None:
                mw = [float(x) for x in np.asarray(mw, dtype=np.float64).reshape(-1)]
            descs.append({"name": str(m.get("name", f"mesh{i}")), "matrix_world": mw})
        return self._request(P.SUBMIT, {"workflow": workflow, "params": params, "meshes": descs}, arrays)

    def cancel(self, job: str) -> None:
        self._request(P.CANCEL, {"job": job})

    def list_jobs(self) -> None:
        self._request(P.LIST_JOBS, {})

    def fetch(self, job: str) -> None:
        """Ask for a job's stored result: a ``result`` summary, then its final meshes (``replay`` true)."""
        self._request(P.FETCH, {"job": job})

    def ping(self) -> None:
        self._request(P.PING, {})

    def shutdown(self) -> None:
        """Ask the backend to stop (running jobs are reported failed)."""
        self._request(P.SHUTDOWN, {})

    # ----------------------------------------------------------------------------------------------- receiving
    def unread(self, messages: list[P.Message]) -> None:
        """Hand ``messages`` (from an earlier :meth:`poll`) out again, first, at the next poll."""
        self._pending[:0] = list(messages)

    def poll(self, timeout_ms: int = 0, time_budget_s: float = 0.01) -> list[P.Message]:
        """Drain what is ready, at most ``time_budget_s`` of work; wait up to ``timeout_ms`` for the first message.

        Answers heartbeats, gives credit back, tracks liveness and reconnects. Returns application messages plus
        synthetic ``disconnected`` (fields: reason) and ``backend_restarted`` (fields: old, new) messages.
        """
        out: list[P.Message] = self._pending
        self._pending = []
        now = time.monotonic()
        if self.state == DISCONNECTED:
            if self._started and self.auto_reconnect and now >= self._next_retry:
                self._reconnect(out)
            if self.state == DISCONNECTED:
                if timeout_ms > 0 and not out:
                    time.sleep(min(timeout_ms / 1000.0, max(0.0, self._next_retry - now)))
                return out
        sock = self._sock
        assert sock is not None
        self._try_hello()
        wait = int(timeout_ms) if not out else 0
        while self._hello_pending and wait > 0:  # the TCP connection is not up yet: retry the hello briefly
            time.sleep(min(0.01, wait / 1000.0))
            wait -= 10
            self._try_hello()
        wait = max(wait, 0)
        deadline = time.monotonic() + max(0.0, time_budget_s)
        while True:
            if not sock.poll(wait, zmq.POLLIN):
                break
            wait = 0
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(frames, out)
            if self._sock is not sock or time.monotonic() >= deadline:
                break
        self._housekeeping(out)
        return out

    def _handle(self, frames: list, out: list[P.Message]) -> None:
        assert self._decoder is not None
        try:
            msg = self._decoder.decode(frames)
        except P.ProtocolError as exc:
            self.dropped += 1
            if exc.code == "bad_signature":
                self._bad_signatures += 1
            log.warning("dropped a message from the backend: %s", exc)
            return
        self._last_heard = time.monotonic()
        if msg.kind in FLOW_KINDS:
            self._owed_credit += msg.nbytes
        kind = msg.kind
        if kind == P.HEARTBEAT:
            return
        if kind == P.WELCOME:
            old = self.backend_id
            new = msg.fields.get("backend_id")
            self.welcome = dict(msg.fields)
            self.state = CONNECTED
            self.reason = ""
            self._backoff = self.heartbeat_s
            self._reported_down = False
            if old is not None and new != old:
                out.append(P.Message("backend_restarted", fields={"old": old, "new": new}))
            self.backend_id = new
            out.append(msg)
            return
        if kind == P.BYE:
            # answer, so the backend knows everything before its bye was read (it waits for this before closing
            # the connection: a DEALER discards received-but-unread messages when its connection drops)
            self._send(P.BYE, {})
            self._disconnect(f"the backend shut down ({msg.fields.get('reason', 'no reason given')})", out,
                             linger_ms=500)
            return
        if kind == P.ERROR and msg.fields.get("code") == "no_session":
            # the backend forgot us (we were silent too long, or it restarted with the same key): hello again
            self.state = CONNECTING
            self._t_connect = time.monotonic()
            self._hello_pending = True
            self._try_hello()
            return
        if kind == P.MESH and self.validate_meshes:
            a = msg.arrays
            try:
                if "vertices" not in a or "faces" not in a:
                    raise MeshError("mesh message without vertices or faces")
                validate_mesh(a["vertices"], a["faces"], a.get("colors"), a.get("normals"), uvs=a.get("uvs"),
                              what=f"mesh {msg.fields.get('name')!r} of job {msg.fields.get('job')}", allow_empty=True)
            except MeshError as exc:
                log.warning("dropped a bad mesh from the backend: %s", exc)
                out.append(P.Message(P.ERROR, id=msg.id, fields={"code": "bad_mesh", "message": str(exc),
                                                                 "job": msg.fields.get("job")}))
                return
        out.append(msg)

    def _housekeeping(self, out: list[P.Message]) -> None:
        now = time.monotonic()
        if self._owed_credit and self.state == CONNECTED:
            if self._send(P.CREDIT, {"bytes": self._owed_credit}):
                self._owed_credit = 0
        if self.state == CONNECTED and now - self._last_sent >= self.heartbeat_s:
            self._send(P.HEARTBEAT, {})
        if self.state == CONNECTING and now - self._t_connect > self.timeout_s:
            if self._bad_signatures:
                self._disconnect(
                    f"the backend at {self.address} answered, but not with this client's key: the connection "
                    "details (key) belong to another backend run; re-read the connection file or restart the "
                    "backend", out)
            else:
                self._disconnect(f"the backend at {self.address} did not answer within {self.timeout_s:g} s", out)
        elif self.state == CONNECTED and now - self._last_heard > self.timeout_s:
            self._disconnect(
                f"no heartbeat from the backend for {now - self._last_heard:.1f} s; it stopped or crashed", out
            )

    def _disconnect(self, reason: str, out: list[P.Message], linger_ms: int = 0) -> None:
        log.warning("backend connection lost: %s", reason)
        self.state = DISCONNECTED
        self.reason = reason
        self._close_socket(linger_ms)
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 8.0)
        if not self._reported_down:
            self._reported_down = True
            out.append(P.Message("disconnected", fields={"reason": reason}))

    def _reconnect(self, out: list[P.Message]) -> None:
        if self.connection_file is not None:
            try:
                info = read_connection_file(self.connection_file)
            except ConnectionFileError as exc:
                self.reason = str(exc)
                self._next_retry = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 8.0)
                return
            self.address, self.key = info["address"], info["key"]
            self.curve_server_key = info.get("curve_server_key")
        log.info("reconnecting to %s", self.address)
        self.connect()
