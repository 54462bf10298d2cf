"""Files in real Blender (``bpy`` 5.0.1): what the CLI and the job store write opens upright, in place and in the
same colours as the add-on's streamed mesh; a GLB exported by Blender comes back upright through stylize.

Three processes share one folder: Blender exports a known object (``files_in_blender.py export``); this process
runs the backend (a diagnostic job through the job manager, restarted; the CLI writing GLB/OBJ/PLY; stylize in
texture mode on Blender's GLB); a second Blender process imports every file with its stock importers and builds
the streamed arrays with the add-on's own mesh builder (``files_in_blender.py compare``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).with_name("files_in_blender.py")
ROOT = Path(__file__).resolve().parents[2]
DIAGNOSTIC = {"steps": 2, "resolution": 24}


def blender(folder: Path, *args) -> dict:
    result = folder / f"{args[0]}.json"
    env = dict(os.environ, HOME=str(folder / "home"))
    proc = subprocess.run([sys.executable, str(SCRIPT), args[0], *[str(a) for a in args[1:]], str(result)]
                          if args[0] == "export" else
                          [sys.executable, str(SCRIPT), args[0], str(args[1]), str(result), *map(str, args[2:])],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


def run_job_and_restart(store_root: Path) -> tuple[dict, Path]:
    """A diagnostic job through the real job manager; returns its streamed final arrays and, read by a second
    manager opened on the same store (a backend restart), the path of its GLB."""
    from backend.jobs import JobManager, JobStore
    from shared import protocol as P

    finals = {}

    def emit(job, kind, fields, arrays):
        if kind == P.MESH and fields.get("final"):
            finals[job] = {k: np.array(v) for k, v in arrays.items()}

    m1 = JobManager(JobStore(store_root), profile=None, device="cpu", backend_id="first", emit=emit)
    try:
        job = m1.submit("diagnostic", dict(DIAGNOSTIC), [])
        end = time.monotonic() + 120
        while m1.get(job.id).state != "done" and time.monotonic() < end:
            assert m1.get(job.id).state not in ("failed", "cancelled"), m1.get(job.id).error
            time.sleep(0.02)
    finally:
        m1.shutdown()
    m2 = JobManager(JobStore(store_root), profile=None, device="cpu", backend_id="second", emit=lambda *a: None)
    try:
        done = m2.get(job.id)
        assert done.state == "done"
        (record, mesh), = m2.store.load_result(done)
        stream = finals[job.id]
        # the restarted backend sends exactly what was streamed: same frame, same colours
        np.testing.assert_allclose(mesh.vertices, stream["vertices"], atol=1e-6)
        np.testing.assert_array_equal(mesh.colors[:, :3], stream["colors"][:, :3])
        return stream, m2.store.dir(job.id) / record["file"]
    finally:
        m2.shutdown()


@pytest.fixture(scope="module")
def trip(tmp_path_factory) -> dict:
    from backend.cli import main
    from backend.geometry.io import export_mesh, load_mesh

    folder = tmp_path_factory.mktemp("files_in_blender")
    t0 = time.perf_counter()
    exported = blender(folder, "export", folder / "blender_cone.glb")
    stream, store_glb = run_job_and_restart(folder / "store")
    np.savez(folder / "stream.npz", **stream)
    cli_glb = folder / "cli.glb"
    args = ["run", "diagnostic", "--steps", str(DIAGNOSTIC["steps"]), "--resolution", str(DIAGNOSTIC["resolution"]),
            "--profile", "tiny", "--device", "cpu"]
    assert main(args + ["--out", str(cli_glb)]) == 0
    others = [export_mesh(folder / f"cli{s}", stream["vertices"], stream["faces"], stream["colors"])
              for s in (".obj", ".ply")]
    read_back = load_mesh(folder / "blender_cone.glb")  # what stylize's CLI reads
    stylized = folder / "stylized.glb"
    assert main(["run", "stylize", "--mesh", str(folder / "blender_cone.glb"), "--style", "made of glacier ice",
                 "--mode", "texture", "--profile", "tiny", "--device", "cpu", "--iterations", "2", "--views", "1",
                 "--render-resolution", "24", "--grid-resolution", "24", "--out", str(stylized)]) == 0
    compared = blender(folder, "compare", folder / "stream.npz", cli_glb, store_glb, *others, stylized)
    return {"exported": exported, "compared": compared, "read_back": read_back, "seconds": time.perf_counter() - t0,
            "store_glb": store_glb.name}


def _box(info: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.array(info["bbox_min"]), np.array(info["bbox_max"])


def _same_box(a: dict, b: dict, rel: float = 0.01) -> None:
    (amin, amax), (bmin, bmax) = _box(a), _box(b)
    size = (bmax - bmin).max()
    assert np.allclose(amax - amin, bmax - bmin, rtol=rel, atol=rel * size), (a["name"], amax - amin, bmax - bmin)
    assert np.allclose(amin, bmin, atol=rel * size) and np.allclose(amax, bmax, atol=rel * size), (a["name"], amin, bmin)


@pytest.mark.parametrize("name", ["cli.glb", "store", "cli.obj", "cli.ply"])
def test_a_written_result_opens_like_the_streamed_one(trip, name):
    """Up axis, size and place (bounding box within 1%, every vertex within 1e-5) and mean colour within 2/255."""
    compared = trip["compared"]
    streamed = compared["streamed"]
    info = compared["files"][trip["store_glb"] if name == "store" else name]
    _same_box(info, streamed)
    assert info["max_vertex_distance"] < 1e-5
    if name != "cli.obj":  # Blender's OBJ importer turns Y-up into Z-up with the object's rotation
        assert np.allclose(info["rotation"], 0.0)  # upright in its geometry, not by an object rotation
    # the diagnostic torus lies flat: z is its thin axis, in the file as in the stream
    (lo, hi) = _box(info)
    assert (hi - lo)[2] < 0.5 * (hi - lo)[0]
    assert info["mean_srgb"] is not None, f"{name} has no colours in Blender"
    assert np.abs(np.array(info["mean_srgb"]) - streamed["mean_srgb"]).max() <= 2 / 255, (name, info["color_attribute"])


def test_a_glb_exported_by_blender_reads_upright_and_comes_back_unmoved_through_stylize(trip):
    known = trip["exported"]["known"]
    mesh = trip["read_back"]  # the backend's view of Blender's Y-up GLB: Z-up, in place, same colour
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    assert np.allclose(lo, known["bbox_min"], atol=1e-5) and np.allclose(hi, known["bbox_max"], atol=1e-5)
    assert np.abs(mesh.colors[:, :3].mean(axis=0) / 255 - np.array(trip["exported"]["known_srgb"])).max() <= 1 / 255
    stylized = trip["compared"]["files"]["stylized.glb"]
    _same_box(stylized, known)
    assert np.allclose(stylized["rotation"], 0.0)
    (slo, shi) = _box(stylized)
    assert (shi - slo)[2] > 1.5 * (shi - slo)[0]  # the cone still stands along Blender's Z
    assert stylized["mean_srgb"] is not None
