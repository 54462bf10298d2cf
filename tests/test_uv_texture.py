"""Pipeline-ready results (issue 16): UV unwrapping in a child process, the texture bake, textured GLB files, and
the ``uv_texture`` job option of text to shape (tiny profile), through the pipeline, the job store and the CLI."""

from __future__ import annotations

import json
import struct
import sys
import threading
import time

import numpy as np
import pytest
import trimesh

from backend.errors import Cancelled, InputError
from backend.events import CancelToken, Image, JobContext, MeshUpdate, Progress, set_current_cancel
from backend.geometry import uv as uvmod
from backend.geometry.io import export_mesh, load_mesh
from backend.geometry.texture import png_rgba, sample_texture, uv_texels
from backend.pipelines import uv_texture


def _sphere(subdivisions: int = 3):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    v = np.asarray(s.vertices, dtype=np.float32)
    f = np.asarray(s.faces, dtype=np.uint32)
    return v, f


def _rainbow(points: np.ndarray) -> np.ndarray:
    """A smooth colour field on the unit cube: sRGB uint8 (N, 3)."""
    p = np.asarray(points, dtype=np.float64)
    rgb = np.stack([p[:, 0] + 0.5, p[:, 1] + 0.5, 0.5 + 0.5 * np.sin(6.0 * p[:, 2])], axis=1)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _glb_json(path) -> dict:
    data = path.read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + n])


# ------------------------------------------------------------------------------------------------- unwrap


def test_unwrap_gives_every_face_corner_a_uv_inside_the_unit_square():
    v, f = _sphere(3)
    atlas = uvmod.unwrap(v, f, 256)
    uv = atlas.uvs
    assert uv.shape == (len(f), 3, 2) and uv.dtype == np.float32
    assert np.isfinite(uv).all() and uv.min() >= 0.0 and uv.max() <= 1.0
    a, b, c = uv[:, 0], uv[:, 1], uv[:, 2]
    area = 0.5 * np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))
    assert (area > 0).all(), "every face has its own piece of the atlas"
    assert atlas.charts >= 2  # a closed sphere cannot be flattened in one piece
    # charts do not overlap: no texel centre lies strictly inside two UV triangles
    r, cc, t, w = uv_texels(uv, 256)
    interior = (w > 1e-3).all(axis=1)
    flat = r[interior] * 256 + cc[interior]
    assert len(np.unique(flat)) == len(flat)


def test_a_crash_in_the_child_is_a_clear_error_and_the_backend_lives_on(monkeypatch):
    """xatlas segfaults on some large meshes: here the child dies of a real SIGSEGV."""
    monkeypatch.setattr(uvmod, "_child_command",
                        lambda inp, out: [sys.executable, "-c", "import faulthandler; faulthandler._sigsegv()"])
    v, f = _sphere(2)
    with pytest.raises(uvmod.UnwrapError, match=r"crashed \(SIGSEGV\).*turn uv_texture off"):
        uvmod.unwrap(v, f, 128)
    # the result still comes, with its vertex colours only, and says why there is no texture
    ev = MeshUpdate(v, f, _rainbow(v), final=True, name="variant_0", info={"prompt": "x"})
    events = list(uv_texture.finish(ev, uv_texture.TextureOptions(size=128, faces=50_000)))
    final = events[-1]
    assert isinstance(final, MeshUpdate) and final.final and final.uvs is None
    assert "SIGSEGV" in final.info["uv_texture_error"] and final.info["prompt"] == "x"
    np.testing.assert_array_equal(final.colors, ev.colors)
    assert not any(isinstance(e, Image) for e in events)
    assert any(isinstance(e, Progress) and "vertex colours only" in e.message for e in events)
    monkeypatch.undo()  # this process lives on, and the real unwrapper works in it
    assert uvmod.unwrap(v, f, 128).uvs.shape == (len(f), 3, 2)


def test_a_child_that_exits_without_an_atlas_is_an_error(monkeypatch):
    monkeypatch.setattr(uvmod, "_child_command",
                        lambda inp, out: [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    v, f = _sphere(1)
    with pytest.raises(uvmod.UnwrapError, match="exited with status 3 on a mesh of 80 faces: boom"):
        uvmod.unwrap(v, f, 64)


def test_cancel_kills_the_unwrapper(monkeypatch):
    import subprocess

    procs = []
    popen = subprocess.Popen

    def spy(*a, **k):
        p = popen(*a, **k)
        procs.append(p)
        return p

    monkeypatch.setattr(uvmod, "_child_command", lambda inp, out: [sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setattr(uvmod.subprocess, "Popen", spy)
    token = CancelToken()
    v, f = _sphere(1)
    set_current_cancel(token)
    timer = threading.Timer(0.5, token.cancel)
    timer.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            uvmod.unwrap(v, f, 64)
        assert time.monotonic() - t0 < 60  # not the child's 120 s
    finally:
        set_current_cancel(None)
        timer.cancel()
    assert procs and procs[0].poll() is not None, "the child was left running"


# ------------------------------------------------------------------------------------------------- bake


def test_the_texture_reproduces_the_vertex_colours_at_face_centres():
    v, f = _sphere(4)  # 5120 faces, under the budget: no decimation
    colors = _rainbow(v)
    ev = MeshUpdate(v, f, colors, final=True, name="variant_0")
    events = list(uv_texture.finish(ev, uv_texture.TextureOptions(size=512, faces=20_000)))
    images = [e for e in events if isinstance(e, Image)]
    final = events[-1]
    assert [im.label for im in images] == ["variant_0 texture"] and final.info["texture"] == "variant_0 texture"
    assert final.info["texture_size"] == 512 and final.info["uv_charts"] >= 2
    np.testing.assert_array_equal(final.faces, f)
    np.testing.assert_array_equal(final.colors, colors)  # the vertex colours stay
    img = png_rgba(images[0].png)
    assert img.shape == (512, 512, 4)
    centre_uv = final.uvs.mean(axis=1)  # the centroid's UV (UVs are affine on a triangle)
    got = sample_texture(img, centre_uv)[:, :3]
    want = colors[f].astype(np.float64).mean(axis=1)
    err = np.abs(got - want).max(axis=1)
    assert np.median(err) <= 2.0 and np.percentile(err, 99) <= 8.0, (np.median(err), np.percentile(err, 99))
    assert (img[..., 3] > 0).mean() > 0.3  # the atlas uses the image


def test_a_colour_function_is_baked_at_each_texel_and_the_mesh_is_decimated_first():
    v, f = _sphere(4)
    ev = MeshUpdate(v, f, _rainbow(v), final=True, name="shape")
    events = list(uv_texture.finish(ev, uv_texture.TextureOptions(size=256, faces=1000),
                                    color_fn=lambda p: _rainbow(p) / 255.0))
    final = events[-1]
    assert len(final.faces) <= 1000 and final.info["faces_before_decimation"] == len(f)
    assert final.info["texture_source"] == "colour field"
    assert final.uvs.shape == (len(final.faces), 3, 2)
    img = png_rgba([e for e in events if isinstance(e, Image)][0].png)
    centre = final.vertices[final.faces.astype(np.int64)].mean(axis=1)
    got = sample_texture(img, final.uvs.mean(axis=1))[:, :3]
    err = np.abs(got - _rainbow(centre)).max(axis=1)
    assert np.median(err) <= 3.0, np.median(err)
    np.testing.assert_array_equal(final.colors, _rainbow(final.vertices))  # colours at the new vertices


# ------------------------------------------------------------------------------------------------- GLB


def test_textured_glb_keeps_uvs_and_texture_and_passes_the_validator(tmp_path):
    import gltf_validator

    v, f = _sphere(3)
    colors = _rainbow(v)
    events = list(uv_texture.finish(MeshUpdate(v, f, colors, final=True, name="variant_0"),
                                    uv_texture.TextureOptions(size=256, faces=20_000)))
    png = [e for e in events if isinstance(e, Image)][0].png
    final = events[-1]
    path = export_mesh(tmp_path / "textured.glb", final.vertices, final.faces, final.colors, uvs=final.uvs,
                       texture=png)
    report = gltf_validator.validate([path])[str(path)]
    assert report["numErrors"] == 0 and report["numWarnings"] == 0, gltf_validator.describe(str(path), report)
    doc = _glb_json(path)
    prim = doc["meshes"][0]["primitives"][0]
    assert "TEXCOORD_0" in prim["attributes"] and "COLOR_0" not in prim["attributes"]  # COLOR_0 would multiply
    pbr = doc["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert pbr["baseColorTexture"] == {"index": 0, "texCoord": 0} and pbr["baseColorFactor"] == [1.0] * 4
    assert doc["images"][0]["mimeType"] == "image/png"
    # trimesh (another reader) sees the texture and UVs
    tm = trimesh.load(path, force="mesh")
    assert tm.visual.kind == "texture" and tm.visual.material.baseColorTexture.size == (256, 256)
    # read back as the job store does: the same mesh, UVs per corner, texture, colours from the texture
    back = load_mesh(path, textures=True)
    np.testing.assert_array_equal(back.faces, f)
    np.testing.assert_allclose(back.vertices, v, atol=1e-6)
    np.testing.assert_allclose(back.uvs, final.uvs, atol=1e-6)
    assert back.texture == png
    assert np.abs(back.colors[:, :3].astype(int) - colors.astype(int)).mean() < 4.0
    # plain reading is unchanged: textures are not read
    plain = load_mesh(path)
    assert plain.uvs is None and plain.texture is None


def test_uvs_without_a_texture_keep_the_vertex_colours(tmp_path):
    v, f = _sphere(1)
    uvs = uvmod.unwrap(v, f, 64).uvs
    path = export_mesh(tmp_path / "uv_only.glb", v, f, _rainbow(v), uvs=uvs)
    prim = _glb_json(path)["meshes"][0]["primitives"][0]
    assert {"TEXCOORD_0", "COLOR_0"} <= set(prim["attributes"])


# ------------------------------------------------------------------------------------------------- the option


def test_option_validation():
    from backend.pipelines import text_to_shape as t2s

    p = t2s.validate({"prompt": "a chair"}, [])
    assert p["uv_texture"] is False and uv_texture.options(p) is None
    p = t2s.validate({"prompt": "a chair", "uv_texture": True, "texture_size": 256}, [])
    assert uv_texture.options(p) == uv_texture.TextureOptions(size=256, faces=20_000)
    for bad, msg in (({"uv_texture": "yes"}, "true or false"), ({"texture_size": 8}, "between 16"),
                     ({"texture_faces": 80_000}, "unreliable on larger meshes"), ({"texture_size": 1.5}, "whole")):
        with pytest.raises(InputError, match=msg):
            t2s.validate({"prompt": "a chair", **bad}, [])
    from backend.presets import apply_preset

    for preset, size, faces in (("draft", 256, 8000), ("standard", 512, 20000), ("paper", 1024, 30000)):
        params, _ = apply_preset("text-to-shape", {"prompt": "a chair", "uv_texture": True, "preset": preset}, "cpu")
        assert uv_texture.options(t2s.validate(params, [])) == uv_texture.TextureOptions(size, faces)


SMALL = {"views": 1, "render_resolution": 16, "n_samples": 8, "resolution": 24, "preview_every": 100,
         "iterations": 1, "texture_iterations": 1}


def test_text_to_shape_with_uv_texture_on_the_tiny_profile(tmp_path):
    from backend.models.registry import load_profile
    from backend.pipelines import text_to_shape as t2s

    ctx = JobContext(profile=load_profile("tiny"), device="cpu", seed=0)
    p = t2s.validate(dict(SMALL, prompt="a red chair", uv_texture=True, texture_size=64), [])
    events = list(t2s.run(p, [], ctx))
    finals = [e for e in events if isinstance(e, MeshUpdate) and e.final]
    assert len(finals) == 1 and finals[0].uvs is not None, finals[0].info.get("uv_texture_error")
    assert finals[0].info["texture_source"] == "colour field"  # the decoder's colour network
    textures = [i for i, e in enumerate(events) if isinstance(e, Image) and e.label == finals[0].info["texture"]]
    at = next(i for i, e in enumerate(events) if e is finals[0])
    assert len(textures) == 1 and textures[0] < at  # the image comes before its mesh
    uv = finals[0].uvs
    a, b, c = uv[:, 0], uv[:, 1], uv[:, 2]
    area = np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))
    tri = finals[0].vertices[finals[0].faces.astype(np.int64)]
    area3 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    # xatlas gives no atlas area only to faces with (almost) none in 3D (marching cubes' slivers)
    assert (area3[area == 0] < 1e-3 * np.median(area3)).all()


def test_the_job_store_and_the_cli_write_textured_glb(tmp_path):
    from backend.cli import main
    from backend.jobs import JobManager, JobStore
    from backend.models.registry import load_profile
    from shared import protocol as P

    sent = []
    store = JobStore(tmp_path / "jobs")
    m = JobManager(store, profile=load_profile("tiny"), device="cpu", backend_id="uv",
                   emit=lambda job, kind, fields, arrays: sent.append((kind, fields, arrays)))
    try:
        job = m.submit("text-to-shape", dict(SMALL, prompt="a red chair", uv_texture=True, texture_size=64), [])
        end = time.monotonic() + 300
        while not any(k in P.TERMINAL_KINDS for k, _, _ in sent) and time.monotonic() < end:
            time.sleep(0.05)
        assert [k for k, _, _ in sent if k in P.TERMINAL_KINDS] == [P.DONE], [f for k, f, _ in sent]
        final = [(f, a) for k, f, a in sent if k == P.MESH and f["final"]][0]
        assert final[1]["uvs"].shape == (len(final[1]["faces"]), 3, 2)  # on the wire
        images = [f["label"] for k, f, _ in sent if k == P.IMAGE]
        assert final[0]["info"]["texture"] in images
        (rec, mesh), = store.load_result(m.get(job.id))
        assert mesh.texture is not None and mesh.uvs is not None
        np.testing.assert_array_equal(mesh.faces, final[1]["faces"])
        np.testing.assert_allclose(mesh.uvs, final[1]["uvs"], atol=1e-6)
    finally:
        m.shutdown(timeout_s=10)
    out = tmp_path / "cli.glb"
    rc = main(["run", "text-to-shape", "--profile", "tiny", "--prompt", "a red chair", "--iterations", "1",
               "--views", "1", "--render-resolution", "16", "--resolution", "24", "--texture-iterations", "1",
               "--uv-texture", "--texture-size", "64", "--texture-faces", "500", "--out", str(out)])
    assert rc == 0
    back = load_mesh(out, textures=True)
    assert back.uvs is not None and len(back.faces) <= 500 and png_rgba(back.texture).shape == (64, 64, 4)


def test_image_to_shape_with_uv_texture(tmp_path):
    import base64

    from backend.geometry.texture import png_bytes
    from backend.models.registry import load_profile
    from backend.pipelines import image_to_shape as i2s

    px = np.full((32, 32, 3), 255, np.uint8)
    px[8:24, 8:24] = (200, 30, 30)
    png = png_bytes(px)
    params = i2s.validate({"image_png": base64.b64encode(png).decode(), "image_name": "red", "method": "svr",
                           "config": {"mesh_resolution": 24}, "uv_texture": True, "texture_size": 64}, [])
    with pytest.raises(InputError, match="texture_size"):
        i2s.validate({**params, "texture_size": 99_999}, [])
    events = list(i2s.run(params, [], JobContext(profile=load_profile("tiny"), device="cpu", seed=0)))
    final = events[-1]
    assert isinstance(final, MeshUpdate) and final.final and final.uvs is not None, final.info
    assert final.info["texture"] == "red texture" and any(isinstance(e, Image) and e.label == "red texture"
                                                          for e in events)
