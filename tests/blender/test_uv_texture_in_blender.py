"""Pipeline-ready results in real Blender (issue 16): Generate with *UV texture* on, against a real ``tiny`` backend.

One Blender process (``scenarios.py uv``): two variants arrive each with a UV map and a material whose Base Color
is its own baked image on that UV map, the ``Col`` colour attribute kept; Re-import brings the same from the job
store's textured GLB files.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(900)]

OPTIONS = {"text-to-shape": {"iterations": 2, "views": 1, "render_resolution": 16, "n_samples": 8, "resolution": 24,
                             "preview_resolution": 12, "preview_every": 1, "texture_iterations": 1,
                             "texture_size": 64}}


@pytest.fixture(scope="module")
def uv_run(addon_zip, tmp_path_factory, backend_cls, scenario_runner):
    folder = tmp_path_factory.mktemp("blender_uv")
    backend = backend_cls(folder / "backend").start()
    try:
        res = scenario_runner("uv", addon_zip, folder / "home", connection_file=backend.connection_file,
                              options=json.dumps(OPTIONS), env={"STEPSTONE_RUNTIME_DIR": str(backend.runtime)})
    finally:
        backend.stop()
    res["_backend_log"] = backend.log.read_text()[-3000:]
    return res


def step(run: dict, name: str) -> dict:
    if "fatal" in run:
        pytest.fail("scenario process failed: " + run["fatal"].get("error", "") + run["fatal"].get("traceback", "")
                    + run.get("_stdout", ""))
    s = run.get(name)
    assert s is not None, f"step {name} did not run"
    assert s["ok"], f"step {name} failed: {s.get('error')}\n{s.get('traceback')}\n{run.get('_backend_log', '')}"
    return s


def _check_textured(o: dict) -> None:
    assert o["valid"], f"{o['name']}: Blender's mesh validation found problems"
    assert o["uv_map"] == "UVMap", f"{o['name']} has no UV map"
    assert o["uv_finite"] and 0.0 <= o["uv_range"][0] and o["uv_range"][1] <= 1.0
    tex = o["texture"]
    assert tex is not None, f"{o['name']}: its material takes no image as Base Color"
    assert tex["size"] == [64, 64] and tex["packed"] and tex["uv_node_map"] == "UVMap"
    ca = o["colour_attribute"]
    assert ca is not None and ca["domain"] == "POINT", "the vertex colours were dropped"


def test_generated_results_have_a_uv_map_and_a_baked_image_texture(uv_run):
    s = step(uv_run, "generate_uv")
    assert s["state"] == "done", s["error"]
    assert s["slots"] == ["variant_0", "variant_1"]
    for o in s["objects"]:
        _check_textured(o)
    assert len({o["texture"]["image"] for o in s["objects"]}) == 2, "each variant has its own texture"


def test_reimport_brings_the_texture_back_from_the_job_store(uv_run):
    s = step(uv_run, "reimport_uv")
    assert len(s["objects"]) == 2
    for o in s["objects"]:
        _check_textured(o)
