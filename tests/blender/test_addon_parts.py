"""The add-on's Blender-free parts and the build: mesh preparation, job records, local backend, extension zip."""

from __future__ import annotations

import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from blender_addon.jobs import JobRecord, grid_columns, grid_offset  # noqa: E402
from blender_addon.local_backend import BackendStartError, LocalBackend, guess_backend_dir  # noqa: E402
from blender_addon.meshprep import MeshError, colors_to_linear_rgba, prepare_mesh, srgb_to_linear, triangle_edges  # noqa: E402


def test_triangle_edges_of_a_tetrahedron():
    faces = np.array([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]], dtype=np.uint32)
    ev, ce = triangle_edges(faces, 4)
    assert ev.shape == (6, 2) and ev.dtype == np.int32 and ce.shape == (12,) and ce.dtype == np.int32
    assert {tuple(sorted(e)) for e in ev.tolist()} == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    # corner 3f+k runs from faces[f,k] to faces[f,(k+1)%3] (Blender's .corner_edge convention)
    for f in range(4):
        for k in range(3):
            a, b = int(faces[f, k]), int(faces[f, (k + 1) % 3])
            assert sorted(ev[ce[3 * f + k]].tolist()) == sorted([a, b])


def test_prepare_mesh_layout_and_colours():
    v = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    f = np.array([[0, 1, 2], [2, 3, 4]], dtype=np.uint32)
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [255, 255, 255]], dtype=np.uint8)
    p = prepare_mesh("m", v, f, c)
    assert (p.n_vertices, p.n_faces, p.n_edges, p.n_corners) == (5, 2, 6, 6)
    assert p.positions.shape == (15,) and p.positions.dtype == np.float32
    np.testing.assert_array_equal(p.loop_starts, [0, 3])
    np.testing.assert_array_equal(p.corner_verts, f.reshape(-1))
    cols = p.colors.reshape(-1, 4)  # linear RGBA for Blender's FLOAT_COLOR attribute
    np.testing.assert_allclose(cols[0], [1, 0, 0, 1])
    np.testing.assert_allclose(cols[3, :3], srgb_to_linear(np.array([10, 20, 30]) / 255), atol=1e-6)
    assert abs(float(srgb_to_linear(np.array([0.5]))[0]) - 0.21404) < 1e-4  # sRGB mid-grey
    np.testing.assert_allclose(colors_to_linear_rgba(np.array([[1.0, 2.0, -1.0, 0.25]])), [1.0, 1.0, 0.0, 0.25])
    u8 = np.array([[0, 128, 255, 51]], np.uint8)
    np.testing.assert_allclose(colors_to_linear_rgba(u8), [0.0, srgb_to_linear(np.array([128 / 255]))[0], 1.0, 0.2],
                               atol=1e-6)


def test_prepare_mesh_rejects_what_would_crash_blender():
    v = np.zeros((3, 3), np.float32)
    with pytest.raises(MeshError, match="past the last"):
        prepare_mesh("bad", v, np.array([[0, 1, 7]], np.uint32))
    with pytest.raises(MeshError, match="NaN"):
        prepare_mesh("nan", np.full((3, 3), np.nan, np.float32), np.array([[0, 1, 2]], np.uint32))
    with pytest.raises(MeshError, match="limit"):
        prepare_mesh("big", v, np.array([[0, 1, 2]] * 3, np.uint32), max_faces=2)
    empty = prepare_mesh("empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32))
    assert empty.n_faces == 0 and empty.n_edges == 0


def test_grid_and_job_record():
    assert grid_columns(1) == 1 and grid_columns(3) == 2 and grid_columns(4) == 2 and grid_columns(5) == 3
    assert grid_offset(3, 1.5, 2) == (1.5, -1.5, 0.0)
    j = JobRecord(request_id="r1", workflow="text-to-shape", label="chair")
    assert j.key == "r1" and j.active and j.status_line() == "sending..."
    j.job_id, j.state, j.stage, j.step, j.total = "job1", "running", "stage 2", 5, 20
    assert j.key == "job1" and j.fraction == 0.25 and j.status_line() == "stage 2 5/20"
    assert j.grid_index("variant_1") == 0 and j.grid_index("variant_0") == 1 and j.grid_index("variant_1") == 0
    j.finish("failed", "out of memory")
    assert not j.active and j.status_line() == "out of memory"


def test_local_backend_settings_errors(tmp_path):
    lb = LocalBackend()
    with pytest.raises(BackendStartError, match="interpreter"):
        lb.start("")
    with pytest.raises(BackendStartError, match="does not exist"):
        lb.start(str(tmp_path / "nope" / "python"))
    with pytest.raises(BackendStartError, match="no backend/ folder"):
        lb.start(sys.executable, backend_dir=str(tmp_path))
    assert lb.status() == "not started" and lb.log_tail() == []
    assert guess_backend_dir(str(ROOT / ".venv" / "bin" / "python")) == ROOT


def test_build_zip_contents(tmp_path):
    import build_addon

    zpath = build_addon.build(platforms=["linux-x64"], out_dir=tmp_path, cache=ROOT / "build" / "wheels",
                              stage_dir=tmp_path / "stage")
    with zipfile.ZipFile(zpath) as zf:
        names = set(zf.namelist())
        manifest = tomllib.loads(zf.read("stepstone/blender_manifest.toml").decode())
        # shared/ is copied at build time, byte for byte
        for f in (ROOT / "shared").glob("*.py"):
            assert zf.read(f"stepstone/shared/{f.name}") == f.read_bytes()
    assert manifest["id"] == "stepstone" and manifest["type"] == "add-on"
    assert manifest["platforms"] == ["linux-x64"] and manifest["blender_version_min"] == "4.2.0"
    # the Python 3.11 build does not install on Blender 5.1+ (Python 3.13: its pyzmq wheel cannot load); max is
    # exclusive in Blender's manifest
    assert manifest["blender_version_max"] == "5.1.0"
    pyzmq = build_addon.pinned_version("pyzmq")
    assert len(manifest["wheels"]) == 1
    whl = manifest["wheels"][0]
    assert whl.startswith(f"./wheels/pyzmq-{pyzmq}-cp311-") and "linux" in whl
    assert "stepstone/" + whl[2:] in names
    assert {"stepstone/__init__.py", "stepstone/session.py", "stepstone/shared/client.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    # Blender's own extension validator (shipped inside the bpy module) accepts the zip
    import subprocess

    cli = next(Path(sys.prefix).glob("lib/python3*/site-packages/bpy/*/scripts/addons_core/bl_pkg/cli/blender_ext.py"),
               None)
    assert cli is not None, "Blender's extension command line (bl_pkg/cli/blender_ext.py) not found in the bpy module"
    res = subprocess.run([sys.executable, str(cli), "validate", str(zpath)], capture_output=True, text=True)
    assert res.returncode == 0 and "Success" in res.stdout, res.stdout + res.stderr
    # the add-on never imports torch or the backend
    for n in names:
        if n.endswith(".py") and not n.startswith("stepstone/shared/"):
            src = zipfile.ZipFile(zpath).read(n).decode()
            assert "import torch" not in src and "from backend" not in src and "import backend" not in src


def test_manifest_per_blender_python(tmp_path):
    import build_addon

    src = ROOT / "blender_addon" / "blender_manifest.toml"
    for pv in sorted(build_addon.BLENDER_MIN):
        dst = tmp_path / f"m{pv}.toml"
        build_addon.write_manifest(src, dst, wheels=[], platforms=["linux-x64"],
                                   blender_min=build_addon.BLENDER_MIN[pv], blender_max=build_addon.BLENDER_MAX[pv])
        m = tomllib.loads(dst.read_text())
        assert m["blender_version_min"] == build_addon.BLENDER_MIN[pv]
        assert m.get("blender_version_max") == build_addon.BLENDER_MAX[pv]
    # the ranges do not overlap and leave no gap: every Blender from 4.2 gets exactly one zip
    assert build_addon.BLENDER_MAX["3.11"] == build_addon.BLENDER_MIN["3.13"]


def test_whole_messages_wrap_and_names_never_split_a_character():
    from blender_addon.textfit import chars_per_line, fit_bytes, prompt_warning, wrap

    hint = ("the starter set has no text-to-image model (backend/models/starter/diffusion) and "
            "stabilityai/stable-diffusion-2-1-base is not downloaded \u2014 run `python -m backend models download "
            "diffusion` on the backend's machine")
    for width in (20, 33, 48, 80):
        lines = wrap(hint, width)
        assert all(len(line) <= width for line in lines)
        assert "".join(lines).replace(" ", "") == hint.replace(" ", "")  # nothing dropped, the fix included
        assert any("models download" in line or "download" in line for line in lines)
    assert chars_per_line(300, 1.0) < chars_per_line(600, 1.0) and chars_per_line(600, 2.0) < chars_per_line(600, 1.0)
    name = "Stuhl \u2014 " + "\u4e00\u628a\u7ea2\u8272\u7684\u6905\u5b50" * 5
    short = fit_bytes(name)
    assert len(short.encode("utf-8")) <= 63 and short.endswith("\u2026")
    short.encode("utf-8").decode("utf-8")  # whole characters only
    assert fit_bytes("a chair") == "a chair"
    assert "English" in prompt_warning("\u4e00\u628a\u7ea2\u8272\u7684\u6905\u5b50", "starter")
    assert prompt_warning("a red chair", "starter") == "" and prompt_warning("ein roter Stuhl", "starter") == ""
    assert prompt_warning("\u4e00\u628a\u7ea2\u8272\u7684\u6905\u5b50", "pretrained") == ""


def test_panels_and_session_have_no_fixed_character_cuts():
    import re

    for f in ("panels.py", "session.py", "operators.py"):
        src = (ROOT / "blender_addon" / f).read_text()
        cuts = [m.group(0) for m in re.finditer(r"(label|text|name|reason|why|line|message|status_line\(\))\)?\[:\d+\]",
                                                 src)]
        assert not cuts, f"{f}: fixed cuts {cuts}"


def test_build_rejects_unknown_platform(tmp_path):
    import build_addon

    with pytest.raises(build_addon.BuildError, match="unknown platform"):
        build_addon.build(platforms=["amiga-68k"], out_dir=tmp_path, stage_dir=tmp_path / "s")
    assert build_addon.main(["--platforms", "amiga-68k", "--out", str(tmp_path)]) == 2
