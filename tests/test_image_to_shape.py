"""image-to-shape workflow (CISP paper 002 / ISS SVR paper 000) on the tiny profile."""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from backend.errors import InputError, ModelUnavailable
from backend.events import JobContext, MeshUpdate, Progress
from backend.models.registry import load_profile
from backend.pipelines import get_workflow
from backend.pipelines.image_to_shape import decode_image, project_colors

TINY = {"steps": 2, "voxel_upsample": 2, "mesh_resolution": 16}
# held-out mean IoU floor of the shipped starter CISP (8 shapes, 16^3, seed 0): measured 0.29 (2026-11-27, the CPU
# retrain in the manifest); the first starter model (eps prediction, exploding samples) scored ~0.1
MEAN_IOU = 0.25


@pytest.fixture(scope="module")
def profile():
    return load_profile("tiny")


def _png(path, size=(48, 40)):
    a = np.full((size[1], size[0], 3), 255, np.uint8)
    a[8:32, 8:40] = [200, 40, 40]
    PILImage.fromarray(a).save(path)
    return path


def _params(path, method="auto"):
    wf = get_workflow("image-to-shape")
    parser = argparse.ArgumentParser()
    wf.add_arguments(parser)
    args = parser.parse_args(["--image", str(path), "--method", method])
    params, inputs = wf.params_from_args(args)
    params["config"].update(TINY)
    return wf, wf.validate(params, inputs), inputs


@pytest.mark.parametrize("method", ["auto", "svr"])
def test_lifts_an_image_to_a_coloured_mesh(profile, tmp_path, method):
    wf, params, inputs = _params(_png(tmp_path / "concept.png"), method)
    events = list(wf.run(params, inputs, JobContext(profile=profile, device="cpu", seed=1)))
    finals = [e for e in events if isinstance(e, MeshUpdate) and e.final]
    assert any(isinstance(e, Progress) for e in events)
    assert len(finals) == 1
    m = finals[0]
    assert m.name == "concept" and m.info["method"] == ("cisp" if method == "auto" else "svr")
    assert len(m.faces) > 0 and m.faces.max() < len(m.vertices)
    assert m.colors is not None and m.colors.shape == (len(m.vertices), 3)
    assert np.abs(m.vertices).max() <= 0.5 + 1e-4  # in the unit cube


def test_cli_writes_a_glb(tmp_path, profile):
    from backend.cli import main
    from backend.geometry.io import load_mesh

    out = tmp_path / "shape.glb"
    rc = main(["run", "image-to-shape", "--profile", "tiny", "--device", "cpu", "--image",
               str(_png(tmp_path / "c.png")), "--steps", "2", "--resolution", "16", "--out", str(out)])
    assert rc == 0 and out.is_file()
    mesh = load_mesh(out)
    assert len(mesh.faces) > 0


def test_projected_colours_follow_the_image():
    """Front view (camera on -Y): image left = world -X. Left half red, right half blue."""
    img = torch.zeros(1, 3, 32, 32)
    img[0, 0, :, :16] = 1.0
    img[0, 2, :, 16:] = 1.0
    fn = project_colors(img, 0.0, 0.0)
    c = fn(np.array([[-0.25, 0.0, 0.0], [0.25, 0.0, 0.0]], np.float32))
    assert c[0, 0] > 0.9 and c[0, 2] < 0.1
    assert c[1, 2] > 0.9 and c[1, 0] < 0.1


def test_transparent_pixels_become_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255
    a[:4, :, 3] = 255
    buf = io.BytesIO()
    PILImage.fromarray(a, "RGBA").save(buf, format="PNG")
    x = decode_image(buf.getvalue())
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[0, :, 7, 0], torch.tensor([1.0, 1.0, 1.0]))


def test_bad_images_get_clear_errors(tmp_path):
    wf = get_workflow("image-to-shape")
    with pytest.raises(InputError, match="needs an image"):
        wf.validate({}, [])
    with pytest.raises(InputError, match="not a readable image"):
        wf.validate({"image_png": base64.b64encode(b"this is not a png").decode()}, [])
    with pytest.raises(InputError, match="base64"):
        wf.validate({"image_png": "***"}, [])
    parser = argparse.ArgumentParser()
    wf.add_arguments(parser)
    with pytest.raises(InputError, match="not found"):
        wf.params_from_args(parser.parse_args(["--image", str(tmp_path / "missing.png")]))
    png = base64.b64encode((_png(tmp_path / "ok.png")).read_bytes()).decode()
    with pytest.raises(InputError, match="method"):
        wf.validate({"image_png": png, "method": "nerf"}, [])


def test_missing_models_name_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(tmp_path / "nothing"))
    wf, params, inputs = _params(_png(tmp_path / "c.png"), "cisp")
    with pytest.raises(ModelUnavailable, match="cisp"):
        list(wf.run(params, inputs, JobContext(profile=load_profile("starter"), device="cpu")))


# ----------------------------------------------------------------------------------- shipped starter weights (issue 12)


@pytest.fixture(scope="module")
def heldout_views():
    """Eight held-out shapes (never trained on): a 64^2 render from the benchmark's first camera, 16^3 truth."""
    import torch.nn.functional as F

    from backend.bench.quality import EVAL_CAMS
    from backend.training.dataset import voxelize
    from backend.training.render_world import render_shape
    from backend.training.split import heldout_benchmark_set

    out = []
    for shape in heldout_benchmark_set(8, seed=0):
        gt = torch.from_numpy(voxelize(shape, 32).astype(np.float32))[None, None]
        gt16 = (F.adaptive_avg_pool3d(gt, 16)[0, 0] >= 0.25).numpy()  # as the benchmark and the trainer pool it
        img = torch.from_numpy(render_shape(shape, EVAL_CAMS[:1], 64)["rgb"]).permute(0, 3, 1, 2).float()
        out.append((shape, img, gt16))
    return out


def test_starter_cisp_lifts_heldout_images_to_their_shapes(heldout_views):
    """Shipped CISP, fixed seed, CPU: held-out images give grids of about their shapes' fill that overlap them.

    The first starter model (eps prediction) denoised one step well but its DDIM samples filled ~25% of the grid
    where the shapes fill ~3% (IoU ~0.1); this pins the fix (x0 prediction, see backend/models/cisp.py).
    """
    from backend.geometry.metrics import volumetric_iou

    cisp = load_profile("starter").cisp()
    images = torch.cat([img for _, img, _ in heldout_views])
    with torch.no_grad():
        occ = cisp.sample(cisp.encode_image(images), generator=torch.Generator().manual_seed(0)).numpy() > 0.5
    gts = [gt for _, _, gt in heldout_views]
    fill, gt_fill = occ.mean(), np.mean([g.mean() for g in gts])
    assert 0.5 * gt_fill <= fill <= 2.0 * gt_fill, (fill, gt_fill)
    for (shape, _, gt), o in zip(heldout_views, occ):
        assert 0 < o.mean() <= 3.0 * gt.mean(), (shape.category, o.mean(), gt.mean())  # neither empty nor exploded
    iou = np.array([[volumetric_iou(o, g) for g in gts] for o in occ])  # sample i against every truth j
    assert iou.diagonal().mean() >= MEAN_IOU, iou.diagonal()
    # the condition matters: a sample overlaps its own shape more than the other held-out shapes
    others = iou[~np.eye(len(gts), dtype=bool)].mean()
    assert iou.diagonal().mean() > 2.0 * others, (iou.diagonal().mean(), others)


def test_starter_image_to_shape_workflow_on_a_heldout_render(heldout_views, tmp_path):
    """The workflow (PNG bytes in, mesh out) on a held-out render: a surface at the nominal level, the right size."""
    from backend.pipelines.image_to_shape import encode_png

    shape, img, gt = heldout_views[3]  # a bench
    path = tmp_path / "heldout.png"
    path.write_bytes(encode_png(img))
    wf = get_workflow("image-to-shape")
    parser = argparse.ArgumentParser()
    wf.add_arguments(parser)
    params, inputs = wf.params_from_args(parser.parse_args(["--image", str(path), "--method", "cisp"]))
    params = wf.validate(params, inputs)
    events = list(wf.run(params, inputs, JobContext(profile=load_profile("starter"), device="cpu", seed=0)))
    final = [e for e in events if isinstance(e, MeshUpdate) and e.final][0]
    assert "iso_fallback" not in final.info  # the sample has a surface at occupancy 0.5 of its own
    assert 0.4 * gt.mean() <= final.info["occupied"] <= 2.5 * gt.mean()
    ext = final.vertices.max(0) - final.vertices.min(0)
    idx = np.argwhere(gt)
    gt_ext = (idx.max(0) - idx.min(0) + 1) / gt.shape[0]
    assert np.all(np.abs(ext - gt_ext) <= 0.25), (ext, gt_ext)
