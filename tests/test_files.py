"""Files at the backend's boundary: axes and colour space of GLB/OBJ/PLY, checked in the files' own bytes.

The backend is Z-up; glTF and OBJ are Y-up (+Z forward), PLY Z-up; glTF ``COLOR_0`` is linear, OBJ/PLY colours
sRGB (``docs/internals.md``, "Files"). Blender's view of the same files is in ``tests/blender/test_files_in_blender.py``.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh

import gltf_validator
from backend.geometry.gltf import colors_from_accessor, glb_bytes
from backend.geometry.io import export_mesh, load_mesh
from shared.color import colors_to_linear_rgba, linear_rgba_to_srgb8, linear_to_srgb, srgb_to_linear


def _tall_box(colors: bool = True):
    """A box 0.2 wide (x), 0.4 deep (y), 1.0 tall (z), standing on z = 0 away from the origin, one colour per vertex."""
    m = trimesh.creation.box(extents=(0.2, 0.4, 1.0))
    m.apply_translation((1.0, 2.0, 0.5))
    c = np.random.default_rng(0).integers(0, 256, size=(len(m.vertices), 3)).astype(np.uint8) if colors else None
    return m.vertices, m.faces, c


def _glb_parts(data: bytes) -> tuple[dict, bytes]:
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    jlen, jtype = struct.unpack_from("<II", data, 12)
    doc = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    return doc, data[28 + jlen:28 + jlen + blen]


def _glb_pack(doc: dict, binary: bytes) -> bytes:
    """The inverse of :func:`_glb_parts` (``binary`` already padded to 4 bytes)."""
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    return (struct.pack("<III", 0x46546C67, 2, 28 + len(js) + len(binary)) + struct.pack("<II", len(js), 0x4E4F534A)
            + js + struct.pack("<II", len(binary), 0x004E4942) + binary)


def _accessor(doc: dict, binary: bytes, index: int) -> np.ndarray:
    a = doc["accessors"][index]
    view = doc["bufferViews"][a["bufferView"]]
    dtype = {5126: np.float32, 5123: np.uint16, 5125: np.uint32, 5121: np.uint8}[a["componentType"]]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[a["type"]]
    raw = np.frombuffer(binary, dtype, count=a["count"] * width, offset=view["byteOffset"] + a.get("byteOffset", 0))
    return raw.reshape(a["count"], width)


def test_srgb_transfer_functions_invert_each_other():
    x = np.linspace(0, 1, 1001)
    assert np.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-6)
    assert abs(float(linear_to_srgb(np.array([0.214041]))[0]) - 0.5) < 1e-5  # sRGB mid-grey
    every_byte = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    assert np.array_equal(linear_rgba_to_srgb8(colors_to_linear_rgba(every_byte).reshape(-1, 4))[:, :3], every_byte)


def test_glb_is_y_up_with_linear_colour_and_the_reference_validator_finds_nothing(tmp_path):
    v, f, _ = _tall_box()
    colors = np.zeros((len(v), 4), np.uint8)
    colors[:, 3] = 255
    colors[0, :3] = (255, 0, 0)  # pure red stays 1.0 in linear
    colors[1, :3] = (128, 128, 128)  # sRGB mid-grey is 0.2158 linear
    path = export_mesh(tmp_path / "box.glb", v, f, colors)
    doc, binary = _glb_parts(path.read_bytes())
    prim = doc["meshes"][0]["primitives"][0]
    pos = doc["accessors"][prim["attributes"]["POSITION"]]
    # 1.0 tall in backend z -> glTF +Y; backend +y (0.4 deep, at 2) -> glTF -Z
    assert np.allclose(pos["min"], [0.9, 0.0, -2.2], atol=1e-6) and np.allclose(pos["max"], [1.1, 1.0, -1.8], atol=1e-6)
    col = _accessor(doc, binary, prim["attributes"]["COLOR_0"]) / 65535.0
    assert np.allclose(col[0], [1, 0, 0, 1]) and np.allclose(col[1, :3], 0.21586, atol=1e-4)
    normals = _accessor(doc, binary, prim["attributes"]["NORMAL"])
    points = _accessor(doc, binary, prim["attributes"]["POSITION"])
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    assert (np.sum(normals * (points - points.mean(axis=0)), axis=1) > 0).all()  # outward, as the winding says
    material = doc["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0.0 and material["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0]
    report = gltf_validator.validate([path])[str(path)]
    assert (report["numErrors"], report["numWarnings"], report["numInfos"]) == (0, 0, 0), \
        gltf_validator.describe(str(path), report)
    uncoloured = export_mesh(tmp_path / "grey.glb", v, f)
    report = gltf_validator.validate([uncoloured])[str(uncoloured)]
    assert (report["numErrors"], report["numWarnings"]) == (0, 0), gltf_validator.describe(str(uncoloured), report)


@pytest.mark.invalid_glb
def test_the_validator_catches_a_broken_glb(tmp_path):
    """The check the suite runs on every written GLB does fail on errors (here: a lying POSITION bound)."""
    v, f, c = _tall_box()
    doc, binary = _glb_parts(glb_bytes(v, f, c))
    doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]["max"] = [9.0, 9.0, 9.0]
    bad = tmp_path / "bad.glb"
    bad.write_bytes(_glb_pack(doc, binary))
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(b"not a gltf file")
    reports = gltf_validator.validate([bad, garbage])
    assert reports[str(bad)]["numErrors"] >= 1
    assert any(m["code"] == "ACCESSOR_MAX_MISMATCH" for m in reports[str(bad)]["messages"])
    assert reports[str(garbage)]["numErrors"] == 1
    # what the suite's end-of-test check does: find the new files, report the broken ones, then nothing new
    watch = gltf_validator.GlbWatch(tmp_path)
    export_mesh(tmp_path / "good.glb", v, f, c)
    assert sorted(p.name for p in watch.new_files()) == ["bad.glb", "garbage.glb", "good.glb"]
    found = {p: r["numErrors"] for p, r in gltf_validator.validate(sorted(tmp_path.glob("*.glb"))).items()}
    assert found == {str(bad): found[str(bad)], str(garbage): 1, str(tmp_path / "good.glb"): 0}
    assert watch.new_files() == []


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_every_format_round_trips_in_place_with_exact_srgb_colours(tmp_path, suffix):
    """Scale and origin are kept (no recentring), and every sRGB byte value comes back as it was."""
    v, f, _ = _tall_box()
    colors = np.zeros((len(v), 4), np.uint8)
    colors[:, :3] = np.arange(len(v) * 3).reshape(-1, 3) * 11 % 256
    colors[:, 3] = 255
    loaded = load_mesh(export_mesh(tmp_path / f"m{suffix}", v, f, colors))
    order, lorder = np.lexsort(v.T), np.lexsort(loaded.vertices.T)
    assert np.allclose(loaded.vertices[lorder], v[order], atol=1e-5)
    assert np.array_equal(loaded.colors[lorder], colors[order])
    # dark values are where an 8-bit linear store would lose them
    dark = np.repeat(np.arange(len(v), dtype=np.uint8)[:, None], 3, axis=1)
    back = load_mesh(export_mesh(tmp_path / f"dark{suffix}", v, f, dark))
    assert np.array_equal(back.colors[np.lexsort(back.vertices.T), :3], dark[order])


def test_obj_is_y_up_and_ply_z_up_in_the_file(tmp_path):
    v, f, c = _tall_box()
    obj = export_mesh(tmp_path / "m.obj", v, f, c)
    ov = np.array([[float(t) for t in line.split()[1:4]] for line in obj.read_text().splitlines()
                   if line.startswith("v ")])
    assert np.allclose(ov.min(axis=0), [0.9, 0.0, -2.2]) and np.allclose(ov.max(axis=0), [1.1, 1.0, -1.8])
    ply = trimesh.load(export_mesh(tmp_path / "m.ply", v, f, c), process=False)
    assert np.allclose(ply.bounds, [[0.9, 1.8, 0.0], [1.1, 2.2, 1.0]])


def test_a_y_up_glb_from_another_tool_is_read_upright_with_its_colours(tmp_path):
    """A GLB as Blender writes it (Y-up, a material, COLOR_0 as normalised unsigned short) reads as Z-up."""
    m = trimesh.creation.box(extents=(0.2, 1.0, 0.4))  # tall along glTF's +Y
    m.apply_translation((0.0, 0.5, 0.0))
    linear = np.tile([[1.0, 0.2158605, 0.0, 1.0]], (len(m.vertices), 1))
    m.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(name="mat"))
    path = tmp_path / "from_blender.glb"
    m.export(path, file_type="glb")
    # trimesh writes no COLOR_0 next to a material; add one as Blender's exporter does
    loaded = load_mesh(_with_color0(path, linear))
    assert np.allclose(loaded.vertices.min(axis=0), [-0.1, -0.2, 0.0], atol=1e-6)
    assert np.allclose(loaded.vertices.max(axis=0), [0.1, 0.2, 1.0], atol=1e-6)
    assert np.array_equal(np.unique(loaded.colors, axis=0), [[255, 128, 0, 255]])


def _with_color0(path, linear: np.ndarray):
    """Rewrite ``path`` with a ``COLOR_0`` accessor (normalised uint16 VEC4) holding ``linear`` on its primitive."""
    doc, binary = _glb_parts(path.read_bytes())
    extra = (np.clip(linear, 0, 1) * 65535 + 0.5).astype(np.uint16).tobytes()
    offset = len(binary) + (-len(binary) % 4)
    binary = binary + b"\0" * (offset - len(binary)) + extra
    doc["bufferViews"].append({"buffer": 0, "byteOffset": offset, "byteLength": len(extra), "target": 34962})
    doc["accessors"].append({"bufferView": len(doc["bufferViews"]) - 1, "componentType": 5123, "normalized": True,
                             "count": len(linear), "type": "VEC4"})
    doc["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"] = len(doc["accessors"]) - 1
    doc["buffers"][0]["byteLength"] = len(binary)
    out = path.with_name("with_color0.glb")
    out.write_bytes(_glb_pack(doc, binary))
    return out


def test_color_accessors_of_every_allowed_type_read_the_same():
    linear = np.array([[1.0, 0.2158605, 0.0, 1.0], [0.0, 0.0, 0.0, 0.5]])
    want = [[255, 128, 0, 255], [0, 0, 0, 128]]
    assert np.array_equal(colors_from_accessor(linear.astype(np.float32)), want)
    assert np.array_equal(colors_from_accessor((linear * 65535 + 0.5).astype(np.uint16)), want)
    assert np.array_equal(colors_from_accessor((linear * 255 + 0.5).astype(np.uint8)), want)
    assert np.array_equal(colors_from_accessor(linear[:, :3].astype(np.float32)), [[255, 128, 0, 255], [0, 0, 0, 255]])
