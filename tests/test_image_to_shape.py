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
