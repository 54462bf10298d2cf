"""``python -m backend serve``: the ZeroMQ job server (transport only; the work is in :mod:`backend.jobs`).

One ROUTER socket, one thread for all socket I/O (ZeroMQ sockets are not thread-safe), one GPU worker thread in
the :class:`~backend.jobs.JobManager`. The loop

* authenticates every message (HMAC-SHA256 over the header, replay window; see :mod:`shared.protocol`) and
  answers a bad one with an ``error`` (then keeps serving);
* keeps a session per client id (the ``hello``'s ``client``), so a client that reconnects gets its jobs'
  events again; a job's events fan out to its owner and to every session that ``fetch``-ed it while it ran;
* queues job events per session in an outbox with credit-based flow control (ZeroMQ Guide ch. 7): at most
  ``credit`` bytes are in flight until the client gives them back; intermediate meshes of one (job, name) and
  progress of one job coalesce in the outbox (newest wins); finals and terminal events are never dropped;
* sends heartbeats to each session and forgets sessions that stay silent (their jobs go on; results are on disk).

Binding anything other than loopback needs ``--allow-remote``, and then CurveZMQ encrypts every frame (the server
public key goes into the connection file).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket as pysocket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import zmq

from backend.errors import InputError, StepstoneError
from backend.intake import Credit, Hello, JobRequest, Submit, parse_request
from backend.jobs import DONE, TERMINAL, JobManager, JobStore, default_store_dir
from backend.models.device import PRECISIONS
from shared import protocol as P
from shared.client import DEFAULT_CREDIT, FLOW_KINDS
from shared.connection import default_connection_file, remove_connection_file, write_connection_file

log = logging.getLogger("stepstone.server")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CREDIT = 1024 * 1024 * 1024
MIN_CREDIT = 64 * 1024
JOB_STOP_GRACE_S = 10.0  # at shutdown, how long the running job may take to reach its next cancellation check
GOODBYE_GRACE_S = 5.0  # at shutdown, how long to wait for clients to read the last events and answer `bye`


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port
    connection_file: Optional[Path] = None
    profile: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"  # mixed precision of the jobs' iterative stages (backend.models.device.autocast)
    store: Optional[Path] = None
    heartbeat_s: float = 1.0
    session_timeout_s: float = 60.0  # forget a client silent this long (its jobs go on)
    allow_remote: bool = False
    advertise: Optional[str] = None  # host name written into the connection file for remote clients
    max_bytes: int = P.MAX_MESSAGE_BYTES
    seed: int = 0
    warm_up: bool = True  # import every workflow module in the background at start
    preload: bool = True  # with warm_up: also load the profile's text-to-shape models (CLIP, mapper, SVR) then


@dataclass
class _Out:
    kind: str
    fields: dict
    arrays: Optional[dict]
    key: Optional[tuple] = None  # coalescing key; None: never coalesced

    @property
    def size(self) -> int:
        return 512 + sum(int(np.asarray(a).nbytes) for a in (self.arrays or {}).values())


@dataclass
class Session:
    client: str
    routing: bytes
    name: str = "client"
    credit: int = DEFAULT_CREDIT
    in_flight: int = 0
    outbox: list = field(default_factory=list)
    last_heard: float = field(default_factory=time.monotonic)
    last_sent: float = 0.0
    coalesced: int = 0  # intermediate messages replaced by newer ones before they were sent

    def enqueue(self, out: _Out) -> None:
        """Append, coalescing: a newer intermediate replaces a queued one of the same key in place; a final mesh
        removes queued intermediates of its (job, name)."""
        if out.key is not None:
            if out.key[0] == "final":
                inter = ("mesh",) + out.key[1:]
                before = len(self.outbox)
                self.outbox = [o for o in self.outbox if o.key != inter]
                self.coalesced += before - len(self.outbox)
            else:
                for i, o in enumerate(self.outbox):
                    if o.key == out.key:
                        self.outbox[i] = out
                        self.coalesced += 1
                        return
        self.outbox.append(out)


class Server:
    """The job server; see the module docstring. ``run()`` blocks until :meth:`stop` (or a signal/shutdown)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.backend_id = uuid.uuid4().hex[:12]
        self.key = P.new_key()
        self._stop = threading.Event()
        self._force = threading.Event()  # a second signal: stop waiting for clients and the running job
        self.stop_reason = ""
        self._events: "queue.Queue[tuple]" = queue.Queue()
        self._local = threading.local()
        self._ref = ""  # id of the message being handled (for the error answer if a handler fails)
        self._sessions: dict[str, Session] = {}  # client id -> session
        self._by_routing: dict[bytes, Session] = {}
        self._watchers: dict[str, set[str]] = {}  # job id -> client ids that receive its events
        self._ctx = zmq.Context()
        self._wake_addr = f"inproc://stepstone-wake-{self.backend_id}"
        self._main_thread = threading.get_ident()
        self.address = ""
        self.connection_file: Optional[Path] = None
        self.curve_public: Optional[bytes] = None
        self.profile: Any = None
        self.device = "cpu"
        self.manager: Optional[JobManager] = None
        self.router: Optional[zmq.Socket] = None
        self._capabilities: dict = {}
        self.decoder = P.Decoder(self.key, max_bytes=config.max_bytes, kinds=P.CLIENT_KINDS)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepstone-store-reader")
        self._intake = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepstone-intake")

    # ------------------------------------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Load the profile, open the job store, bind, and write the connection file."""
        from backend.models.device import resolve_device
        from backend.models.registry import load_profile

        cfg = self.config
        remote = cfg.host not in LOOPBACK
        if remote and not cfg.allow_remote:
            raise InputError(
                f"binding {cfg.host} would expose the backend to the network; pass --allow-remote to do it on "
                "purpose (CurveZMQ then encrypts every frame), or bind 127.0.0.1"
            )
        if remote and not zmq.has("curve"):
            raise InputError("this pyzmq/libzmq has no CurveZMQ support, so a remote backend cannot be secured")
        # "cpu" needs no torch import here (seconds on a busy machine); "auto"/"cuda" ask torch
        self.device = "cpu" if cfg.device == "cpu" else resolve_device(cfg.device)
        from backend.models.device import setup_precision

        self.precision = setup_precision(self.device, cfg.precision)
        self.profile = load_profile(cfg.profile, device=self.device)
        self._capabilities = self.profile.capabilities()  # computed once, here, not on every hello
        store = JobStore(Path(cfg.store) if cfg.store else default_store_dir())
        self.manager = JobManager(store, profile=self.profile, device=self.device, backend_id=self.backend_id,
                                  emit=self._emit, seed=cfg.seed, precision=self.precision)
        self._wake_pull = self._ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        r = self._ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable (gone) peers raise instead of silently dropping
        r.setsockopt(zmq.ROUTER_HANDOVER, 1)
        r.setsockopt(zmq.MAXMSGSIZE, cfg.max_bytes)
        r.setsockopt(zmq.SNDHWM, 10000)
        if remote:
            pub, sec = zmq.curve_keypair()
            r.curve_server = True
            r.curve_secretkey = sec
            r.curve_publickey = pub
            self.curve_public = pub
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        if ":" in cfg.host:
            r.setsockopt(zmq.IPV6, 1)
        r.bind(f"tcp://{host}:{cfg.port or '*'}")
        endpoint = r.getsockopt(zmq.LAST_ENDPOINT).decode()
        port = int(endpoint.rsplit(":", 1)[1])
        adv = cfg.advertise or (pysocket.gethostname() if cfg.host in ("0.0.0.0", "::", "*") else cfg.host)
        if not remote:
            adv = "[::1]" if cfg.host == "::1" else "127.0.0.1"  # the address actually bound
        elif ":" in adv and not adv.startswith("["):
            adv = f"[{adv}]"
        self.address = f"tcp://{adv}:{port}"
        self.router = r
        self.connection_file = write_connection_file(
            cfg.connection_file or default_connection_file(),
            address=self.address, key=self.key, backend_id=self.backend_id, curve_server_key=self.curve_public,
            extra={"profile": self.profile.name, "device": self.device, "store": str(store.root)},
        )
        preload = self.profile if cfg.warm_up and cfg.preload else None
        threading.Thread(target=_warm_up, args=(cfg.warm_up, preload), name="stepstone-warm-up", daemon=True).start()
        log.info("backend %s (profile %s on %s) listening on %s; job store %s", self.backend_id,
                 self.profile.name, self.device, self.address, store.root)

    # ------------------------------------------------------------------------------------------------ events in
    def _emit(self, job_id: str, kind: str, fields: dict, arrays: Optional[dict]) -> None:
        """Called by the job manager (worker thread or this thread): queue the event and wake the loop."""
        self._events.put((job_id, kind, fields, arrays))
        if threading.get_ident() == self._main_thread:
            return  # the loop drains the queue before it sleeps again
        s = getattr(self._local, "wake", None)
        if s is None:
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1)
            s.connect(self._wake_addr)
            self._local.wake = s
        try:
            s.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending

    def _fan_out(self) -> None:
        while True:
            try:
                job_id, kind, fields, arrays = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "@session":  # a message for one session (see _post)
                sess = self._sessions.get(fields["client"])
                if sess is not None:
                    sess.enqueue(arrays)
                continue
            if kind == "@admit":  # a submit's verdict from the intake thread (see _validate)
                try:
                    self._admit(**fields)
                except Exception:
                    log.error("internal error while queueing a job (ref %s):\n%s", fields.get("ref"),
                              traceback.format_exc())
                    self._post(fields["client"], _Out(P.REJECTED, {
                        "ref": fields["ref"], "workflow": fields["req"].workflow, "code": "internal",
                        "message": "The backend could not queue this job because of a problem in its own code; its "
                                   "log has the details. Try again, or restart the backend."}, None))
                continue
            key = None
            if kind == P.MESH:
                key = ("final" if fields.get("final") else "mesh", job_id, fields.get("name"))
            elif kind == P.PROGRESS:
                key = ("progress", job_id)
            for client in self._watchers.get(job_id, ()):
                sess = self._sessions.get(client)
                if sess is not None:
                    sess.enqueue(_Out(kind, fields, arrays, key))
            if kind in P.TERMINAL_KINDS:
                self._watchers.pop(job_id, None)

    # ------------------------------------------------------------------------------------------------ sending
    def _send_direct(self, routing: bytes, kind: str, fields: dict, arrays: Optional[dict] = None) -> bool:
        assert self.router is not None
        frames = P.encode(kind, fields, arrays, key=self.key)
        try:
            self.router.send_multipart([routing, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                sess = self._by_routing.get(routing)
                if sess is not None:
                    self._drop_session(sess, "its connection is gone")
                return False
            raise

    def _flush(self, sess: Session, *, ignore_credit: bool = False) -> None:
        """Send queued messages while the client has credit (always at least one when nothing is in flight).

        ``ignore_credit`` is for the last flush at shutdown: the terminal events must reach the client even when
        it has not yet given back the credit of the meshes before them.
        """
        assert self.router is not None
        while sess.outbox:
            out = sess.outbox[0]
            if not ignore_credit and sess.in_flight > 0 and sess.in_flight + out.size > sess.credit:
                return
            frames = P.encode(out.kind, out.fields, out.arrays, key=self.key)
            try:
                self.router.send_multipart([sess.routing, *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._drop_session(sess, "its connection is gone")
                    return
                raise
            sess.outbox.pop(0)
            if out.kind in FLOW_KINDS:  # the client gives exactly these back as credit
                sess.in_flight += sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
            sess.last_sent = time.monotonic()

    def _drop_session(self, sess: Session, why: str) -> None:
        log.info("session %s (%s) closed: %s", sess.client[:8], sess.name, why)
        self._sessions.pop(sess.client, None)
        if self._by_routing.get(sess.routing) is sess:
            self._by_routing.pop(sess.routing, None)

    # ------------------------------------------------------------------------------------------------ receiving
    def _handle_safely(self, frames: list) -> None:
        """:meth:`_handle`, and whatever escapes it is logged with its traceback and answered with an ``error``
        carrying the request's ``ref``: a message never takes the server down."""
        self._ref = ""
        try:
            self._handle(frames)
        except Exception as exc:
            log.error("internal error while handling a message (ref %s):\n%s", self._ref or "?",
                      traceback.format_exc())
            fields = {"code": "internal", "message": "The backend could not handle this request because of a problem "
                                                     "in its own code; it goes on serving and its log has the "
                                                     "details. Try again, or restart the backend."}
            if self._ref:
                fields["ref"] = self._ref
            try:
                self._send_direct(frames[0].bytes, P.ERROR, fields)
            except Exception:  # pragma: no cover - the socket itself failed; the log has the first error
                log.exception("could not answer the failed message")

    def _handle(self, frames: list) -> None:
        routing = frames[0].bytes
        try:
            msg = self.decoder.decode(frames[1:])
        except P.ProtocolError as exc:
            log.warning("refused a message: %s", exc)
            fields = {"code": exc.code, "message": exc.message}
            if exc.ref:
                fields["ref"] = exc.ref
            self._send_direct(routing, P.ERROR, fields)
            return
        self._ref = msg.id
        try:
            req = parse_request(msg)
        except StepstoneError as exc:
            code = "bad_hello" if msg.kind == P.HELLO else exc.code
            if msg.kind == P.SUBMIT and self._by_routing.get(routing) is not None:
                sess = self._by_routing[routing]
                sess.enqueue(_Out(P.REJECTED, {"ref": msg.id, "workflow": str(msg.fields.get("workflow"))[:64],
                                               "code": exc.code, "message": exc.message}, None))
                return
            self._send_direct(routing, P.ERROR, {"code": code, "message": exc.message, "ref": msg.id})
            return
        if isinstance(req, Hello):
            self._hello(routing, req)
            return
        sess = self._by_routing.get(routing)
        if sess is None:
            self._send_direct(routing, P.ERROR, {"code": "no_session", "message": "say hello first", "ref": msg.id})
            return
        sess.last_heard = time.monotonic()
        k = msg.kind
        try:
            if k == P.HEARTBEAT:
                pass
            elif isinstance(req, Credit):
                if req.nbytes > 0:
                    sess.in_flight = max(0, sess.in_flight - req.nbytes)
            elif k == P.PING:
                self._send_direct(routing, P.PONG, {"ref": msg.id, "backend_id": self.backend_id})
            elif isinstance(req, Submit):
                self._submit(sess, req, msg.id)
            elif k == P.CANCEL and isinstance(req, JobRequest):
                self._cancel(sess, req.job, msg.id)
            elif k == P.LIST_JOBS:
                assert self.manager is not None
                sess.enqueue(_Out(P.JOBS, {"ref": msg.id, "jobs": self.manager.list()}, None))
            elif k == P.FETCH and isinstance(req, JobRequest):
                self._fetch(sess, req.job, msg.id)
            elif k == P.SHUTDOWN:
                log.info("shutdown requested by client %s (%s)", sess.client[:8], sess.name)
                self.stop("shutdown requested by a client")
            elif k == P.BYE:
                self._drop_session(sess, "said bye")
        except StepstoneError as exc:
            self._send_direct(routing, P.ERROR, {"code": exc.code, "message": exc.message, "ref": msg.id})

    def _hello(self, routing: bytes, req: Hello) -> None:
        client = req.client
        credit = int(min(max(req.credit if req.credit is not None else DEFAULT_CREDIT, MIN_CREDIT), MAX_CREDIT))
        sess = self._sessions.get(client)
        if sess is None:
            sess = Session(client=client, routing=routing)
            self._sessions[client] = sess
            log.info("session %s (%s) opened", client[:8], req.name)
        elif sess.routing != routing:
            self._by_routing.pop(sess.routing, None)
        sess.routing = routing
        sess.name = req.name
        sess.credit = credit
        sess.in_flight = 0  # a new connection: whatever was in flight on the old one is gone
        sess.last_heard = time.monotonic()
        self._by_routing[routing] = sess
        self._send_direct(routing, P.WELCOME, {
            "protocol": P.PROTOCOL_VERSION,
            "backend_id": self.backend_id,
            "profile": getattr(self.profile, "name", None),
            "device": self.device,
            "capabilities": self._capabilities,
            "presets": self._presets(),
            "heartbeat_s": self.config.heartbeat_s,
            "pid": os.getpid(),
        })
        sess.last_sent = time.monotonic()

    def _presets(self) -> dict:
        """Quality presets per workflow with their memory estimates on this backend (:mod:`backend.presets`)."""
        from backend.presets import describe

        try:
            m = self.manager
            return describe(self.device, timings=m.timings if m else None, timing_key=m.timing_key if m else None)
        except Exception:  # never let a hello fail over the estimates
            log.exception("describing the quality presets failed")
            return {}

    def _submit(self, sess: Session, req: Submit, ref: str) -> None:
        """Validation may import torch and a workflow's modules (seconds): it runs on the intake thread, never
        here, so heartbeats keep flowing; the verdict comes back through the event queue (:meth:`_admit`)."""
        client = sess.client
        try:
            self._intake.submit(self._validate, client, req, ref)
        except RuntimeError:  # the intake is shut down: the backend is stopping
            sess.enqueue(_Out(P.REJECTED, {"ref": ref, "workflow": req.workflow, "code": "shutting_down",
                                           "message": "the backend is shutting down; submit again after it "
                                                      "restarts"}, None))

    def _validate(self, client: str, req: Submit, ref: str) -> None:
        """(intake thread) Parse and validate the job's parameters, then hand the verdict to the loop."""
        assert self.manager is not None
        preset: Optional[str] = None
        try:
            params, preset = self.manager.validate_with_preset(req.workflow, req.params, req.inputs)
        except StepstoneError as exc:
            params = exc
        except Exception as exc:  # a bug in validation: the client still gets an answer
            log.error("validating %s failed:\n%s", req.workflow, traceback.format_exc())
            params = StepstoneError("The backend could not check this request because of a problem in its own "
                                    "code; its log has the details. Try again, or restart the backend.",
                                    code="internal")
        self._emit(None, "@admit", {"client": client, "req": req, "ref": ref, "params": params,
                                    "preset": preset if not isinstance(params, StepstoneError) else None}, None)  # type: ignore[arg-type]

    def _admit(self, client: str, req: Submit, ref: str, params: Any, preset: Optional[str] = None) -> None:
        """(loop) Queue a validated job and tell its owner, or tell why not."""
        assert self.manager is not None
        sess = self._sessions.get(client)
        try:
            if isinstance(params, StepstoneError):
                raise params
            job = self.manager.enqueue(req.workflow, params, req.inputs, owner=client, ref=ref, preset=preset)
        except StepstoneError as exc:
            log.info("rejected %s from %s: %s", req.workflow, client[:8], exc.message)
            if sess is not None:
                sess.enqueue(_Out(P.REJECTED, {"ref": ref, "workflow": req.workflow, "code": exc.code,
                                               "message": exc.message}, None))
            return
        # subscribe before the worker can emit anything about it: accepted is queued first
        self._watchers.setdefault(job.id, set()).add(client)
        if sess is not None:
            sess.enqueue(_Out(P.ACCEPTED, {"job": job.id, "ref": ref, "workflow": req.workflow,
                                           "position": self.manager.position(job), "preset": preset}, None))

    def _cancel(self, sess: Session, job_id: str, ref: str) -> None:
        assert self.manager is not None
        outcome = self.manager.cancel(job_id)
        if outcome == "finished":
            # it had already ended: nothing to cancel, and no second terminal event
            state = self.manager.jobs[job_id].state
            self._send_direct(sess.routing, P.ERROR, {"code": "already_finished", "ref": ref, "job": job_id,
                                                      "message": f"job {job_id} had already ended ({state})"})

    def _fetch(self, sess: Session, job_id: str, ref: str) -> None:
        assert self.manager is not None
        job = self.manager.get(job_id)
        if job is None:
            raise InputError(f"no job with id {job_id[:80]!r} in this backend's store")
        sess.enqueue(_Out(P.RESULT, {"ref": ref, "job": job.id, "summary": job.summary()}, None))
        if job.state not in TERMINAL:
            self._watchers.setdefault(job.id, set()).add(sess.client)
            return
        if job.state != DONE:
            return
        # reading GLB files takes a while for big meshes: do it off the I/O thread, then queue the meshes
        self._loader.submit(self._load_result, sess.client, job, ref)

    def _load_result(self, client: str, job: Any, ref: str) -> None:
        """(loader thread) Read a finished job's GLB files and hand them to the loop for ``client``."""
        assert self.manager is not None
        try:
            stored = self.manager.store.load_result(job)
        except Exception as exc:  # a damaged or deleted job folder
            msg = exc.message if isinstance(exc, StepstoneError) else f"{type(exc).__name__}: {exc}"
            self._post(client, _Out(P.ERROR, {"code": "store_error", "ref": ref, "job": job.id,
                                              "message": f"job {job.id}: stored result unreadable: {msg}"}, None))
            return
        for seq, (rec, mesh) in enumerate(stored, start=1):
            arrays = {"vertices": mesh.vertices, "faces": mesh.faces}
            if mesh.colors is not None:
                arrays["colors"] = mesh.colors
            info = dict(rec.get("info") or {})
            if mesh.uvs is not None:
                arrays["uvs"] = np.ascontiguousarray(mesh.uvs, dtype=np.float32)
                if mesh.texture is not None:  # its texture first, as the job sent it (stylize's baked texture)
                    label = str(info.get("texture") or f"{rec['name']} texture")
                    info["texture"] = label
                    self._post(client, _Out(P.IMAGE, {"job": job.id, "label": label, "replay": True, "ref": ref},
                                            {"png": np.frombuffer(mesh.texture, dtype=np.uint8)}))
            self._post(client, _Out(P.MESH, {"job": job.id, "seq": seq, "final": True, "name": rec["name"],
                                             "info": info, "replay": True, "ref": ref}, arrays))

    def _post(self, client: str, out: "_Out") -> None:
        """Queue a message for one session from any thread."""
        self._emit(None, "@session", {"client": client}, out)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------ loop
    def stop(self, reason: str = "stopped") -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
        self._stop.set()

    def force_stop(self) -> None:
        """A second signal: stop waiting for slow clients and for a job that never reaches a cancellation check."""
        self._force.set()

    def run(self) -> None:
        assert self.router is not None and self.manager is not None
        self._main_thread = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._tick(poller)
                    failures = 0
                except Exception:  # a bug in the loop's own bookkeeping: log it and go on serving
                    failures += 1
                    log.error("internal error in the server loop:\n%s", traceback.format_exc())
                    if failures >= 100:
                        self.stop("the server loop failed 100 times in a row; see the log")
        finally:
            self._shutdown(poller)

    def _incoming(self, limit: int) -> Iterator[list]:
        """The frames of up to ``limit`` messages ready on the router (envelopes without a body skipped)."""
        assert self.router is not None
        for _ in range(limit):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) >= 2:
                yield frames

    def _tick(self, poller: zmq.Poller) -> None:
        """One turn of the loop: read (bounded), fan events out, flush outboxes, heartbeats, forget silent clients."""
        assert self.router is not None
        hb = self.config.heartbeat_s
        ready = dict(poller.poll(max(10, int(hb * 1000 / 4))))
        if self._wake_pull in ready:
            while True:
                try:
                    self._wake_pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        if self.router in ready:
            for frames in self._incoming(200):  # bounded so outgoing traffic is not starved
                self._handle_safely(frames)
        self._fan_out()
        now = time.monotonic()
        for sess in list(self._sessions.values()):
            if now - sess.last_heard > self.config.session_timeout_s:
                self._drop_session(sess, f"silent for {now - sess.last_heard:.0f} s")
                continue
            self._flush(sess)
            if now - sess.last_sent >= hb and sess.client in self._sessions:
                if self._send_direct(sess.routing, P.HEARTBEAT, {}):
                    sess.last_sent = now

    def _shutdown(self, poller: zmq.Poller) -> None:
        """Stop in an order that loses nothing (issue 17, item 6):

        1. the manager stops accepting work, fails the queued jobs and cancels the running one, which ends at its
           next cancellation check while the loop keeps serving (heartbeats, events); if it has not within
           ``JOB_STOP_GRACE_S`` it is failed anyway: that outcome is decided and reported now;
        2. every terminal event decided so far, then ``bye``, goes to every session, and the loop keeps reading
           until each client has answered ``bye`` (or ``GOODBYE_GRACE_S`` passes). A client's DEALER discards
           what it received but had not yet read when the connection drops, so closing the socket right after
           sending lost the ``failed`` event whenever the client was slower than the close (under load);
        3. the worker thread is joined before the sockets close and the interpreter exits: a thread still inside
           torch at interpreter exit aborts the process (``terminate called without an active exception``).
        """
        log.info("backend %s stopping: %s", self.backend_id, self.stop_reason or "stopped")
        if self.manager is not None:
            self.manager.shutdown(timeout_s=0)  # queued jobs fail now; the running one is told to stop
            # keep serving (heartbeats, events, refusals) while the running job reaches its cancellation check
            end = time.monotonic() + JOB_STOP_GRACE_S
            while self.manager.worker_alive() and time.monotonic() < end and not self._force.is_set():
                self._tick(poller)
            self.manager.fail_running()
        self._intake.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._say_goodbye()
        if self.manager is not None and not self.manager.join_worker(self._force):
            log.error("the running job never reached a cancellation check; exiting without waiting for it")
        if self.connection_file is not None:
            remove_connection_file(self.connection_file, self.backend_id)
        self._ctx.destroy(linger=1000)

    def _say_goodbye(self) -> None:
        """Deliver the queued events (terminal ones included) and ``bye``; wait for each client's ``bye``."""
        assert self.router is not None
        self._fan_out()
        waiting: dict[bytes, Session] = {}
        for sess in list(self._sessions.values()):
            self._flush(sess, ignore_credit=True)
            if not sess.outbox and sess.client in self._sessions:
                if self._send_direct(sess.routing, P.BYE, {"reason": self.stop_reason or "stopped"}):
                    waiting[sess.routing] = sess
        end = time.monotonic() + GOODBYE_GRACE_S
        while waiting and time.monotonic() < end and not self._force.is_set():
            for sess in list(self._sessions.values()):  # what did not fit in the pipe at the first try
                if sess.outbox:
                    self._flush(sess, ignore_credit=True)
                    if not sess.outbox and sess.routing not in waiting and sess.client in self._sessions:
                        if self._send_direct(sess.routing, P.BYE, {"reason": self.stop_reason or "stopped"}):
                            waiting[sess.routing] = sess
            if not self.router.poll(20, zmq.POLLIN):
                continue
            for frames in self._incoming(1000):
                try:
                    msg = self.decoder.decode(frames[1:])
                except P.ProtocolError:
                    continue
                if msg.kind == P.BYE:
                    waiting.pop(frames[0].bytes, None)
        if waiting:
            log.info("%d client(s) did not answer bye within %.0f s", len(waiting), GOODBYE_GRACE_S)


PRELOAD_KINDS = ("clip", "mapper", "svr")  # what the default job (text-to-shape) needs first


def _warm_up(all_workflows: bool = True, preload: Any = None) -> None:
    """Import the workflow modules in the background, so the first submit of each does not stall the loop
    (``all_workflows=False``: only the mesh exporter and the diagnostic workflow, which need no torch).

    ``preload``: a profile whose :data:`PRELOAD_KINDS` models are loaded right after (into the process-wide model
    cache, where they stay), text-to-shape's first so the default job finds them ready (issue 15: 13-14 s of
    loading used to come after the first submit). A job that needs a model still loading waits on the cache lock.
    """
    from backend.pipelines import WORKFLOWS, get_workflow

    if preload is not None and all_workflows:
        _preload(preload, ["text-to-shape"])

    try:
        import backend.geometry.io  # noqa: F401  (trimesh: writes the final GLB files)
    except Exception as exc:  # pragma: no cover - reported when a job needs it
        log.warning("mesh export unavailable: %s", exc)
    for name in WORKFLOWS if all_workflows else ["diagnostic"]:
        try:
            get_workflow(name)
        except Exception as exc:  # a workflow still missing from this build: reported when submitted
            log.debug("workflow %s not importable: %s", name, exc)


def _preload(profile: Any, workflows: list[str]) -> None:
    from backend.pipelines import get_workflow

    t = time.perf_counter()
    try:
        for name in workflows:
            get_workflow(name)
        loaded = []
        for kind in PRELOAD_KINDS:
            if profile.component(kind).present:
                getattr(profile, kind)()
                loaded.append(kind)
        # the line a launcher (or `bench speed`) waits for: from here the default job starts computing at once
        print(f"Stepstone backend models ready: {', '.join(loaded) or 'none'} (profile {profile.name}) loaded in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
    except Exception as exc:  # reported again, with its reason, by the job that needs the model
        log.warning("preloading models failed: %s", exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend serve", description="Run the Stepstone job server.")
    p.add_argument("--connection-file", type=Path, default=None,
                   help="where to write the connection file (default: <runtime dir>/backend.json)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: chosen by the OS)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback interface; CurveZMQ then encrypts every frame")
    p.add_argument("--advertise", default=None, help="host name remote clients use (written to the connection file)")
    p.add_argument("--profile", default=None, help="model profile: starter (default), pretrained or tiny")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="mixed precision of the iterative stages: auto = TF32 + bf16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--store", type=Path, default=None, help="job store folder (default: see docs)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="import workflow modules on first use instead of in the background at start")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="load models on the first job that needs them instead of in the background at start")
    p.add_argument("--max-message-mb", type=float, default=P.MAX_MESSAGE_BYTES / 2**20,
                   help="largest message accepted, in MiB (default %(default).0f)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = ServerConfig(host=args.host, port=args.port, connection_file=args.connection_file, profile=args.profile,
                       device=args.device, precision=args.precision, store=args.store, heartbeat_s=args.heartbeat,
                       allow_remote=args.allow_remote, advertise=args.advertise, seed=args.seed,
                       max_bytes=int(args.max_message_mb * 2**20), warm_up=args.warm_up,
                       preload=args.preload)
    server = Server(cfg)
    try:
        server.start()
    except StepstoneError as exc:
        print(f"error ({exc.code}): {exc.message}", flush=True)
        return 2
    except zmq.ZMQError as exc:
        print(f"error: cannot bind {cfg.host}:{cfg.port or 'any'}: {exc}; pick another --port", flush=True)
        return 2

    def _on_signal(signum: int, _frame: Any) -> None:
        if server._stop.is_set():
            log.warning("second %s: not waiting any longer", signal.Signals(signum).name)
            server.force_stop()
        server.stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"Stepstone backend {server.backend_id} listening on {server.address}", flush=True)
    print(f"connection file: {server.connection_file}", flush=True)
    server.run()
    print(f"Stepstone backend {server.backend_id} stopped ({server.stop_reason})", flush=True)
    if server.manager is not None and server.manager.worker_alive():
        # forced out while the worker is inside a pipeline: leave without running interpreter shutdown, which
        # would abort in the C++ runtime under a thread still inside torch
        logging.shutdown()
        os._exit(1)
    return 0
