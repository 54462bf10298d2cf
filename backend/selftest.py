"""``python -m backend selftest``: an installation check an artist can run.

It starts a real backend (``python -m backend serve``) in a subprocess with a throw-away runtime folder and job
store, connects as the Blender add-on does (:class:`shared.client.Client`), and checks end to end:

1. the handshake (protocol version, backend id, profile, capabilities) and a ping;
2. a ``diagnostic`` job streaming intermediate meshes and a final one (valid, watertight, with vertex colours);
3. the job store: the job is listed as done and its final mesh comes back from disk, equal to the streamed one;
4. cancellation of a running job, and rejection of a mesh with NaN vertices (the server keeps serving);
5. a clean shutdown (exit status 0, connection file removed).

It prints a timing for every step and exits 0 only if every check passed. :class:`BackendProcess` and
:func:`collect` are reused by the tests and the transport benchmark.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from shared import protocol as P
from shared.client import CONNECTED, Client
from shared.connection import ConnectionFileError, read_connection_file

ROOT = Path(__file__).resolve().parents[1]


class BackendError(RuntimeError):
    """The backend subprocess did not start or stop as expected; the message includes its log tail."""


class BackendProcess:
    """``python -m backend serve`` in a subprocess, with its own connection file, store and log file."""

    def __init__(self, workdir: Path, *, profile: str = "tiny", device: str = "cpu", port: int = 0,
                 heartbeat_s: float = 1.0, extra_args: Optional[list[str]] = None, warm_up: bool = False,
                 wrap: Optional[list[str]] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.connection_file = self.workdir / "backend.json"
        self.store = self.workdir / "jobs"
        self.log_path = self.workdir / "backend.log"
        self.profile, self.device, self.port, self.heartbeat_s = profile, device, port, heartbeat_s
        self.extra_args = list(extra_args or [])
        self.warm_up = warm_up  # off by default: tests and the selftest only run the diagnostic workflow
        self.wrap = list(wrap or [])  # a command prefix that execs the backend (e.g. unshare to mount a store)
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self, timeout_s: float = 120.0) -> "BackendProcess":
        cmd = [*self.wrap, sys.executable, "-m", "backend", "serve", "--connection-file", str(self.connection_file),
               "--store", str(self.store), "--device", self.device, "--port", str(self.port),
               "--heartbeat", str(self.heartbeat_s), *self.extra_args]
        if not self.warm_up:
            cmd.append("--no-warm-up")
        if self.profile:
            cmd += ["--profile", self.profile]
        env = dict(os.environ)
        env["STEPSTONE_RUNTIME_DIR"] = str(self.workdir)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BackendError(f"the backend exited with status {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                info = read_connection_file(self.connection_file)
                if info.get("pid") == self.proc.pid:
                    return self
            except ConnectionFileError:
                pass
            time.sleep(0.05)
        self.kill()
        raise BackendError(f"the backend did not write {self.connection_file} within {timeout_s:.0f} s:\n"
                           + self.log_tail())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, *, wait_s: float = 30.0, **kw) -> Client:
        """A connected client (the welcome has arrived) for this backend.

        The liveness timeout defaults to 20 s (not the add-on's 5 s): tests and the selftest share busy CPUs with
        a starting backend, and a false "disconnected" there proves nothing."""
        kw.setdefault("timeout_s", 20.0)
        c = Client.from_connection_file(self.connection_file, **kw)
        c.connect()
        end = time.monotonic() + wait_s
        while c.state != CONNECTED and time.monotonic() < end:
            c.poll(50)
        if c.state != CONNECTED:
            raise BackendError(f"no welcome from the backend within {wait_s:.0f} s ({c.reason}):\n" + self.log_tail())
        return c

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.returncode is not None and self._log is not None:
                self._log.close()
                self._log = None

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL (a crash, as far as clients can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "BackendProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()


def collect(clients: Client | list[Client], until: Callable[[P.Message], bool], timeout_s: float = 60.0,
            ) -> list[P.Message]:
    """Poll ``clients`` until a message satisfies ``until`` (included) or ``timeout_s`` passes (TimeoutError).
    Messages that arrived after it in the same poll are left for the next poll."""
    cs = clients if isinstance(clients, list) else [clients]
    got: list[P.Message] = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for c in cs:
            batch = c.poll(20 if len(cs) == 1 else 5, time_budget_s=0.05)
            for i, m in enumerate(batch):
                got.append(m)
                if until(m):
                    c.unread(batch[i + 1:])  # what came after it is for the next collect
                    return got
    raise TimeoutError(f"timed out after {timeout_s:.0f} s; got {[m.kind for m in got][-20:]}")


def is_terminal_for(job: str) -> Callable[[P.Message], bool]:
    return lambda m: m.kind in P.TERMINAL_KINDS and m.fields.get("job") == job


def accepted_job(msgs: list[P.Message], ref: str) -> str:
    for m in msgs:
        if m.kind == P.ACCEPTED and m.fields.get("ref") == ref:
            return m.fields["job"]
        if m.kind == P.REJECTED and m.fields.get("ref") == ref:
            raise AssertionError(f"job rejected: {m.fields.get('message')}")
    raise AssertionError("no accepted message")


class _Report:
    def __init__(self) -> None:
        self.ok = True
        self.t0 = time.perf_counter()

    def check(self, name: str, cond: bool, detail: str = "", seconds: Optional[float] = None) -> bool:
        timing = f"{seconds * 1000:8.1f} ms" if seconds is not None else " " * 11
        print(f"  [{'PASS' if cond else 'FAIL'}] {timing}  {name}{(': ' + detail) if detail else ''}", flush=True)
        self.ok &= bool(cond)
        return bool(cond)


def run_selftest(profile: Optional[str], device: str, steps: int, resolution: int, workdir: Path) -> bool:
    import trimesh

    r = _Report()
    print(f"Stepstone selftest (python {sys.version.split()[0]}, work folder {workdir})", flush=True)
    t = time.perf_counter()
    backend = BackendProcess(workdir, profile=profile or "", device=device)
    try:
        backend.start()
        r.check("backend started and wrote its connection file", True,
                f"pid {backend.pid}", time.perf_counter() - t)
        mode = backend.connection_file.stat().st_mode & 0o777
        r.check("connection file is owner-only", mode == 0o600, oct(mode))

        t = time.perf_counter()
        client = backend.client(name="selftest")
        w = client.welcome or {}
        caps = w.get("capabilities", {})
        avail = [k for k, v in caps.items() if v.get("available")]
        r.check("handshake (hello -> welcome)", w.get("protocol") == P.PROTOCOL_VERSION,
                f"backend {w.get('backend_id')}, profile {w.get('profile')}, device {w.get('device')}, "
                f"workflows available: {', '.join(avail) or 'none'}", time.perf_counter() - t)
        t = time.perf_counter()
        client.ping()
        collect(client, lambda m: m.kind == P.PONG, 10)
        r.check("ping -> pong", True, "", time.perf_counter() - t)

        # 2. diagnostic job
        t = time.perf_counter()
        ref = client.submit("diagnostic", {"steps": steps, "resolution": resolution, "delay": 0.05})
        first_mesh = None
        msgs: list[P.Message] = []
        job = None
        end = time.monotonic() + 120
        while time.monotonic() < end:
            batch = client.poll(20, 0.05)
            msgs += batch
            if first_mesh is None and any(m.kind == P.MESH for m in batch):
                first_mesh = time.perf_counter() - t
            if job is None and any(m.kind in (P.ACCEPTED, P.REJECTED) for m in msgs):
                job = accepted_job(msgs, ref)
            if job and any(is_terminal_for(job)(m) for m in batch):
                break
        total = time.perf_counter() - t
        inter = [m for m in msgs if m.kind == P.MESH and not m.fields.get("final")]
        finals = [m for m in msgs if m.kind == P.MESH and m.fields.get("final")]
        done = [m for m in msgs if m.kind == P.DONE]
        r.check("diagnostic job accepted", job is not None, str(job))
        r.check("intermediate meshes streamed", len(inter) >= 1, f"{len(inter)} of {steps}", first_mesh)
        ok_final = len(finals) == 1 and bool(done)
        r.check("final mesh and done", ok_final, "", total)
        if not ok_final:
            errs = [m.fields for m in msgs if m.kind in (P.FAILED, P.ERROR, P.REJECTED)]
            print(f"    messages: {errs}\n{backend.log_tail()}")
            return False
        fm = finals[0]
        v, f, c = fm.arrays["vertices"], fm.arrays["faces"], fm.arrays.get("colors")
        tm = trimesh.Trimesh(v.astype(np.float64), f.astype(np.int64), process=False)
        r.check("final mesh is a closed surface with vertex colours",
                tm.is_watertight and c is not None and tm.volume > 0,
                f"{len(v):,} vertices, {len(f):,} faces, volume {tm.volume:.4f}")

        # 3. job store
        t = time.perf_counter()
        client.list_jobs()
        jm = collect(client, lambda m: m.kind == P.JOBS, 20)[-1]
        states = {j["job"]: j["state"] for j in jm.fields["jobs"]}
        r.check("job listed as done", states.get(job) == "done", "", time.perf_counter() - t)
        t = time.perf_counter()
        client.fetch(job)
        got = collect(client, lambda m: m.kind == P.MESH and m.fields.get("replay"), 30)
        rm = got[-1]
        same = (rm.arrays["vertices"].shape == v.shape and np.array_equal(rm.arrays["faces"], f)
                and np.allclose(rm.arrays["vertices"], v, atol=1e-6)
                and np.array_equal(rm.arrays["colors"][:, :3], c[:, :3]))
        r.check("final mesh fetched back from disk (GLB) equals the streamed one", same, "",
                time.perf_counter() - t)

        # 4. cancel + bad input
        t = time.perf_counter()
        ref = client.submit("diagnostic", {"steps": 200, "resolution": 16, "delay": 0.05})
        msgs = collect(client, lambda m: m.kind == P.MESH, 60)
        job2 = accepted_job(msgs, ref)
        client.cancel(job2)
        msgs = collect(client, is_terminal_for(job2), 30)
        r.check("running job cancelled", msgs[-1].kind == P.CANCELLED, "", time.perf_counter() - t)
        t = time.perf_counter()
        bad_v = np.array([[0, 0, 0], [1, 0, np.nan], [0, 1, 0]], np.float32)
        ref = client.submit("diagnostic", {}, meshes=[{"name": "bad", "vertices": bad_v,
                                                        "faces": np.array([[0, 1, 2]], np.uint32)}])
        msgs = collect(client, lambda m: m.kind in (P.REJECTED, P.ACCEPTED) and m.fields.get("ref") == ref, 20)
        rej = msgs[-1]
        r.check("mesh with NaN vertices rejected", rej.kind == P.REJECTED and "NaN" in rej.fields.get("message", ""),
                rej.fields.get("message", ""), time.perf_counter() - t)

        # 5. shutdown
        t = time.perf_counter()
        client.shutdown()
        try:
            # keep reading, as the add-on does: the backend waits for the client's answer to its `bye`
            collect(client, lambda m: m.kind == "disconnected", 30)
            code = backend.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        r.check("clean shutdown", code == 0 and not backend.connection_file.exists(), f"exit status {code}",
                time.perf_counter() - t)
        client.close()
    except Exception as exc:  # report, do not hide: the artist sends us this output
        r.check("selftest ran to the end", False, f"{type(exc).__name__}: {exc}")
        print(backend.log_tail())
    finally:
        backend.kill()
    print(f"selftest {'PASSED' if r.ok else 'FAILED'} in {time.perf_counter() - r.t0:.1f} s", flush=True)
    return r.ok


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend selftest", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="profile the backend loads (default: starter)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--resolution", type=int, default=48)
    p.add_argument("--keep", default=None, help="keep the work folder (backend log, job store) at this path")
    args = p.parse_args(argv)
    if args.keep:
        ok = run_selftest(args.profile, args.device, args.steps, args.resolution, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="stepstone-selftest-") as d:
            ok = run_selftest(args.profile, args.device, args.steps, args.resolution, Path(d))
    return 0 if ok else 1
