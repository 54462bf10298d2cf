"""Cancel within one second, at every stage of every workflow (issue 16), against a real backend process on real
ZeroMQ sockets (``--profile tiny`` on the CPU).

Each case submits a job whose stage under test is sized to run for several seconds in small inner steps, waits for
that stage's first progress event, sends ``cancel`` and measures the time from the request to the ``cancelled``
event. Issue 16's bound is 1 s; the test allows ``CANCEL_BOUND_S`` (1 s plus a fixed margin for a loaded 2-core
machine, which delays the backend's and this process's threads alike), and checks that the job had not finished
the stage on its own (it was cancelled inside it). The measured latencies are printed (``-s``).
"""

from __future__ import annotations

import base64
import io
import os
import time

import numpy as np
import pytest
import trimesh

from backend.selftest import BackendProcess, accepted_job, collect
from shared import protocol as P

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CANCEL_BOUND_S = float(os.environ.get("STEPSTONE_CANCEL_BOUND_S", "1.5"))  # 1 s + 0.5 s margin under load


def _mesh_payload(name: str, mesh: trimesh.Trimesh) -> dict:
    return {"name": name, "vertices": np.asarray(mesh.vertices, np.float32),
            "faces": np.asarray(mesh.faces, np.uint32), "matrix_world": None}


def _png(size: int = 64) -> str:
    from PIL import Image

    a = np.zeros((size, size, 3), np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


SPHERE = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
BOX = trimesh.creation.box(extents=(0.6, 0.4, 0.8))

SMOKE = {"render": {"views": 3, "resolution": 16, "sdf_resolution": 16, "n_samples": 12},
         "reference_views": 3, "finetune": {"iterations_single": 2, "iterations_multi": 3, "batch_size": 2},
         "concept": {"steps": 2}, "lift": {"steps": 2, "voxel_upsample": 2, "mesh_resolution": 16},
         "concept_prior": {"augmented_views": 2, "iterations": 2, "augment_steps": 4},
         "optimize": {"iterations": 2, "resolution": 16, "grid_resolution": 16, "n_samples": 12, "mesh_every": 1,
                      "preview_resolution": 16}, "score_views": 2, "score_resolution": 16}


def _gallery(**stage) -> dict:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SMOKE.items()}
    for k, v in stage.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return {"preset": "smoke", "count": 1, "subjects": ["tower"], "config": cfg}


STYLIZE_SMALL = {"style": "made of gold", "views": 2, "render_resolution": 48, "n_samples": 24, "grid_resolution": 48,
                 "eval_views": 1, "preview_every": 0, "chunk": 1024}

# (id, workflow, params, meshes, stage whose first progress triggers the cancel)
CASES = [
    ("stylize-prepare", "stylize", {**STYLIZE_SMALL, "grid_resolution": 160}, [("sphere", SPHERE)], "prepare"),
    ("stylize-texture", "stylize", {**STYLIZE_SMALL, "iterations": 2000}, [("sphere", SPHERE)], "texture"),
    ("stylize-shape", "stylize", {**STYLIZE_SMALL, "mode": "shape", "iterations": 2000}, [("sphere", SPHERE)],
     "shape-and-texture"),
    ("stylize-sds", "stylize", {**STYLIZE_SMALL, "mode": "sds", "iterations": 2000}, [("sphere", SPHERE)], "sds"),
    ("gallery-renders", "gallery", _gallery(render={"views": 400, "resolution": 48, "n_samples": 24},
                                            reference_views=400), [("box", BOX)], "renders"),
    ("gallery-finetune", "gallery", _gallery(finetune={"iterations_single": 5000}), [("box", BOX)],
     "theme fine-tune"),
    ("gallery-concepts", "gallery", _gallery(concept={"steps": 900}, count=4), [("box", BOX)], "concept images"),
    ("gallery-lift", "gallery", _gallery(lift={"method": "svr", "mesh_resolution": 256}), [("box", BOX)],
     "initial model"),
    ("gallery-concept-prior", "gallery", _gallery(concept_prior={"iterations": 5000}), [("box", BOX)],
     "concept prior"),
    ("gallery-dsd", "gallery", _gallery(optimize={"iterations": 5000}), [("box", BOX)], "dual score distillation"),
    ("gallery-final-mesh", "gallery", _gallery(optimize={"grid_resolution": 256}), [("box", BOX)], "final mesh"),
    ("stylize-final-remesh", "stylize", {**STYLIZE_SMALL, "mode": "shape", "iterations": 1, "grid_resolution": 64,
                                         "output_resolution": 320}, [("sphere", SPHERE)], "shape-and-texture"),
    ("text-to-shape-stage2", "text-to-shape", {"prompt": "a chair", "iterations": 1000, "views": 1,
                                               "render_resolution": 24, "n_samples": 12, "resolution": 32,
                                               "preview_every": 1000}, [], None),
    # issue 16: cancelled while xatlas unwraps a 50k-face result in its child process (or while it is baked)
    ("text-to-shape-uv-texture", "text-to-shape", {"prompt": "a chair", "iterations": 1, "views": 1,
                                                   "render_resolution": 24, "n_samples": 12, "resolution": 128,
                                                   "texture_iterations": 0, "preview_every": 1000,
                                                   "uv_texture": True, "texture_faces": 50000,
                                                   "texture_size": 2048}, [], "texture"),
    ("image-to-shape-lift", "image-to-shape", {"image_png": _png(), "method": "svr",
                                               "config": {"mesh_resolution": 256}}, [], "lift"),
]


def _fix_count(params: dict) -> dict:
    cfg = params.get("config") or {}
    if "count" in cfg:  # the gallery's count is a job option, not a stage size
        params = {**params, "count": cfg["count"], "config": {k: v for k, v in cfg.items() if k != "count"}}
    return params


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with BackendProcess(tmp_path_factory.mktemp("cancel-backend"), heartbeat_s=0.5, warm_up=True) as b:
        yield b


@pytest.fixture(scope="module")
def client(backend):
    c = backend.client(name="cancel-test")
    yield c
    c.close()


def _cancel_at(client, workflow: str, params: dict, meshes: list, stage) -> dict:
    ref = client.submit(workflow, _fix_count(params), [_mesh_payload(n, m) for n, m in meshes] or None)
    msgs = collect(client, lambda m: (m.kind in (P.ACCEPTED, P.REJECTED) and m.fields.get("ref") == ref), 120)
    job = accepted_job(msgs, ref)
    seen: list[str] = []

    def at_stage(m) -> bool:
        if m.fields.get("job") != job:
            return False
        if m.kind in P.TERMINAL_KINDS:
            raise AssertionError(f"job ended ({m.kind}: {m.fields}) before reaching stage {stage!r}; saw {seen}")
        if m.kind == P.PROGRESS:
            seen.append(m.fields.get("stage"))
            return stage is None and m.fields.get("step", 0) >= 1 or m.fields.get("stage") == stage
        return False

    collect(client, at_stage, 300)
    time.sleep(0.3)  # well inside the stage's work, not at its first line
    t0 = time.monotonic()
    client.cancel(job)
    last_stage = {"stage": seen[-1] if seen else None}

    def terminal(m) -> bool:
        if m.fields.get("job") != job:
            return False
        if m.kind == P.PROGRESS:
            last_stage["stage"] = m.fields.get("stage")
        return m.kind in P.TERMINAL_KINDS

    end = collect(client, terminal, 120)[-1]
    latency = time.monotonic() - t0
    return {"job": job, "kind": end.kind, "fields": end.fields, "latency": latency, "stage_at_end":
            last_stage["stage"]}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cancel_within_a_second_at_every_stage(client, backend, case):
    name, workflow, params, meshes, stage = case
    out = _cancel_at(client, workflow, params, meshes, stage)
    print(f"\ncancel {name}: {out['latency'] * 1000:.0f} ms ({out['kind']})")
    assert out["kind"] == P.CANCELLED, f"{name}: ended {out['kind']} {out['fields']}\n{backend.log_tail()}"
    if stage is not None:
        assert out["stage_at_end"] == stage, f"{name}: the stage ended on its own before the cancel took effect"
    assert out["latency"] <= CANCEL_BOUND_S, f"{name}: cancelled after {out['latency']:.2f} s"


def test_cancellable_native_call_stops_waiting_when_the_job_is_cancelled():
    """``events.cancellable``: a long call that cannot check the token itself (SciPy's distance transform) runs on
    a helper thread; the job's thread raises Cancelled as soon as the token is set, without waiting for the call.
    Outside a job, and when not cancelled, it is the plain call with its result or its exception."""
    import threading

    import pytest

    from backend.events import CancelToken, Cancelled, cancellable, set_current_cancel

    assert cancellable(lambda a, b=1: a + b, 2, b=3) == 5  # no job: a plain call
    release = threading.Event()
    tok = CancelToken()
    set_current_cancel(tok)
    try:
        assert cancellable(lambda: 7) == 7
        with pytest.raises(ValueError, match="bad"):
            cancellable(lambda: (_ for _ in ()).throw(ValueError("bad")))
        threading.Timer(0.2, tok.cancel).start()
        with pytest.raises(Cancelled):
            cancellable(release.wait, 60)  # would block for a minute; the cancel ends the wait instead
    finally:
        set_current_cancel(None)
        release.set()
