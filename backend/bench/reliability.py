"""``python -m backend bench reliability``: does the backend survive what it is sent, its disk and its restarts?

Against real backend subprocesses on loopback, in one run:

* fuzz: thousands of seeded hostile messages (unsigned garbage, forgeries under another key, bit-flipped and
  replayed messages, correctly signed but malformed headers, fields and parameters, the reproductions of issue 17)
  with a ping every few hundred to catch a hang; counts crashes, hangs, accepted forgeries and handler errors;
* kill/restart trials: finished jobs, then SIGKILL during a job, then a restart on the same store: every finished
  result must still be fetchable, the in-flight job failed explicitly, every ``ref`` kept;
* load: clients x jobs with random cancels: every job in exactly one terminal state;
* store faults (where unprivileged mount namespaces exist): a nearly full store, a read-only store with an
  interrupted job, damaged job folders.

It prints the counts; all of them should be 0. :func:`fuzz` and the store scenarios are reused by the tests.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import zmq

from backend.selftest import BackendProcess, collect
from shared import protocol as P
from shared.connection import read_connection_file

# ------------------------------------------------------------------------------------------------ raw peer


class RawPeer:
    """A bare DEALER speaking the protocol by hand (signed with the backend's key unless told otherwise)."""

    def __init__(self, backend: BackendProcess) -> None:
        info = read_connection_file(backend.connection_file)
        self.key: bytes = info["key"]
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(info["address"])
        self.decoder = P.Decoder(self.key, kinds=P.SERVER_KINDS)
        self.backlog: list[P.Message] = []  # answers read while waiting for another one

    def send(self, kind: str, fields: Optional[dict] = None, arrays: Optional[dict] = None, **kw: Any) -> str:
        mid = kw.pop("msg_id", None) or P.new_id()
        self.sock.send_multipart(P.encode(kind, fields or {}, arrays, key=kw.pop("key", self.key), msg_id=mid, **kw))
        return mid

    def send_header(self, header: "dict | str | bytes", *arrays: bytes, key: Optional[bytes] = None) -> None:
        """Send a header exactly as given (text is sent verbatim: NaN, deep nesting...), signed with ``key``."""
        h = header if isinstance(header, bytes) else (
            header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
        self.sock.send_multipart([P.sign(key or self.key, h), h, *arrays])

    def hello(self) -> dict:
        self.send(P.HELLO, {"client": P.new_id(), "protocol": P.PROTOCOL_VERSION, "credit": 1 << 26, "name": "raw"})
        return self.until(lambda m: m.kind == P.WELCOME).fields

    def recv(self, timeout_ms: int = 0) -> list[P.Message]:
        """Answers seen while waiting in :meth:`until`, then what is ready (waiting ``timeout_ms`` for it)."""
        out, self.backlog = self.backlog, []
        while self.sock.poll(timeout_ms if not out else 0):
            try:
                m = self.decoder.decode(self.sock.recv_multipart())
            except P.ProtocolError:
                continue
            if m.kind != P.HEARTBEAT:
                out.append(m)
        return out

    def until(self, cond: Callable[[P.Message], bool], timeout_s: float = 20.0) -> P.Message:
        """The first answer matching ``cond``; the others stay in the backlog for :meth:`recv`."""
        end = time.monotonic() + timeout_s
        seen: list[P.Message] = []
        try:
            while time.monotonic() < end:
                batch = self.recv(50)
                for i, m in enumerate(batch):
                    if cond(m):
                        seen.extend(batch[i + 1:])
                        return m
                    seen.append(m)
            raise TimeoutError("no matching answer from the backend")
        finally:
            self.backlog = seen + self.backlog

    def ask(self, kind: str, fields: Optional[dict] = None, timeout_s: float = 20.0, **kw: Any) -> P.Message:
        """Send and wait for the answer that carries this message's id as ``ref``."""
        mid = self.send(kind, fields, **kw)
        return self.until(lambda m: m.fields.get("ref") == mid, timeout_s)

    def close(self) -> None:
        self.sock.close(0)


def png_header(width: int, height: int) -> bytes:
    """A small PNG file that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def header(kind: str = P.SUBMIT, fields: Any = None, arrays: Any = None, **over: Any) -> dict:
    h = {"v": P.PROTOCOL_VERSION, "kind": kind, "id": P.new_id(), "ts": time.time(),
         "fields": {} if fields is None else fields, "arrays": [] if arrays is None else arrays}
    h.update(over)
    return h


def reproductions() -> list[tuple[str, Any, list[bytes]]]:
    """Issue 17's correctly signed messages that used to kill the server: (label, header (dict or raw text),
    array frames)."""
    sub = lambda params, wf="diagnostic": header(fields={"workflow": wf, "params": params, "meshes": []})  # noqa: E731
    nested = header(fields={"workflow": "diagnostic", "params": {}, "meshes": []})
    deep = json.dumps(nested).replace('"params": {}', '"params": ' + "[" * 1500 + "]" * 1500)
    out: list[tuple[str, Any, list[bytes]]] = [
        ("steps NaN", json.dumps(sub({"steps": float("nan")})), []),
        ("variants NaN", json.dumps(sub({"prompt": "a chair", "variants": float("nan")}, "text-to-shape")), []),
        ("steps Infinity", json.dumps(sub({"steps": float("inf")})), []),
        ("steps 10**400", json.dumps(sub({"steps": 10**400})), []),
        ("ts 10**400", json.dumps(header(P.PING, ts=10**400)), []),
        ("kind as a list", json.dumps(header(["submit"])), []),
        ("JSON nested 1500 levels", deep, []),
        ("workflow as a list", json.dumps(header(fields={"workflow": ["diagnostic"], "params": {}})), []),
        ("params as a list", json.dumps(header(fields={"workflow": "diagnostic", "params": [1, 2]})), []),
        ("20000x20000 PNG", json.dumps(sub({"image_png": base64.b64encode(png_header(20000, 20000)).decode()},
                                           "image-to-shape")), []),
    ]
    for shape in ([2**32, 2**32], [2**62, 4], [2**31, 2**31, 4], [2**70]):
        meta = [{"name": "mesh0.vertices", "dtype": "float32", "shape": shape, "nbytes": 0}]
        out.append((f"array shape {shape}", json.dumps(header(
            fields={"workflow": "diagnostic", "params": {}, "meshes": [{"name": "m"}]}, arrays=meta)), [b""]))
    return out


# ------------------------------------------------------------------------------------------------ fuzz
_ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**31, 2**53 + 1, 2**63, -(2**63), 1e308, -1e-308, 0.5, "",
                          "x" * 300, "diagnostic", "\u0000\ud7ff", [], {}, [[[]]], {"a": {"b": {"c": {}}}}, [1, "a"],
                          "NaN", "Infinity"]
_RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "[" * 40 + "]" * 40]


def _odd(rng: random.Random) -> Any:
    return rng.choice(_ODD_VALUES)


def _odd_params(rng: random.Random) -> dict:
    keys = ["steps", "resolution", "delay", "faces", "seed", "prompt", "variants", "iterations", "views",
            "render_resolution", "n_samples", "count", "subjects", "image_png", "config", "stepz"]
    return {rng.choice(keys): _odd(rng) for _ in range(rng.randint(0, 4))}


def _odd_meta(rng: random.Random) -> Any:
    dims = [0, 1, 3, 2**31, 2**32, 2**62, -1, 2**63 - 1]
    m = {"name": rng.choice(["mesh0.vertices", "mesh0.faces", "x", "", 7]),
         "dtype": rng.choice(["float32", "uint32", "uint8", "object", "float128", ">f4", None]),
         "shape": rng.choice([[rng.choice(dims) for _ in range(rng.randint(0, 6))], "3", None, [1.5, 2]]),
         "nbytes": rng.choice([0, 12, -4, 2**64, "12"])}
    return m if rng.random() < 0.9 else rng.choice(_ODD_VALUES)


def hostile_messages(rng: random.Random, key: bytes, n: int) -> list[tuple[str, list[bytes], Optional[str]]]:
    """``n`` seeded hostile messages: (category, frames, id if it is a forgery whose acceptance would count)."""
    other_key = bytes(rng.getrandbits(8) for _ in range(32))
    out: list[tuple[str, list[bytes], Optional[str]]] = []
    kinds = sorted(P.CLIENT_KINDS - {P.SHUTDOWN})  # correctly signed shutdowns would just stop it
    sent_valid: list[list[bytes]] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.12:  # unsigned garbage
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(rng.randint(1, 5))]
            out.append(("garbage", frames, None))
        elif r < 0.27:  # forgery: a well-formed message under another key
            kind = rng.choice(sorted(P.CLIENT_KINDS))
            fields = {"workflow": "diagnostic", "params": {"steps": 1}, "meshes": []} if kind == P.SUBMIT else {
                "job": "x", "client": P.new_id()}
            mid = P.new_id()
            out.append(("forged", [bytes(f) for f in P.encode(kind, fields, key=other_key, msg_id=mid)], mid))
        elif r < 0.35:  # a valid message with one byte flipped (signature or header)
            frames = [bytearray(bytes(f)) for f in P.encode(P.PING, {}, key=key)]
            i = rng.randrange(2)
            frames[i][rng.randrange(len(frames[i]))] ^= 1 << rng.randrange(8)
            out.append(("bit-flip", [bytes(f) for f in frames], None))
        elif r < 0.42 and sent_valid:  # a replay of an earlier valid message
            out.append(("replay", rng.choice(sent_valid), None))
        elif r < 0.50:  # raw header text with non-JSON numbers or deep nesting
            text = json.dumps(header(rng.choice(kinds), {"workflow": "diagnostic", "params": {"steps": 0}}))
            text = text.replace('"steps": 0', '"steps": ' + rng.choice(_RAW_TOKENS))
            out.append(("raw-json", [P.sign(key, text.encode()), text.encode()], None))
        elif r < 0.62:  # correctly signed header with odd top-level values
            h = header(rng.choice(kinds + ["welcome", "nope"]))
            for k in rng.sample(["v", "kind", "id", "ts", "fields", "arrays"], rng.randint(1, 3)):
                h[k] = _odd(rng)
            hb = json.dumps(h).encode()
            out.append(("odd-header", [P.sign(key, hb), hb], None))
        elif r < 0.75:  # odd array descriptions and frames
            metas = [_odd_meta(rng) for _ in range(rng.randint(1, 3))]
            h = header(P.SUBMIT, {"workflow": "diagnostic", "params": {}, "meshes": [{"name": "m"}]}, metas)
            hb = json.dumps(h).encode()
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 4, 12, 36]))) for _ in metas]
            out.append(("odd-arrays", [P.sign(key, hb), hb, *frames[:rng.randint(0, len(frames))]], None))
        else:  # correctly signed requests with odd fields and parameters
            kind = rng.choice([P.SUBMIT, P.SUBMIT, P.SUBMIT, P.CANCEL, P.FETCH, P.CREDIT, P.HELLO])
            if kind == P.SUBMIT:
                fields = {"workflow": rng.choice(["diagnostic", "text-to-shape", "stylize", "gallery",
                                                  "image-to-shape", _odd(rng)]),
                          "params": _odd_params(rng) if rng.random() < 0.85 else _odd(rng),
                          "meshes": rng.choice([[], _odd(rng), [{"name": _odd(rng), "matrix_world": _odd(rng)}]])}
            elif kind == P.HELLO:
                fields = {"client": _odd(rng), "credit": _odd(rng), "name": _odd(rng)}
            else:
                fields = {"job": _odd(rng), "bytes": _odd(rng)}
            frames = [bytes(f) for f in P.encode(kind, fields, key=key)]
            if kind != P.HELLO:
                sent_valid.append(frames)
            out.append(("odd-fields", frames, None))
    return out


def fuzz(backend: BackendProcess, n: int, seed: int = 0, ping_every: int = 250,
         hang_s: float = 20.0) -> dict[str, int]:
    """Send ``n`` hostile messages (plus the reproductions) to a running backend; return the counts."""
    rng = random.Random(seed)
    peer = RawPeer(backend)
    counts = {"messages": 0, "crashes": 0, "hangs": 0, "accepted_forgeries": 0, "handler_errors": 0,
              "answers": 0, "jobs_accepted": 0}
    try:
        peer.hello()
        msgs = hostile_messages(rng, peer.key, n)
        for label, text, frames in reproductions():
            msgs.append((label, [P.sign(peer.key, text.encode()), text.encode(), *frames], None))
        forged: set[str] = set()
        non_error_refs: dict[str, int] = {}

        def absorb(batch: list[P.Message]) -> None:
            for m in batch:
                counts["answers"] += 1
                ref = m.fields.get("ref")
                if m.kind == P.ERROR and m.fields.get("code") == "internal":
                    counts["handler_errors"] += 1
                if m.kind not in (P.ERROR, P.REJECTED) and isinstance(ref, str):
                    if ref in forged:
                        counts["accepted_forgeries"] += 1
                    non_error_refs[ref] = non_error_refs.get(ref, 0) + 1
                    if m.kind in (P.PONG, P.ACCEPTED, P.JOBS, P.RESULT) and non_error_refs[ref] > 1:
                        counts["accepted_forgeries"] += 1  # a replay was served
                if m.kind == P.ACCEPTED:
                    counts["jobs_accepted"] += 1
                    peer.send(P.CANCEL, {"job": m.fields["job"]})

        for i, (label, frames, forged_id) in enumerate(msgs):
            if forged_id:
                forged.add(forged_id)
            peer.sock.send_multipart(frames)
            counts["messages"] += 1
            if i % 50 == 49:
                absorb(peer.recv(0))
            if i % ping_every == ping_every - 1 or i == len(msgs) - 1:
                if backend.proc is not None and backend.proc.poll() is not None:
                    counts["crashes"] += 1
                    break
                peer.hello()  # a fuzzed hello may have replaced this peer's session
                try:
                    absorb([peer.ask(P.PING, timeout_s=hang_s)])
                except TimeoutError:
                    counts["hangs"] += 1
                    break
        absorb(peer.recv(200))
    finally:
        peer.close()
    if backend.proc is not None and backend.proc.poll() is not None and not counts["crashes"]:
        counts["crashes"] += 1
    counts["handler_errors"] += backend.log_path.read_text(errors="replace").count("internal error while handling")
    return counts


# ------------------------------------------------------------------------------------------------ store faults
def namespaces_available() -> bool:
    """Whether unprivileged mount namespaces work here (``unshare -rm``): needed for the store-fault runs."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tmpfs_backend(workdir: Path, size_kb: int, free_kb: int, **kw: Any) -> BackendProcess:
    """A backend whose job store is a ``size_kb`` tmpfs with only ``free_kb`` left free (a nearly full disk)."""
    mnt = Path(workdir) / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "$0" && head -c {(size_kb - free_kb) * 1024} /dev/zero '
              f'> "$0/filler" 2>/dev/null; mkdir -p "$0/jobs" && exec "$@"')
    b = BackendProcess(workdir, wrap=["unshare", "-rm", "sh", "-c", script, str(mnt)], **kw)
    b.store = mnt / "jobs"
    return b


def readonly_backend(workdir: Path, store: Path, **kw: Any) -> BackendProcess:
    """A backend whose job store ``store`` is mounted read-only (in its own mount namespace)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    b = BackendProcess(workdir, wrap=["unshare", "-rm", "sh", "-c", script, str(store)], **kw)
    b.store = store
    return b


def write_interrupted_job(store: Path, job_id: str = "20260101-000000-running1", ref: str = "ref-of-it") -> str:
    d = store / job_id
    d.mkdir(parents=True, exist_ok=True)
    status = {"job": job_id, "ref": ref, "workflow": "diagnostic", "state": "running", "created": 1.0,
              "started": 2.0, "finished": None, "error": None, "results": [], "backend_id": "old", "params": {}}
    (d / "status.json").write_text(json.dumps(status))
    (d / "request.json").write_text(json.dumps({"job": job_id, "workflow": "diagnostic", "ref": ref}))
    return job_id


def write_damaged_jobs(store: Path) -> dict[str, str]:
    """Job folders damaged in the ways issue 17 names; returns job id -> the expected hint."""
    store.mkdir(parents=True, exist_ok=True)
    out = {}
    ok = {"job": "", "ref": "r", "workflow": "diagnostic", "state": "done", "created": 1.0, "started": 1.0,
          "finished": 2.0, "error": None, "results": [], "backend_id": "old", "params": {}}
    d = store / "20260101-000000-truncate"
    d.mkdir()
    (d / "status.json").write_text(json.dumps({**ok, "job": d.name})[:40])
    out[d.name] = "not valid JSON"
    d = store / "20260101-000000-oopsoops"
    d.mkdir()
    (d / "status.json").write_text(json.dumps({**ok, "job": d.name, "results": "oops"}))
    out[d.name] = "results"
    d = store / "20260101-000000-nostatus"
    d.mkdir()
    out[d.name] = "missing"
    return out


@contextlib.contextmanager
def _served(b: BackendProcess, res: dict, name: str) -> Iterator[Any]:
    """Start ``b``, yield a connected client; afterwards count a crash into ``res`` and stop the backend."""
    b.start()
    c = b.client(name=name)
    try:
        yield c
    finally:
        c.close()
        if b.proc is not None and b.proc.poll() is not None:
            res["crashes"] += 1
        b.terminate()
        b.kill()


def _list_jobs(c: Any) -> dict[str, dict]:
    c.list_jobs()
    return {j["job"]: j for j in collect(c, lambda m: m.kind == P.JOBS, 20)[-1].fields["jobs"]}


def _submit_and_settle(c: Any, params: dict, timeout_s: float = 60.0) -> P.Message:
    """Submit a diagnostic job; return its rejection or its terminal event."""
    ref = c.submit("diagnostic", params)
    first = collect(c, lambda m: m.fields.get("ref") == ref and m.kind in (P.ACCEPTED, P.REJECTED), timeout_s)[-1]
    if first.kind == P.REJECTED:
        return first
    job = first.fields["job"]
    return collect(c, lambda m: m.kind in P.TERMINAL_KINDS and m.fields.get("job") == job, timeout_s)[-1]


def scenario_full_store(workdir: Path) -> dict[str, Any]:
    """A store with 96 KB free: a job whose result does not fit fails clearly, the server survives, and once
    nothing fits new jobs are refused with the store's reason. Returns counts and the messages seen."""
    res: dict[str, Any] = {"crashes": 0, "stuck_jobs": 0, "unclear": 0, "failed_full": 0, "refused_full": 0}
    with _served(tmpfs_backend(workdir, size_kb=4096, free_kb=96), res, "full") as c:
        try:
            big = _submit_and_settle(c, {"faces": 400_000, "steps": 1})
            if big.kind == P.FAILED and "is full" in big.fields.get("message", ""):
                res["failed_full"] += 1
            elif big.kind != P.DONE:
                res["unclear"] += 1
            for _ in range(40):
                m = _submit_and_settle(c, {"steps": 1, "resolution": 24})
                if m.kind == P.REJECTED:
                    if m.fields.get("code") == "store_unavailable" and "is full" in m.fields["message"]:
                        res["refused_full"] += 1
                        res["refusal"] = m.fields["message"]
                        break
                    res["unclear"] += 1
                elif m.kind == P.FAILED:
                    if "is full" in m.fields.get("message", ""):
                        res["failed_full"] += 1
                    else:
                        res["unclear"] += 1
            c.ping()
            collect(c, lambda m: m.kind == P.PONG, 20)
        except TimeoutError:
            res["stuck_jobs"] += 1
    return res


def scenario_readonly_store(workdir: Path) -> dict[str, Any]:
    """A read-only store holding a job interrupted by a crash: the backend starts, reports that job failed (with
    its ref), and refuses new jobs with the store's reason."""
    res: dict[str, Any] = {"crashes": 0, "unclear": 0, "refused_readonly": 0, "lost_refs": 0}
    store = Path(workdir) / "ro-store"
    job_id = write_interrupted_job(store)
    with _served(readonly_backend(workdir, store), res, "ro") as c:
        j = _list_jobs(c).get(job_id)
        if j is None or j["state"] != "failed" or j["error"]["code"] != "backend_restarted":
            res["unclear"] += 1
        if j is None or j.get("ref") != "ref-of-it":
            res["lost_refs"] += 1
        m = _submit_and_settle(c, {"steps": 1, "resolution": 12})
        if m.kind == P.REJECTED and m.fields.get("code") == "store_unavailable" and "read-only" in m.fields["message"]:
            res["refused_readonly"] += 1
            res["refusal"] = m.fields["message"]
        else:
            res["unclear"] += 1
    return res


def scenario_damaged_store(workdir: Path, restarts: int = 2) -> dict[str, Any]:
    """Damaged job folders are listed as ``damaged`` with what is wrong, on every start."""
    res: dict[str, Any] = {"crashes": 0, "hidden": 0, "unexplained": 0}
    damaged = write_damaged_jobs(Path(workdir) / "jobs")
    for _ in range(restarts):
        with _served(BackendProcess(workdir), res, "damaged") as c:
            jobs = _list_jobs(c)
            for job_id, hint in damaged.items():
                j = jobs.get(job_id)
                if j is None:
                    res["hidden"] += 1
                elif j["state"] != "damaged" or hint not in j["error"]["message"]:
                    res["unexplained"] += 1
    return res


# ------------------------------------------------------------------------------------------------ kill / load
def kill_restart_trials(workdir: Path, trials: int) -> dict[str, int]:
    """Each trial: one finished job, then SIGKILL during a second; restart on the same store and check."""
    res = {"trials": 0, "crashes": 0, "lost_results": 0, "lost_refs": 0, "not_one_terminal": 0}
    done: dict[str, str] = {}  # job -> ref
    for _ in range(trials):
        b = BackendProcess(workdir).start()
        c = b.client(name="trial")
        try:
            listed = _list_jobs(c)
            for job, ref in done.items():
                j = listed.get(job)
                if j is None or j["state"] != "done":
                    res["lost_results"] += 1
                elif j["ref"] != ref:
                    res["lost_refs"] += 1
            for j in listed.values():
                if j["state"] not in ("done", "failed", "cancelled"):
                    res["not_one_terminal"] += 1
            if done:
                job = random.choice(list(done))
                c.fetch(job)
                try:
                    collect(c, lambda m: m.kind == P.MESH and m.fields.get("replay"), 30)
                except TimeoutError:
                    res["lost_results"] += 1
            ref = c.submit("diagnostic", {"steps": 2, "resolution": 16})
            msgs = collect(c, lambda m: m.kind in P.TERMINAL_KINDS, 60)
            job = next(m.fields["job"] for m in msgs if m.kind == P.ACCEPTED)
            if msgs[-1].kind == P.DONE:
                done[job] = ref
            c.submit("diagnostic", {"steps": 500, "resolution": 12, "delay": 0.05})
            collect(c, lambda m: m.kind == P.MESH, 30)
            b.kill()
            res["trials"] += 1
        except TimeoutError:
            res["crashes"] += 1
        finally:
            c.close()
            b.kill()
    return res


def load_run(workdir: Path, clients: int, jobs: int, cancel_p: float = 0.35, seed: int = 0) -> dict[str, int]:
    """``clients`` x ``jobs`` diagnostic jobs, ``cancel_p`` of them cancelled at a random moment."""
    rng = random.Random(seed)
    res = {"jobs": 0, "not_one_terminal": 0, "cancels": 0, "crashes": 0}
    with BackendProcess(workdir) as b:
        cs = [b.client(name=f"load{i}") for i in range(clients)]
        try:
            owner: dict[str, Any] = {}
            for i in range(jobs):
                for c in cs:
                    c.submit("diagnostic", {"steps": rng.randint(1, 4), "resolution": 12,
                                            "delay": rng.choice([0.0, 0.01])})
            terminal: dict[str, int] = {}
            end = time.monotonic() + 60 + jobs * clients
            while time.monotonic() < end and (len(owner) < jobs * clients or len(terminal) < len(owner)):
                for c in cs:
                    for m in c.poll(5, 0.05):
                        job = m.fields.get("job")
                        if m.kind == P.ACCEPTED:
                            owner[job] = c
                            if rng.random() < cancel_p:
                                c.cancel(job)
                                res["cancels"] += 1
                        elif m.kind in P.TERMINAL_KINDS:
                            terminal[job] = terminal.get(job, 0) + 1
            res["jobs"] = len(owner)
            res["not_one_terminal"] = sum(1 for j in owner if terminal.get(j) != 1)
        finally:
            for c in cs:
                c.close()
        if b.proc is not None and b.proc.poll() is not None:
            res["crashes"] += 1
    return res


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench reliability", description=__doc__.split("\n")[0])
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile messages to send")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=10, help="SIGKILL/restart trials")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--jobs", type=int, default=30, help="jobs per client in the load run")
    args = p.parse_args(argv)
    totals = {"crashes": 0, "hangs": 0, "accepted_forgeries": 0, "lost_results": 0, "not_one_terminal": 0}
    with tempfile.TemporaryDirectory(prefix="stepstone-reliability-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        with BackendProcess(root / "fuzz") as b:
            f = fuzz(b, args.fuzz, seed=args.seed)
        print(f"fuzz: {f['messages']:,} messages in {time.perf_counter() - t:.1f} s: {f['crashes']} crashes, "
              f"{f['hangs']} hangs, {f['accepted_forgeries']} accepted forgeries, {f['handler_errors']} handler "
              f"errors ({f['answers']:,} answers, {f['jobs_accepted']} fuzzed jobs accepted and cancelled)",
              flush=True)
        for k in ("crashes", "hangs", "accepted_forgeries"):
            totals[k] += f[k]
        totals["crashes"] += f["handler_errors"]
        t = time.perf_counter()
        k = kill_restart_trials(root / "kill", args.trials)
        print(f"kill/restart: {k['trials']} trials in {time.perf_counter() - t:.1f} s: {k['lost_results']} lost "
              f"results, {k['lost_refs']} lost refs, {k['not_one_terminal']} jobs not in one terminal state, "
              f"{k['crashes']} failed trials", flush=True)
        totals["lost_results"] += k["lost_results"] + k["lost_refs"]
        totals["not_one_terminal"] += k["not_one_terminal"]
        totals["crashes"] += k["crashes"]
        t = time.perf_counter()
        ld = load_run(root / "load", args.clients, args.jobs, seed=args.seed)
        print(f"load: {args.clients} clients x {args.jobs} jobs ({ld['jobs']} accepted, {ld['cancels']} cancels) "
              f"in {time.perf_counter() - t:.1f} s: {ld['not_one_terminal']} jobs without exactly one terminal "
              f"state, {ld['crashes']} crashes", flush=True)
        totals["not_one_terminal"] += ld["not_one_terminal"] + (args.clients * args.jobs - ld["jobs"])
        totals["crashes"] += ld["crashes"]
        t = time.perf_counter()
        d = scenario_damaged_store(root / "damaged")
        print(f"store faults: damaged folders: {d['hidden']} hidden, {d['unexplained']} without a reason, "
              f"{d['crashes']} crashes", flush=True)
        totals["crashes"] += d["crashes"]
        totals["lost_results"] += d["hidden"] + d["unexplained"]
        if namespaces_available():
            full = scenario_full_store(root / "full")
            print(f"store faults: nearly full store: {full['failed_full']} jobs failed 'store full', "
                  f"{full['refused_full']} refusals ({full.get('refusal', 'none')!r}), {full['stuck_jobs']} stuck, "
                  f"{full['unclear']} unclear, {full['crashes']} crashes", flush=True)
            ro = scenario_readonly_store(root / "ro")
            print(f"store faults: read-only store: {ro['refused_readonly']} refusals "
                  f"({ro.get('refusal', 'none')!r}), {ro['lost_refs']} lost refs, {ro['unclear']} unclear, "
                  f"{ro['crashes']} crashes", flush=True)
            totals["crashes"] += full["crashes"] + ro["crashes"]
            totals["not_one_terminal"] += full["stuck_jobs"]
            totals["lost_results"] += ro["lost_refs"] + full["unclear"] + ro["unclear"]
        else:
            print("store faults: full / read-only store skipped (no unprivileged mount namespaces: unshare -rm)")
        print(f"store faults in {time.perf_counter() - t:.1f} s")
    print("TOTAL: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items()))
    return 0 if not any(totals.values()) else 1
