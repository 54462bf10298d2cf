"""Stylize workflow (issue 7): ISS++ Sec. 3.4 texture / shape-and-texture / SDS stylization of an artist's mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.losses.augment import AugmentConfig, augment, composite_background, random_crop_perspective
from backend.losses.prior_3d import prior_3d_loss, sample_prior_points


# ----------------------------------------------------------------------------------------- losses (pure torch)


def test_prior_3d_loss_is_eq6_and_pulls_back_to_the_initial_occupancy():
    init = torch.tensor([0.0, 1.0, 0.5, 0.2])
    occ = torch.tensor([0.5, 0.5, 0.5, 0.2], requires_grad=True)
    assert prior_3d_loss(occ, init, reduction="sum").item() == pytest.approx(1.0)  # Eq. 6 as written
    loss = prior_3d_loss(occ, init)  # mean
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    # gradient descent moves each point towards its initial occupancy; equal points get no push (subgradient 0)
    assert occ.grad[0] > 0 and occ.grad[1] < 0 and occ.grad[3] == 0
    assert prior_3d_loss(init, init).item() == 0.0
    with pytest.raises(ValueError):
        prior_3d_loss(occ, init[:2])


def test_prior_points_lie_in_the_cube_and_near_the_surface():
    g = torch.Generator().manual_seed(0)
    surf = torch.tensor([[0.25, 0.0, 0.0]])
    p = sample_prior_points(1000, generator=g, near_surface=surf, surface_fraction=0.5)
    assert p.shape == (1000, 3) and p.abs().max() <= 0.5
    near = ((p - surf).norm(dim=-1) < 0.1).float().mean()
    assert near > 0.45


def test_background_composite_and_augment_are_differentiable():
    g = torch.Generator().manual_seed(0)
    rgb = torch.zeros(2, 3, 16, 16, requires_grad=True)
    alpha = torch.zeros(2, 16, 16)
    red = torch.tensor([1.0, 0.0, 0.0])
    out = composite_background(rgb, alpha, red)
    assert torch.allclose(out[:, 0], torch.ones(2, 16, 16)) and out[:, 1:].abs().max() == 0
    # random background: one colour per iteration, different across iterations
    a = torch.ones(2, 1, 16, 16)
    a[..., :4] = 0.0
    img1, bg1 = augment(rgb, a, AugmentConfig(), generator=g)
    img2, bg2 = augment(rgb, a, AugmentConfig(), generator=g)
    assert torch.allclose(bg1[0], bg1[1]) and not torch.allclose(bg1, bg2)
    assert torch.allclose(img1[0, :, 0, 0], bg1[0])
    img3, _ = augment(rgb, a, AugmentConfig(crops=True, perspective_p=1.0), generator=g)
    assert img3.shape == rgb.shape
    img3.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_perspective_fill_is_the_background_colour():
    g = torch.Generator().manual_seed(3)
    img = torch.full((1, 3, 32, 32), 0.5)
    fill = torch.tensor([0.0, 1.0, 0.0])
    out = random_crop_perspective(img, AugmentConfig(crops=True, crop_scale=(1.0, 1.0), perspective_p=1.0,
                                                     distortion_scale=0.9), generator=g, fill=fill)
    uncovered = (out - 0.5).abs().sum(1) > 0.1
    assert uncovered.any()
    assert torch.allclose(out[0, :, uncovered[0]].mean(-1), fill, atol=0.2)


# ----------------------------------------------------------------------------------------- the workflow

import trimesh  # noqa: E402

from backend.errors import Cancelled, InputError, ModelUnavailable  # noqa: E402
from backend.events import JobContext, MeshInput, MeshUpdate, Progress  # noqa: E402
from backend.pipelines import stylize  # noqa: E402

# Tiny but real: the tiny profile's random open_clip model, 32 px renders of 2 views, a 32^3 grid.
FAST = dict(iterations=6, views=2, render_resolution=32, n_samples=16, grid_resolution=32, preview_every=3,
            eval_views=2)


@pytest.fixture(scope="module")
def tiny_profile():
    from backend.models.registry import load_profile

    return load_profile("tiny")


def _mesh_input(mesh: trimesh.Trimesh, name: str = "object", matrix_world=None) -> MeshInput:
    return MeshInput(name, np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32), None,
                     matrix_world)


def _run(profile, mesh_input: MeshInput, seed: int = 0, **params):
    p = stylize.validate({"style": "mahogany", **FAST, **params}, [mesh_input])
    ctx = JobContext(profile=profile, device="cpu", seed=seed)
    events = list(stylize.run(p, [mesh_input], ctx))
    finals = [e for e in events if isinstance(e, MeshUpdate) and e.final]
    assert len(finals) == 1 and events[-1] is finals[0]
    return events, finals[0]


def _bbox(v: np.ndarray) -> np.ndarray:
    return np.stack([np.min(v, axis=0), np.max(v, axis=0)])


def test_texture_mode_keeps_the_topology_and_raises_the_clip_score(tiny_profile):
    box = trimesh.creation.box((1.0, 0.6, 0.4))
    m = np.eye(4)
    m[:3, :3] *= 2.0
    m[:3, 3] = (1.0, -2.0, 0.5)
    mi = _mesh_input(box, "crate", m)
    events, out = _run(tiny_profile, mi, iterations=8, lr_color=0.03)
    # the artist's topology survives exactly: same vertices (same order), same faces, new colours
    assert np.array_equal(out.vertices, mi.vertices) and np.array_equal(out.faces, mi.faces)
    assert out.colors.shape == (len(mi.vertices), 3) and out.colors.dtype == np.uint8
    assert out.info["clip_score_final"] > out.info["clip_score_initial"]
    steps = [e for e in events if isinstance(e, Progress) and e.stage == "texture"]
    assert [e.step for e in steps] == list(range(1, 9)) and all(e.total == 8 for e in steps)
    previews = [e for e in events if isinstance(e, MeshUpdate) and not e.final]
    assert previews and all(np.array_equal(e.faces, mi.faces) for e in previews)


def test_shape_mode_prior_loss_keeps_the_structure_and_the_input_space(tiny_profile):
    blob = trimesh.creation.icosphere(2, 0.5)
    blob.vertices = blob.vertices * [1.0, 0.7, 0.5] + [3.0, 0.0, 1.0]  # off-centre, not unit size
    mi = _mesh_input(blob, "blob")
    common = dict(mode="shape", iterations=8, lr_density=1.0)
    _, with_prior = _run(tiny_profile, mi, lambda_p=10.0, **common)
    _, without = _run(tiny_profile, mi, lambda_p=0.0, **common)
    assert with_prior.info["iou"] >= 0.8
    assert without.info["iou"] < with_prior.info["iou"]
    # remeshed output lies in the input object's own space: same bounding box within a few percent
    tol = 0.05 * float(np.ptp(mi.vertices, axis=0).max())
    assert np.abs(_bbox(with_prior.vertices) - _bbox(mi.vertices)).max() < tol
    assert with_prior.colors.shape == (len(with_prior.vertices), 3)


def test_shape_mode_maps_back_through_the_world_matrix(tiny_profile):
    box = trimesh.creation.box((1.0, 0.5, 0.5))
    m = np.eye(4)
    rot = trimesh.transformations.rotation_matrix(np.pi / 4, [0, 0, 1])[:3, :3]
    m[:3, :3] = rot @ np.diag([3.0, 1.0, 1.0])  # rotated, non-uniformly scaled object
    m[:3, 3] = (10.0, 0.0, -4.0)
    mi = _mesh_input(box, "beam", m)
    _, out = _run(tiny_profile, mi, mode="shape", iterations=2, lambda_p=10.0)
    tol = 0.08 * float(np.ptp(mi.vertices, axis=0).max())
    assert np.abs(_bbox(out.vertices) - _bbox(mi.vertices)).max() < tol


def _open_mesh() -> trimesh.Trimesh:
    cyl = trimesh.creation.cylinder(radius=0.3, height=1.0, sections=16)
    keep = np.abs(cyl.face_normals[:, 2]) < 0.5  # drop the caps: an open tube
    return trimesh.Trimesh(cyl.vertices, cyl.faces[keep], process=False)


def _non_manifold_mesh() -> trimesh.Trimesh:
    a = trimesh.creation.box((0.5, 0.5, 0.5))
    b = trimesh.creation.box((0.5, 0.5, 0.5))
    b.apply_translation((0.5, 0.5, 0.0))  # touches the first box along one edge only
    m = trimesh.util.concatenate([a, b])
    v = np.vstack([m.vertices, [[0.0, 0.0, 0.8]]])
    fin = [[0, 1, len(v) - 1]]  # a dangling fin: an edge with three faces
    return trimesh.Trimesh(v, np.vstack([m.faces, fin]), process=False)


def _parts_mesh() -> trimesh.Trimesh:
    a = trimesh.creation.icosphere(1, 0.3)
    b = trimesh.creation.icosphere(1, 0.2)
    b.apply_translation((0.9, 0.0, 0.0))
    return trimesh.util.concatenate([a, b])


@pytest.mark.parametrize("make", [_open_mesh, _non_manifold_mesh, _parts_mesh], ids=["open", "nonmanifold", "parts"])
def test_any_mesh_an_artist_may_select_is_stylized(tiny_profile, make):
    mesh = make()
    mi = _mesh_input(mesh, make.__name__)
    _, tex = _run(tiny_profile, mi, iterations=2, views=1, preview_every=0, crops=True)
    assert np.array_equal(tex.faces, mi.faces) and tex.colors.shape == (len(mi.vertices), 3)
    _, shp = _run(tiny_profile, mi, mode="shape", iterations=1, views=1, preview_every=0)
    assert len(shp.faces) > 0
    tol = 0.1 * float(np.ptp(mi.vertices, axis=0).max())
    assert np.abs(_bbox(shp.vertices) - _bbox(mi.vertices)).max() < tol
    if make is _parts_mesh:  # both parts survive remeshing
        assert trimesh.Trimesh(shp.vertices, shp.faces).body_count == 2


def test_bad_input_gives_a_clear_error():
    box = trimesh.creation.box()
    good = _mesh_input(box)
    nan = MeshInput("nan", good.vertices.copy(), good.faces, None, None)
    nan.vertices[3] = np.nan
    empty = MeshInput("empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32), None, None)
    cases = [
        ({"style": "ice"}, [nan], "NaN"),
        ({"style": "ice"}, [empty], "empty"),
        ({"style": "ice", "max_faces": 10}, [good], "limit"),
        ({"style": "ice"}, [], "select the object"),
        ({"style": "ice"}, [good, good], "single object"),
        ({"style": "   "}, [good], "style text is empty"),
        ({"style": "ice", "mode": "paint"}, [good], "mode"),
        ({"style": "ice", "strength": 2}, [good], "strength"),
        ({"style": "ice", "iterationz": 3}, [good], "unknown option"),
    ]
    for params, inputs, words in cases:
        with pytest.raises(InputError) as exc:
            stylize.validate(params, inputs)
        assert words in exc.value.message, exc.value.message


def test_sds_mode_without_a_diffusion_model_is_rejected_with_the_reason(tmp_path, monkeypatch):
    from backend.models.registry import load_profile

    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(tmp_path / "no-weights"))
    profile = load_profile("starter")
    mi = _mesh_input(trimesh.creation.box())
    params = stylize.validate({"style": "ice", "mode": "sds"}, [mi])
    with pytest.raises(ModelUnavailable) as exc:
        list(stylize.run(params, [mi], JobContext(profile=profile)))
    assert "diffusion" in exc.value.message and "python -m backend" in exc.value.message


def test_sds_mode_runs_with_the_tiny_diffusion_model(tiny_profile):
    mi = _mesh_input(trimesh.creation.box((0.6, 0.6, 1.0)), "lamp")
    events, out = _run(tiny_profile, mi, mode="sds", iterations=2, render_resolution=16, preview_every=1)
    assert out.info["prompt"] == "A lamp imitating a mahogany"
    assert len(out.faces) > 0 and out.info["iou"] > 0.5
    assert any(isinstance(e, MeshUpdate) and not e.final for e in events)


def test_cancel_stops_the_optimisation(tiny_profile):
    mi = _mesh_input(trimesh.creation.box())
    p = stylize.validate({"style": "ice", **FAST, "iterations": 50}, [mi])
    ctx = JobContext(profile=tiny_profile, device="cpu")
    seen = 0
    with pytest.raises(Cancelled):
        for ev in stylize.run(p, [mi], ctx):
            if isinstance(ev, Progress) and ev.stage == "texture":
                seen += 1
                ctx.cancel.cancel()
    assert seen == 1


def test_cli_run_stylize_writes_the_stylized_mesh(tmp_path, tiny_profile):
    from backend.cli import main
    from backend.geometry.io import export_mesh, load_mesh

    src = tmp_path / "in.glb"
    box = trimesh.creation.box((1.0, 0.5, 0.3))
    export_mesh(src, box.vertices, box.faces)
    before = load_mesh(src)
    out = tmp_path / "out.glb"
    rc = main(["run", "stylize", "--mesh", str(src), "--style", "made of glacier ice", "--profile", "tiny",
               "--iterations", "2", "--views", "1", "--render-resolution", "24", "--grid-resolution", "24",
               "--out", str(out)])
    assert rc == 0 and out.is_file()
    after = load_mesh(out)
    assert len(after.vertices) == len(before.vertices) and np.array_equal(after.faces, before.faces)
    assert after.colors is not None


def test_bake_texture_puts_the_colour_field_onto_the_uv_map():
    """Texture mode with a UV map (issue 16): each texel takes the colour of its own surface point; the islands
    are padded and the rest of the image stays transparent."""
    import torch

    from backend.pipelines.stylize import bake_texture

    # a quad in the z = 0 plane (unit cube coordinates) unwrapped onto the left half of the UV square
    v = np.array([[-0.4, -0.4, 0.0], [0.4, -0.4, 0.0], [0.4, 0.4, 0.0], [-0.4, 0.4, 0.0]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    uv_of_vertex = np.array([[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]])
    uvs = uv_of_vertex[f].astype(np.float32)

    def color_fn(p):  # red follows x, green follows y
        return torch.stack([p[:, 0] + 0.5, p[:, 1] + 0.5, torch.zeros_like(p[:, 0])], dim=1)

    img = bake_texture(color_fn, v, f, uvs, 64, beta=0.05, device="cpu")
    assert img.shape == (64, 64, 4) and img.dtype == np.uint8
    alpha = img[..., 3] > 0
    assert alpha[:, :30].all() and not alpha[:, 40:].any()  # left half covered (+ padding), right half empty
    red = img[32, 2:30, 0].astype(int)
    assert (np.diff(red) >= 0).all() and red[-1] - red[0] > 150  # x grows to the right in UV u
    green = img[2:62, 16, 1].astype(int)
    assert (np.diff(green) <= 0).all() and green[0] - green[-1] > 150  # row 0 is the top of the image (v = 1)
