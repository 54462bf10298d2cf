"""The pretrained profile's Shap-E routes (issue 13) in real Blender, against a real ``tiny-pretrained`` backend.

One Blender process (``scenarios.py pretrained``): the status panel names the route of each workflow, and text to
shape (Shap-E prior, then Dream3D), image to shape (Shap-E img2img) and a gallery of two run from the operators.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(900)]

# seconds on a 2-core CPU: a few Shap-E steps, small grids, a few Dream3D iterations (operators' JSON options)
OPTIONS = {
    "text-to-shape": {"prior_steps": 3, "prior_resolution": 24, "dream3d_iterations": 4, "grid_resolution": 24,
                      "views": 1, "render_resolution": 16, "n_samples": 12, "resolution": 24,
                      "preview_resolution": 16, "preview_every": 2},
    "image-to-shape": {"config": {"steps": 3, "mesh_resolution": 24}},
    "gallery": {"preset": "smoke", "config": {"lift": {"steps": 2, "mesh_resolution": 16}}},
}


@pytest.fixture(scope="module")
def pretrained_run(addon_zip, tmp_path_factory, backend_cls, scenario_runner):
    folder = tmp_path_factory.mktemp("blender_pretrained")
    backend = backend_cls(folder / "backend", profile="tiny-pretrained").start()
    try:
        res = scenario_runner("pretrained", addon_zip, folder / "home", connection_file=backend.connection_file,
                              options=json.dumps(OPTIONS), env={"STEPSTONE_RUNTIME_DIR": str(backend.runtime)})
    finally:
        backend.stop()
    res["_backend_log"] = backend.log.read_text()[-3000:]
    return res


def step(run: dict, name: str) -> dict:
    if "fatal" in run:
        pytest.fail("scenario process failed: " + run["fatal"].get("error", "") + run["fatal"].get("traceback", ""))
    s = run.get(name)
    assert s is not None, f"step {name} did not run"
    assert s["ok"], f"step {name} failed: {s.get('error')}\n{s.get('traceback')}\n{run.get('_backend_log', '')}"
    return s


def _check_objects(s: dict, n: int) -> None:
    assert s["state"] == "done", s["error"]
    assert len(s["objects"]) == n
    for o in s["objects"]:
        assert o["vertices"] > 0 and o["faces"] > 0 and o["valid"]
        assert o["colour_attribute"] is not None and o.get("material_uses_attribute"), o


def test_panel_names_the_route_of_each_workflow(pretrained_run):
    s = step(pretrained_run, "connect")
    assert s["profile"] == "tiny-pretrained"
    assert s["capabilities"]["text-to-shape"] and s["capabilities"]["image-to-shape"] and s["capabilities"]["gallery"]
    assert "Shap-E" in s["routes"]["text-to-shape"] and s["routes"]["image-to-shape"] == "Shap-E img2img lift"
    text = step(pretrained_run, "status_panel")["text"]
    assert "Route: Shap-E shape prior" in text and "Route: Shap-E img2img lift" in text


def test_text_to_shape_with_the_shap_e_prior(pretrained_run):
    s = step(pretrained_run, "generate")
    _check_objects(s, 1)
    assert s["meshes_received"] >= 2  # the Shap-E prior preview, then the final mesh


def test_image_to_shape_with_shap_e_img2img(pretrained_run):
    _check_objects(step(pretrained_run, "image_to_shape"), 1)


def test_gallery_of_two_lifted_with_shap_e(pretrained_run):
    s = step(pretrained_run, "gallery")
    _check_objects(s, 2)
    assert len(s["images"]) == 2
