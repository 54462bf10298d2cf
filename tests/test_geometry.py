"""Geometry: marching cubes accuracy, mesh -> SDF -> mesh round trips, awkward meshes, bad input, IO, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.errors import InputError, StepstoneError
from backend.fields import DensityGridField, field_color_fn, field_grid
from backend.geometry import (
    Normalization,
    chamfer_distance,
    decimate,
    extract_mesh,
    f_score,
    mesh_iou,
    mesh_to_sdf,
    normalize_mesh,
    precision_recall,
    remove_small_components,
    sample_surface,
    volumetric_iou,
)
from backend.geometry.io import export_mesh, load_mesh


def _sphere_sdf(res, r, center=(0.0, 0.0, 0.0)):
    lin = np.linspace(-0.5, 0.5, res)
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    c = center
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r


def test_marching_cubes_sphere_area_and_volume_within_2_percent():
    r = 0.35
    v, f, colors = extract_mesh(_sphere_sdf(64, r), level=0.0)
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.02)  # positive: outward normals
    assert mesh.area == pytest.approx(4 * np.pi * r**2, rel=0.02)
    assert colors is None and v.dtype == np.float32 and f.dtype == np.uint32


def test_marching_cubes_colours_bbox_and_density_grids():
    field = DensityGridField.from_sdf(torch.as_tensor(_sphere_sdf(24, 0.3), dtype=torch.float32), color="grid")
    with torch.no_grad():
        field.color.grid[0].fill_(3.0)  # red
    density = field_grid(field, 24)
    v, f, c = extract_mesh(density, level=1 / (2 * 0.05), inside="above", color_fn=field_color_fn(field))
    radii = np.linalg.norm(v, axis=1)
    assert abs(np.median(radii) - 0.3) < 0.02
    assert c.shape == (len(v), 3) and c.dtype == np.uint8 and c[:, 0].min() > 200
    assert trimesh.Trimesh(v, f, process=False).volume > 0
    # a shape touching the grid's box is closed by the padding; bbox maps to world coordinates
    v2, f2, _ = extract_mesh(_sphere_sdf(16, 0.6), bbox=((0, 0, 0), (2, 2, 2)))
    assert v2.min() >= -1e-6 and v2.max() <= 2 + 1e-6 and trimesh.Trimesh(v2, f2).is_watertight


def test_empty_grid_is_a_clear_error_or_empty_result():
    with pytest.raises(StepstoneError, match="empty"):
        extract_mesh(np.ones((8, 8, 8)), level=0.0)
    v, f, c = extract_mesh(np.ones((8, 8, 8)), level=0.0, allow_empty=True)
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_small_parts_removed_and_decimation():
    sdf = np.minimum(_sphere_sdf(48, 0.3), _sphere_sdf(48, 0.03, (0.4, 0.4, 0.4)))
    v, f, _ = extract_mesh(sdf, min_component_fraction=0.0)
    v_clean, f_clean, _ = remove_small_components(v, f.astype(np.int64), 0.05)
    assert len(trimesh.Trimesh(v, f).split(only_watertight=False)) == 2
    assert len(trimesh.Trimesh(v_clean, f_clean).split(only_watertight=False)) == 1
    assert np.linalg.norm(v_clean, axis=1).max() < 0.35
    vd, fd, _ = extract_mesh(_sphere_sdf(48, 0.3), target_faces=1500)
    assert 500 < len(fd) <= 1500
    assert trimesh.Trimesh(vd, fd).volume == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.05)
    cols = np.full((len(v_clean), 3), 100, np.uint8)
    _, f3, c3 = decimate(v_clean, f_clean, 200, cols)
    assert len(f3) <= 200 and np.all(c3 == 100)


def _inside_by_winding_number(points, vertices, faces):
    """Independent inside test: generalized winding number (Van Oosterom-Strackee solid angles), > 0.5 inside."""
    tri = np.asarray(vertices, float)[np.asarray(faces, int)]
    total = np.zeros(len(points))
    for s in range(0, len(points), 500):
        a, b, c = (tri[None, :, k, :] - points[s : s + 500, None, :] for k in range(3))
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", b, c) * la
        den += np.einsum("pfi,pfi->pf", c, a) * lb
        total[s : s + 500] = (2 * np.arctan2(det, den)).sum(axis=1) / (4 * np.pi)
    return np.abs(total) > 0.5


def test_closed_mesh_sdf_round_trip_iou():
    mesh = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=32, minor_sections=16)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(0.4, [1, 0, 0]))
    sdf, norm = mesh_to_sdf(mesh.vertices, mesh.faces, resolution=40)
    v, f, _ = extract_mesh(sdf)
    back = norm.from_unit(v)
    # independent inside test (winding numbers) on random points in the torus' box
    rng = np.random.default_rng(0)
    lo, hi = mesh.bounds
    pts = rng.uniform(lo - 0.05, hi + 0.05, size=(1200, 3))
    recon = trimesh.Trimesh(back, f, process=False)
    assert recon.is_watertight
    inside_a = _inside_by_winding_number(pts, mesh.vertices, mesh.faces)
    inside_b = _inside_by_winding_number(pts, back, f)
    assert inside_a.sum() > 100
    assert volumetric_iou(inside_a, inside_b) >= 0.95
    assert mesh_iou(mesh.vertices, mesh.faces, back, f, resolution=40) >= 0.95
    # distances are in unit-cube units: |sdf| near the surface is a fraction of a voxel there
    assert np.abs(sdf).min() < 1.0 / 47


def test_open_nonmanifold_and_multipart_meshes_convert():
    box = trimesh.creation.box((1.0, 1.0, 1.0))
    # open: a box without its top (two triangles) -> a cup-like thin shell, hollow inside
    normals = box.face_normals
    open_box = trimesh.Trimesh(box.vertices, box.faces[normals[:, 2] < 0.5], process=False)
    sdf, _ = mesh_to_sdf(open_box.vertices, open_box.faces, resolution=32)
    v, f, _ = extract_mesh(sdf)
    assert len(f) > 0 and sdf[16, 16, 16] > 0  # the middle of the cup is empty
    # single sheet (one quad) -> thin slab
    quad_v = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    quad_f = np.array([[0, 1, 2], [0, 2, 3]])
    sdf, _ = mesh_to_sdf(quad_v, quad_f, resolution=24)
    assert (sdf < 0).sum() > 0
    # two separate parts plus an overlapping one (inside where either is inside)
    a = trimesh.creation.icosphere(2, radius=0.5)
    b = trimesh.creation.icosphere(2, radius=0.5)
    b.apply_translation([2.0, 0, 0])
    c = trimesh.creation.box((0.8, 0.8, 0.8))
    c.apply_translation([2.5, 0, 0])
    parts = trimesh.util.concatenate([a, b, c])
    sdf, norm = mesh_to_sdf(parts.vertices, parts.faces, resolution=40)
    inside_pts = norm.to_unit(np.array([[0.0, 0, 0], [1.8, 0, 0], [2.7, 0, 0]]))
    idx = np.rint((inside_pts + 0.5) * 39).astype(int)
    assert all(sdf[tuple(i)] < 0 for i in idx)
    v, f, _ = extract_mesh(sdf)
    assert len(trimesh.Trimesh(v, f).split(only_watertight=False)) == 2
    # non-manifold: three triangles sharing one edge, plus inconsistent winding on a closed box
    fin_v = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0.5], [-1, 0.2, 0.5], [0, -1, 0.5]], float)
    fin_f = np.array([[0, 1, 2], [0, 1, 3], [1, 0, 4]])
    sdf, _ = mesh_to_sdf(fin_v, fin_f, resolution=24)
    assert (sdf < 0).any()
    flipped = box.faces.copy()
    flipped[::3] = flipped[::3, ::-1]
    s1, _ = mesh_to_sdf(box.vertices, box.faces, resolution=24)
    s2, _ = mesh_to_sdf(box.vertices, flipped, resolution=24)
    assert np.allclose(s1, s2)


@pytest.mark.parametrize(
    "vertices, faces, message",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), int), "empty"),
        (np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]), "NaN"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 3]]), "past the last"),
        (np.ones((3, 3)), np.array([[0, 1, 2]]), "zero size"),
    ],
)
def test_bad_meshes_give_input_errors(vertices, faces, message, tmp_path):
    with pytest.raises(InputError, match=message):
        mesh_to_sdf(vertices, faces, resolution=16)
    if message != "zero size":
        with pytest.raises(InputError, match=message):
            export_mesh(tmp_path / "x.glb", vertices, faces)
    if message != "past the last":
        with pytest.raises(InputError):
            normalize_mesh(vertices)


def test_normalisation_round_trip_and_padding():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(50, 3)) * [3.0, 1.0, 0.5] + [10.0, -2.0, 4.0]
    unit, norm = normalize_mesh(v, padding=0.1)
    assert np.allclose(unit.max(axis=0) + unit.min(axis=0), 0.0, atol=1e-9)
    assert np.abs(unit).max() == pytest.approx(0.4)
    assert np.allclose(norm.from_unit(unit), v)
    m = norm.matrix_from_unit()
    assert np.allclose((m[:3, :3] @ unit.T).T + m[:3, 3], v)
    assert Normalization.from_dict(norm.to_dict()).scale == pytest.approx(norm.scale)


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_export_and_load_keep_geometry_and_vertex_colours(tmp_path, suffix):
    mesh = trimesh.creation.icosphere(1)
    colors = np.random.default_rng(0).integers(0, 256, size=(len(mesh.vertices), 3)).astype(np.uint8)
    path = export_mesh(tmp_path / f"m{suffix}", mesh.vertices, mesh.faces, colors)
    loaded = load_mesh(path)
    assert loaded.vertices.dtype == np.float32 and loaded.faces.dtype == np.uint32
    assert len(loaded.faces) == len(mesh.faces)
    # match vertices by position (formats may reorder), then compare colours
    order = np.lexsort(mesh.vertices.T)
    lorder = np.lexsort(loaded.vertices.T)
    assert np.allclose(loaded.vertices[lorder], mesh.vertices[order], atol=1e-5)
    assert np.array_equal(loaded.colors[lorder, :3], colors[order])
    plain = load_mesh(export_mesh(tmp_path / f"p{suffix}", mesh.vertices, mesh.faces))
    assert plain.colors is None
    float_cols = export_mesh(tmp_path / f"f{suffix}", mesh.vertices, mesh.faces, colors / 255.0)
    assert np.array_equal(load_mesh(float_cols).colors[np.lexsort(load_mesh(float_cols).vertices.T), :3],
                          colors[order])


@pytest.mark.invalid_glb
def test_io_errors_are_clear(tmp_path):
    m = trimesh.creation.box()
    with pytest.raises(InputError, match="unsupported"):
        export_mesh(tmp_path / "x.stl", m.vertices, m.faces)
    with pytest.raises(InputError, match="not found"):
        load_mesh(tmp_path / "missing.glb")
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a gltf file")
    with pytest.raises(InputError):
        load_mesh(bad)


def _brute(a, b):
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).min(axis=1)


def test_chamfer_and_f_score_match_brute_force():
    rng = np.random.default_rng(2)
    for n, m in ((30, 45), (7, 3)):
        a, b = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
        da, db = _brute(a, b), _brute(b, a)
        assert chamfer_distance(a, b) == pytest.approx(0.5 * da.mean() + 0.5 * db.mean())
        for d in (0.3, 0.8):
            p, r = (da <= d).mean(), (db <= d).mean()
            fs = 0.0 if p + r == 0 else 2 * p * r / (p + r)
            assert precision_recall(a, b, d) == pytest.approx((p, r))
            assert f_score(a, b, d) == pytest.approx(fs)
    assert chamfer_distance(a, a) == 0.0 and f_score(a, a, 1e-9) == 1.0
    assert f_score(a, a + 100.0, 0.1) == 0.0
    with pytest.raises(ValueError):
        chamfer_distance(np.zeros((0, 3)), a)


def test_volumetric_iou_and_surface_samples():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert volumetric_iou(a, b) == pytest.approx(1 / 3)
    assert volumetric_iou(a, a) == 1.0 and volumetric_iou(~(a | True), ~(b | True)) == 1.0
    with pytest.raises(ValueError):
        volumetric_iou(a.astype(float), b)
    sphere = trimesh.creation.icosphere(3)
    pts = sample_surface(sphere.vertices, sphere.faces, 500, seed=0)
    assert pts.shape == (500, 3) and np.allclose(np.linalg.norm(pts, axis=1), 1.0, atol=0.01)
    assert np.array_equal(pts, sample_surface(sphere.vertices, sphere.faces, 500, seed=0))


def test_quadric_decimation_keeps_the_surface_better_than_clustering(monkeypatch):
    """``decimate`` is quadric edge collapse: at the same face budget its vertices stay on the input surface
    (a sphere) more closely than vertex clustering's, colours follow the nearest input vertex, and a mesh far over
    the limit for one uninterruptible quadric call is clustered first and still meets the budget."""
    from backend.geometry import marching
    from backend.geometry.marching import cluster_decimate

    x = np.linspace(-0.5, 0.5, 64)
    p = np.stack(np.meshgrid(x, x, x, indexing="ij"), -1)
    box = lambda c, h: np.max(np.abs(p - np.array(c)) - np.array(h), axis=-1)  # noqa: E731
    sdf = np.minimum(box((0, 0, 0.2), (0.35, 0.25, 0.03)), box((0, 0, -0.05), (0.04, 0.04, 0.25)))  # top + leg
    v, f, _ = extract_mesh(sdf)
    cols = np.zeros((len(v), 3), np.uint8)
    cols[:, 0] = np.where(v[:, 2] > 0.1, 255, 0)  # red top, black leg
    vq, fq, cq = decimate(v, f, 1000, cols)
    vc, fc, _ = cluster_decimate(v, f, 1000, cols)
    assert len(fq) <= 1000 and len(fc) <= 1000
    assert len(decimate(v, f, 300, cols)[1]) <= 300  # below what quadric collapse reaches here: clustered after
    ref = trimesh.Trimesh(v, f).sample(3000, seed=0)

    def err(vv, ff):  # mean distance of the input surface to (dense samples of) the decimated one
        from scipy.spatial import cKDTree

        return float(cKDTree(trimesh.Trimesh(vv, ff).sample(40000, seed=1)).query(ref)[0].mean())

    assert err(vq, fq) < err(vc, fc)
    assert np.all(cq[vq[:, 2] > 0.15, 0] == 255) and np.all(cq[vq[:, 2] < 0.0, 0] == 0)
    monkeypatch.setattr(marching, "QUADRIC_MAX_FACES", 1000)
    calls = []
    real = marching.cluster_decimate
    monkeypatch.setattr(marching, "cluster_decimate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    v2, f2, c2 = decimate(v, f, 300, cols)
    assert calls == [4 * 300] and len(f2) <= 300 and len(c2) == len(v2)
