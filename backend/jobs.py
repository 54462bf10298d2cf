"""Jobs: a queue, ONE worker thread for GPU work, cancellation in every state, and the job store on disk.

DESIGN.md, "Nothing lost": every job gets a folder ``<store>/<job id>/`` holding

* ``request.json``  the workflow, the normalised params and the input meshes' names/matrices (arrays in
  ``inputs.npz``, plain arrays, loaded with ``allow_pickle=False``);
* ``events.jsonl``  one JSON line per event (state changes, progress, mesh metadata, errors);
* ``<name>.glb``    every final mesh, written BEFORE ``done`` is reported;
* ``status.json``   the current state, error and result list (rewritten atomically).

A backend that starts on an existing store reloads it; jobs left ``queued``/``running`` by a previous run are
marked ``failed`` with the reason, so nothing silently disappears.

The manager knows nothing of sockets: it reports events through an ``emit(job_id, kind, fields, arrays)``
callback (kinds from :mod:`shared.protocol`), called from the worker thread or from the caller's thread.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from backend.errors import Cancelled, InputError, ModelUnavailable, StepstoneError
from backend.events import CancelToken, Image, JobContext, MeshInput, MeshUpdate, Progress, set_current_cancel
from shared import protocol as P
from shared.atomic import fsync_dir, write_atomic
from shared.mesh import as_mesh_arrays

log = logging.getLogger("stepstone.jobs")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
DAMAGED = "damaged"  # a job folder that cannot be read back (listed with what is wrong; never hidden)
TERMINAL = frozenset({DONE, FAILED, CANCELLED, DAMAGED})
STATES = frozenset({QUEUED, RUNNING, DONE, FAILED, CANCELLED})

Emit = Callable[[str, str, dict, Optional[dict]], None]


def default_store_dir() -> Path:
    """``$STEPSTONE_STORE_DIR``, else ``$STEPSTONE_RUNTIME_DIR/jobs``, else ``$XDG_DATA_HOME/stepstone/jobs``
    (``~/.local/share/stepstone/jobs``): a folder that survives logouts, unlike the runtime folder."""
    if os.environ.get("STEPSTONE_STORE_DIR"):
        return Path(os.environ["STEPSTONE_STORE_DIR"]).expanduser()
    if os.environ.get("STEPSTONE_RUNTIME_DIR"):
        return Path(os.environ["STEPSTONE_RUNTIME_DIR"]).expanduser() / "jobs"
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "stepstone" / "jobs"


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A file-name-safe version of a mesh slot name."""
    s = _SAFE.sub("_", name).strip("._") or "result"
    return s[:80]


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda fh: fh.write(json.dumps(data, indent=1, default=str).encode("utf-8")))


@dataclass
class Job:
    """One job: its request, its state and where it stands."""

    id: str
    workflow: str
    params: dict
    inputs: list = field(default_factory=list)
    owner: Optional[str] = None  # client id that submitted it
    ref: str = ""  # the submit message id
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[dict] = None  # {"code", "message"}
    results: list = field(default_factory=list)  # [{"name", "file", "vertices", "faces", "info"}]
    backend_id: str = ""
    seq: int = 0
    preset: Optional[str] = None  # the quality preset it runs at (backend.presets), None where there are none
    cancel: CancelToken = field(default_factory=CancelToken)

    def summary(self) -> dict:
        return {
            "job": self.id,
            "ref": self.ref,  # the submit's message id: lets a client that missed `accepted` find its job
            "workflow": self.workflow,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "results": [r["name"] for r in self.results],
            "backend_id": self.backend_id,
            "params": self.params,
            "preset": self.preset,
        }


class JobStore:
    """The on-disk side of jobs (see the module docstring). Folders are 0700 and files 0600 (prompts and meshes
    are the artist's own); every file is written atomically (:func:`write_atomic`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise self.unwritable(exc) from None
        try:
            if self.root.stat().st_uid == os.getuid() and self.root.stat().st_mode & 0o077:
                os.chmod(self.root, 0o700)
        except OSError:  # a read-only store: reported when a job must be written
            pass

    def unwritable(self, exc: OSError) -> StepstoneError:
        """The clear refusal for a store that cannot be written."""
        what = {errno.ENOSPC: "full", errno.EDQUOT: "full (quota)", errno.EROFS: "read-only",
                errno.EACCES: "not writable", errno.EPERM: "not writable"}.get(exc.errno or 0, "unusable")
        fix = "free some space" if what.startswith("full") else "make it writable"
        return StepstoneError(f"the job store at {self.root} is {what}: {exc.strerror or exc}; {fix}, or start the "
                              "backend with --store pointing at a writable folder",
                              code="store_unavailable")

    def dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id):
            raise InputError(f"malformed job id {str(job_id)[:80]!r}")
        return self.root / job_id

    def discard(self, job_id: str) -> None:
        """Remove a job folder that could not be completed (best effort)."""
        shutil.rmtree(self.dir(job_id), ignore_errors=True)

    def create(self, job: Job) -> None:
        d = self.dir(job.id)
        d.mkdir(parents=True, exist_ok=False, mode=0o700)
        request = {
            "job": job.id,
            "workflow": job.workflow,
            "params": job.params,
            "owner": job.owner,
            "ref": job.ref,
            "created": job.created,
            "backend_id": job.backend_id,
            "inputs": [
                {"name": m.name, "matrix_world": None if m.matrix_world is None else np.asarray(m.matrix_world).tolist()}
                for m in job.inputs
            ],
        }
        _write_json_atomic(d / "request.json", request)
        if job.inputs:
            arrays = {}
            for i, m in enumerate(job.inputs):
                arrays[f"{i}_vertices"] = m.vertices
                arrays[f"{i}_faces"] = m.faces
                if m.colors is not None:
                    arrays[f"{i}_colors"] = m.colors
            write_atomic(d / "inputs.npz", lambda fh: np.savez(fh, **arrays))
        self.write_status(job)
        self.log(job.id, {"event": "state", "state": job.state})

    def write_status(self, job: Job) -> None:
        status = job.summary()
        status["results"] = job.results
        _write_json_atomic(self.dir(job.id) / "status.json", status)

    def log(self, job_id: str, record: dict) -> None:
        line = (json.dumps({"t": time.time(), **record}, default=str) + "\n").encode("utf-8")
        fd = os.open(str(self.dir(job_id) / "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def write_mesh(self, job: Job, ev: MeshUpdate, texture: Optional[bytes] = None) -> dict:
        """The final mesh as ``<name>.glb`` (with its UV map and ``texture``, a PNG, when it has them)."""
        from backend.geometry.io import export_mesh

        fname = safe_name(ev.name) + ".glb"
        d = self.dir(job.id)
        tmp = d / f".tmp-{uuid.uuid4().hex[:8]}.glb"
        try:
            export_mesh(tmp, ev.vertices, ev.faces, ev.colors, uvs=ev.uvs, texture=texture)
            os.chmod(tmp, 0o600)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, d / fname)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(d)
        return {"name": ev.name, "file": fname, "vertices": int(len(ev.vertices)), "faces": int(len(ev.faces)),
                "info": _jsonable(ev.info)}

    def write_image(self, job: Job, index: int, im: Image) -> str:
        fname = f"image_{index:03d}_{safe_name(im.label)[:40]}.png"
        write_atomic(self.dir(job.id) / fname, lambda fh: fh.write(im.png))
        return fname

    def load_all(self) -> list[Job]:
        """Every job folder of the store. One that cannot be read back comes as a job in state ``damaged`` whose
        error says what is wrong (it is never skipped silently, and never stops the others from loading)."""
        jobs = []
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:
            log.error("cannot list the job store %s: %s", self.root, exc)
            return []
        for d in entries:
            if d.name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", d.name) or not d.is_dir():
                continue
            try:
                jobs.append(self._load(d))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                what = str(exc) if isinstance(exc, _Damage) else f"{type(exc).__name__}: {exc}"
                log.warning("damaged job folder %s: %s", d, what)
                jobs.append(self._damaged(d, what))
        return jobs

    def _load(self, d: Path) -> Job:
        st = d / "status.json"
        if not st.is_file():
            raise _Damage("status.json is missing")
        try:
            s = json.loads(st.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise _Damage(f"status.json is not valid JSON ({exc}); the file is truncated or corrupt") from None
        if not isinstance(s, dict):
            raise _Damage("status.json does not hold an object")
        problems = []
        if s.get("job") != d.name:
            problems.append(f"its job id {str(s.get('job'))[:40]!r} is not the folder's name")
        if not isinstance(s.get("workflow"), str):
            problems.append("'workflow' is not a name")
        if s.get("state") not in STATES:
            problems.append(f"'state' {str(s.get('state'))[:40]!r} is not a job state")
        results = s.get("results") or []
        if not isinstance(results, list) or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("file"), str)
                and safe_name(r["file"]) == r["file"] for r in results):
            problems.append("'results' is not a list of {name, file} records")
        for key in ("created", "started", "finished"):
            if s.get(key) is not None and (isinstance(s[key], bool) or not isinstance(s[key], (int, float))):
                problems.append(f"'{key}' is not a time")
        if s.get("error") is not None and not isinstance(s.get("error"), dict):
            problems.append("'error' is not an object")
        if s.get("params") is not None and not isinstance(s.get("params"), dict):
            problems.append("'params' is not an object")
        if problems:
            raise _Damage("status.json: " + "; ".join(problems))
        ref = s.get("ref")
        if not isinstance(ref, str):
            ref = self._request_field(d, "ref")
        return Job(id=d.name, workflow=s["workflow"], params=s.get("params") or {}, state=s["state"],
                   created=s.get("created") or 0.0, started=s.get("started"), finished=s.get("finished"),
                   error=s.get("error"), results=results, backend_id=str(s.get("backend_id") or ""),
                   ref=ref if isinstance(ref, str) else "", owner=self._request_field(d, "owner"))

    @staticmethod
    def _request_field(d: Path, key: str) -> Any:
        try:
            v = json.loads((d / "request.json").read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            return None
        return v if isinstance(v, str) else None

    def _damaged(self, d: Path, what: str) -> Job:
        workflow = self._request_field(d, "workflow") or "?"
        try:
            created = d.stat().st_mtime
        except OSError:
            created = 0.0
        return Job(id=d.name, workflow=workflow, params={}, state=DAMAGED, created=created, finished=created,
                   ref=self._request_field(d, "ref") or "", owner=self._request_field(d, "owner"),
                   error={"code": "damaged", "message": f"job folder {d} is damaged: {what}"})

    def load_result(self, job: Job) -> list[tuple[dict, MeshInput]]:
        """The stored final meshes; a textured one comes with its per-corner ``uvs`` and ``texture`` PNG."""
        from backend.geometry.io import load_mesh

        out = []
        for r in job.results:
            path = self.dir(job.id) / r["file"]
            out.append((r, load_mesh(path, name=r["name"], textures=True)))
        return out


_STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class _Damage(ValueError):
    """What is wrong with a job folder."""


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist() if v.size <= 64 else f"<array {v.shape}>"
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = repr(v)
        out[str(k)] = v
    return out


class JobManager:
    """Queue + one worker thread; see the module docstring.

    ``profile`` is a :class:`backend.models.registry.Profile` (or None for workflows that need no models).
    """

    def __init__(self, store: JobStore, *, profile: Any, device: str, backend_id: str, emit: Emit,
                 seed: int = 0, precision: str = "auto") -> None:
        self.store = store
        self.profile = profile
        self.device = device
        self.precision = precision
        self.backend_id = backend_id
        self.emit = emit
        self.seed = seed
        self.jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._shutdown_reason = ""
        self._current: Optional[Job] = None
        self.timings: dict[str, float] = self._load_timings()  # "profile/workflow/preset" -> seconds, measured here
        self._reload()
        self._worker = threading.Thread(target=self._work, name="stepstone-gpu-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------ timings
    TIMINGS_FILE = ".timings.json"

    def _load_timings(self) -> dict[str, float]:
        try:
            data = json.loads((self.store.root / self.TIMINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def timing_key(self, workflow: str, preset: str) -> str:
        return f"{getattr(self.profile, 'name', 'none')}/{self.device}/{workflow}/{preset}"

    def _record_timing(self, job: Job) -> None:
        """Remember how long a finished job took at its preset on this backend (the panel shows it next to the
        preset: "measured and remembered per backend", issue 16)."""
        if not job.preset or not job.started or not job.finished:
            return
        key = self.timing_key(job.workflow, job.preset)
        took = job.finished - job.started
        old = self.timings.get(key)
        self.timings[key] = took if old is None else 0.5 * (old + took)
        try:
            _write_json_atomic(self.store.root / self.TIMINGS_FILE, self.timings)
        except OSError as exc:
            log.warning("could not remember job timings: %s", exc)

    # ------------------------------------------------------------------------------------------------ store
    def _reload(self) -> None:
        for job in self.store.load_all():
            if job.state == DAMAGED:
                self.jobs[job.id] = job
                continue
            if job.state not in TERMINAL:
                old = job.backend_id or "unknown"
                job.state = FAILED
                job.finished = time.time()
                job.error = {
                    "code": "backend_restarted",
                    "message": f"the backend (run {old}) stopped before this job finished; submit it again",
                }
                try:
                    self.store.write_status(job)
                    self.store.log(job.id, {"event": "state", "state": FAILED, "error": job.error})
                except OSError as exc:  # a read-only or full store: the job is failed here all the same
                    log.warning("job %s of a previous run is failed, but the store cannot record it: %s",
                                job.id, self.store.unwritable(exc).message)
                log.info("job %s of a previous run marked failed", job.id)
            self.jobs[job.id] = job
        if self.jobs:
            log.info("job store %s: %d jobs reloaded", self.store.root, len(self.jobs))

    # ------------------------------------------------------------------------------------------------ API
    def validate(self, workflow: str, params: dict, inputs: list[MeshInput]) -> dict:
        """Import the workflow, check the profile can run it, and return its normalised params (or raise).

        May import torch and the workflow's modules: the server calls it off its socket thread. Parameters go
        through :func:`backend.intake.parse_params` first; a workflow's ``validate`` that still fails with
        something other than a StepstoneError is turned into an InputError (and logged: it is a bug there)."""
        return self.validate_with_preset(workflow, params, inputs)[0]

    def validate_with_preset(self, workflow: str, params: dict, inputs: list[MeshInput]) -> tuple[dict, Optional[str]]:
        """:meth:`validate`, and the quality preset the job runs at (:mod:`backend.presets`; None: no presets)."""
        from backend.intake import check_resources, parse_params
        from backend.pipelines import get_workflow
        from backend.presets import apply_preset, check_memory, memory_budget

        if not isinstance(workflow, str):
            raise InputError("submit needs a 'workflow' name")
        params = parse_params(workflow, params)
        budget = memory_budget(self.device) if workflow in ("stylize", "text-to-shape", "gallery") else None
        params, preset = apply_preset(workflow, params, self.device, budget)
        try:
            wf = get_workflow(workflow)
        except ImportError as exc:
            raise ModelUnavailable(f"workflow {workflow!r} is not available in this build ({exc})") from None
        if self.profile is not None:
            caps = self.profile.capabilities().get(workflow)
            if caps is not None and not caps.get("available", True):
                raise ModelUnavailable(
                    f"workflow {workflow!r} cannot run with profile {getattr(self.profile, 'name', '?')!r}: "
                    f"{caps.get('reason', '')}"
                )
        try:
            out = wf.validate(dict(params), inputs, profile=self.profile)
        except StepstoneError:
            raise
        except Exception as exc:
            log.warning("%s: validate failed on its parameters:\n%s", workflow, traceback.format_exc())
            raise InputError(f"{workflow}: the backend could not read these options (its log has the details); "
                             f"check them against `python -m backend run {workflow} --help`, or leave the advanced "
                             "options out") from None
        check_resources(workflow, out, self.device)
        check_memory(workflow, {**out, "exemplars": len(inputs)} if workflow == "gallery" else out, preset,
                     self.device, budget)
        return out, preset

    def submit(self, workflow: str, params: dict, inputs: list[MeshInput], *, owner: Optional[str] = None,
               ref: str = "") -> Job:
        """Validate and queue a job (raises StepstoneError when it cannot run). Its folder exists on return."""
        out, preset = self.validate_with_preset(workflow, params, inputs)
        return self.enqueue(workflow, out, inputs, owner=owner, ref=ref, preset=preset)

    def enqueue(self, workflow: str, params: dict, inputs: list[MeshInput], *, owner: Optional[str] = None,
                ref: str = "", preset: Optional[str] = None) -> Job:
        """Queue a job whose params :meth:`validate` has normalised. Raises StepstoneError when the backend is
        stopping or the job store cannot take it (full, read-only): a clear refusal, nothing half-made."""
        with self._cv:
            if self._stopping:
                raise StepstoneError("the backend is shutting down; submit again after it restarts",
                                     code="shutting_down")
            job = Job(id=new_job_id(), workflow=workflow, params=params, inputs=list(inputs), owner=owner, ref=ref,
                      backend_id=self.backend_id, preset=preset)
            try:
                self.store.create(job)
            except OSError as exc:
                self.store.discard(job.id)
                raise self.store.unwritable(exc) from None
            self.jobs[job.id] = job
            self._queue.append(job)
            self._cv.notify_all()
        log.info("job %s queued: %s %s", job.id, workflow, _short(params))
        return job

    def position(self, job: Job) -> int:
        with self._cv:
            try:
                return list(self._queue).index(job) + (1 if self._current is not None else 0)
            except ValueError:
                return 0

    def get(self, job_id: str) -> Optional[Job]:
        return self.jobs.get(job_id)

    def list(self) -> list[dict]:
        with self._cv:
            return [j.summary() for j in sorted(self.jobs.values(), key=lambda j: (j.created, j.id))]

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        """Cancel in any state. Returns ``"cancelled"`` (was queued; ended now), ``"cancelling"`` (running: ends
        at the pipeline's next check point) or ``"finished"`` (it had already ended; nothing changes). Unknown ids
        raise InputError."""
        with self._cv:
            job = self.jobs.get(job_id)
            if job is None:
                raise InputError(f"no job with id {job_id!r} (list the jobs to see which exist)")
            if job.state == QUEUED:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                self._finish(job, CANCELLED, reason=reason)
                return CANCELLED
            if job.state == RUNNING:
                job.cancel.cancel(reason)
                return "cancelling"
            return "finished"

    def shutdown(self, reason: str = "the backend was shut down before this job finished",
                 timeout_s: float = 10.0) -> None:
        """Stop accepting work, fail queued jobs, stop the running one and wait for it (``timeout_s``).

        A running job ends at its next cancellation check. If it has not within ``timeout_s``, it is failed now
        (its terminal event is decided and emitted); :meth:`join_worker` then waits for the thread itself."""
        with self._cv:
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                self._finish(job, FAILED, error={"code": "backend_shutdown", "message": reason})
            if self._current is not None:
                self._current.cancel.cancel(reason)
            self._cv.notify_all()
        self._shutdown_reason = reason
        if timeout_s > 0:
            self._worker.join(timeout_s)
            self.fail_running()

    def fail_running(self) -> None:
        """After :meth:`shutdown`: a job still running (it has not reached a cancellation check yet) is failed now,
        so its terminal event goes out before the sockets close; the worker thread finishes it silently later."""
        if not self._worker.is_alive():
            return
        with self._cv:
            cur = self._current
            if cur is not None and cur.state not in TERMINAL:
                log.warning("job %s did not stop in time; failing it now", cur.id)
                self._finish(cur, FAILED, error={"code": "backend_shutdown", "message": self._shutdown_reason})

    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    def join_worker(self, give_up: Optional[threading.Event] = None, report_every_s: float = 10.0) -> bool:
        """Wait for the worker thread to end (after :meth:`shutdown`), however long the running pipeline takes to
        reach its next cancellation check, unless ``give_up`` is set. Returns whether the thread ended."""
        waited = 0.0
        while self._worker.is_alive():
            if give_up is not None and give_up.is_set():
                return False
            self._worker.join(0.1)
            waited += 0.1
            if waited >= report_every_s:
                waited = 0.0
                cur = self._current
                log.warning("still waiting for job %s to reach its next cancellation check",
                            cur.id if cur is not None else "?")
        return True

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._cv:
                if not self._queue and self._current is None:
                    return True
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------------------------------------ worker
    def _finish(self, job: Job, state: str, *, error: Optional[dict] = None, reason: str = "") -> bool:
        """Move ``job`` to a terminal state exactly once, persist it, then emit the terminal event."""
        if job.state in TERMINAL:
            return False
        job.state = state
        job.finished = time.time()
        job.error = error
        job.inputs = []
        try:
            self.store.write_status(job)
            self.store.log(job.id, {"event": "state", "state": state, "error": error, "reason": reason})
        except OSError as exc:  # the store is full or gone: still tell the client
            log.error("could not persist job %s: %s", job.id, exc)
        if state == DONE:
            self._record_timing(job)
            elapsed = (job.finished - job.started) if job.started else 0.0
            self.emit(job.id, P.DONE, {"job": job.id, "results": [r["name"] for r in job.results],
                                       "elapsed_s": elapsed}, None)
        elif state == CANCELLED:
            self.emit(job.id, P.CANCELLED, {"job": job.id, "reason": reason}, None)
        else:
            self.emit(job.id, P.FAILED, {"job": job.id, **(error or {"code": "error", "message": "failed"})}, None)
        log.info("job %s %s%s", job.id, state, f": {error['message']}" if error else "")
        return True

    def _work(self) -> None:
        """The worker loop: a job may fail, the worker never dies (nothing below may end this loop but a stop)."""
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft()
                self._current = job
                job.state = RUNNING
                job.started = time.time()
            try:
                try:
                    self.store.write_status(job)
                    self.store.log(job.id, {"event": "state", "state": RUNNING})
                except OSError as exc:
                    with self._cv:
                        self._finish(job, FAILED, error=self._store_error(exc))
                    continue
                self._run(job)
            except Exception as exc:  # a bug in the bookkeeping itself: fail the job, keep the worker
                log.error("worker: job %s:\n%s", job.id, traceback.format_exc())
                try:
                    with self._cv:
                        self._finish(job, FAILED, error=crash_error(exc, job, None))
                except Exception:
                    log.exception("worker: could not even fail job %s", job.id)
            finally:
                with self._cv:
                    self._current = None

    def _store_error(self, exc: OSError) -> dict:
        err = self.store.unwritable(exc)
        return {"code": err.code, "message": err.message}

    def _run(self, job: Job) -> None:
        from backend.pipelines import get_workflow

        seed = job.params.get("seed")
        ctx = JobContext(profile=self.profile, device=self.device, cancel=job.cancel, precision=self.precision,
                         seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else self.seed,
                         workdir=str(self.store.dir(job.id) / "work"))
        gen = None
        n_images = 0
        textures: dict[str, bytes] = {}  # images by label: a final mesh's info["texture"] names its texture
        set_current_cancel(job.cancel)  # inner loops (renderer chunks, sampler steps) check it: cancel within 1 s
        try:
            wf = get_workflow(job.workflow)
            gen = wf.run(job.params, job.inputs, ctx)
            for ev in gen:
                job.cancel.check()
                if isinstance(ev, Progress):
                    fields = {"job": job.id, "stage": ev.stage, "step": int(ev.step), "total": int(ev.total),
                              "message": ev.message}
                    self.store.log(job.id, {"event": "progress", **fields})
                    self.emit(job.id, P.PROGRESS, fields, None)
                elif isinstance(ev, MeshUpdate):
                    job.seq += 1
                    arrays = as_mesh_arrays(ev.vertices, ev.faces, ev.colors, ev.normals, ev.uvs)
                    info = _jsonable(ev.info)
                    fields = {"job": job.id, "seq": job.seq, "final": bool(ev.final), "name": ev.name, "info": info}
                    self.emit(job.id, P.MESH, fields, arrays)
                    if ev.final:
                        tex = textures.get(str(ev.info.get("texture"))) if ev.uvs is not None else None
                        rec = self.store.write_mesh(job, ev, tex)  # on disk before `done`
                        job.results = [r for r in job.results if r["name"] != ev.name] + [rec]
                        self.store.write_status(job)
                    self.store.log(job.id, {"event": "mesh", "seq": job.seq, "name": ev.name, "final": ev.final,
                                            "vertices": len(ev.vertices), "faces": len(ev.faces), "info": info})
                elif isinstance(ev, Image):
                    textures[ev.label] = ev.png
                    fname = self.store.write_image(job, n_images, ev)
                    n_images += 1
                    self.store.log(job.id, {"event": "image", "label": ev.label, "file": fname})
                    self.emit(job.id, P.IMAGE, {"job": job.id, "label": ev.label},
                              {"png": np.frombuffer(ev.png, dtype=np.uint8)})
                else:
                    log.warning("job %s: ignoring unknown event %r", job.id, type(ev).__name__)
            job.cancel.check()
        except Cancelled as exc:
            with self._cv:
                if self._stopping:
                    self._finish(job, FAILED, error={"code": "backend_shutdown", "message": exc.message})
                else:
                    self._finish(job, CANCELLED, reason=exc.message)
            return
        except StepstoneError as exc:
            with self._cv:
                self._finish(job, FAILED, error={"code": exc.code, "message": exc.message})
            return
        except OSError as exc:
            if exc.errno in _STORE_ERRNOS or str(exc.filename or "").startswith(str(self.store.root)):
                with self._cv:
                    self._finish(job, FAILED, error=self._store_error(exc))
                return
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            with self._cv:
                self._finish(job, FAILED, error=crash_error(exc, job, self.store.dir(job.id)))
            return
        except Exception as exc:  # a bug: the artist gets a message, the log gets the traceback
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            with self._cv:
                self._finish(job, FAILED, error=crash_error(exc, job, self.store.dir(job.id)))
            return
        finally:
            set_current_cancel(None)
            if gen is not None and hasattr(gen, "close"):
                try:
                    gen.close()
                except Exception:  # pragma: no cover - a generator failing in its cleanup
                    log.exception("job %s: error while closing the pipeline", job.id)
        with self._cv:
            self._finish(job, DONE)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text or \
        "cannot allocate memory" in text or "defaultcpuallocator" in text


def crash_error(exc: BaseException, job: "Job", folder: Optional[Path]) -> dict:
    """The ``failed`` event of a job that raised something other than a StepstoneError: a sentence the artist can
    act on (never the raw exception; that is in the backend log with its traceback)."""
    preset = f" at the {job.preset.capitalize()} preset" if job.preset else ""
    if _is_out_of_memory(exc):
        smaller = {"paper": "Standard", "standard": "Draft"}.get(job.preset or "", "")
        fix = f"Choose the {smaller} preset" if smaller else "Lower the resolution or the number of views"
        return {"code": "out_of_memory",
                "message": f"The backend ran out of memory while running {job.workflow}{preset}. {fix}, or close "
                           "other programs on the backend's machine, and run it again."}
    where = f" (the backend log and {folder} have the details)" if folder is not None else \
        " (the backend log has the details)"
    return {"code": "internal",
            "message": f"{job.workflow} stopped because of a problem inside the backend{where}. Run it again; if it "
                       "fails the same way, restart the backend or report the log."}


def _short(params: dict, n: int = 200) -> str:
    s = json.dumps(params, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."
