"""Shap-E as the pretrained profile's 3D prior (issue 13), on the CPU with tiny random Shap-E components.

The ``tiny-pretrained`` profile runs the ``pretrained`` profile's routes (Shap-E prior + Dream3D for text to shape,
Shap-E img2img for image to shape and the theme gallery) with diffusers' test-size Shap-E pipelines built in
memory. The real loading path (``from_pretrained`` from the Hugging Face cache, fp16 variant) is checked by saving
those pipelines with ``save_pretrained`` into a temporary cache laid out as a download leaves it.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import InputError, ModelUnavailable
from backend.events import CancelToken, Image, JobContext, MeshInput, MeshUpdate, Progress
from backend.models import hub, registry, shap_e
from backend.pipelines import get_workflow

ROOT = Path(__file__).resolve().parents[1]

# seconds on a CPU: a few Shap-E steps, small grids, a few Dream3D iterations
T2S = {"prompt": "a red chair", "prior_steps": 3, "prior_resolution": 24, "dream3d_iterations": 4,
       "grid_resolution": 24, "views": 1, "render_resolution": 16, "n_samples": 12, "resolution": 24,
       "preview_resolution": 16, "preview_every": 2}
I2S_CONFIG = {"steps": 3, "mesh_resolution": 24}
GALLERY = {"preset": "smoke", "config": {"lift": {"steps": 2, "mesh_resolution": 16}}}


@pytest.fixture(scope="module")
def profile():
    return registry.load_profile("tiny-pretrained")


@pytest.fixture(scope="module")
def text_model(profile):
    return profile.shap_e()


@pytest.fixture(scope="module")
def image_model(profile):
    return profile.shap_e_img2img()


def _png(color=(200, 40, 40), size=48) -> bytes:
    from PIL import Image as PILImage

    a = np.full((size, size, 3), 255, np.uint8)
    a[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = color
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _run(workflow: str, params: dict, profile, inputs=None, seed: int = 0) -> list:
    wf = get_workflow(workflow)
    p = wf.validate(params, inputs or [], profile=profile)
    return list(wf.run(p, inputs or [], JobContext(profile=profile, device="cpu", seed=seed)))


# ------------------------------------------------------------------------------------------------ the model


def test_tiny_components_have_diffusers_test_shapes(text_model, image_model):
    prior = text_model.pipe.prior.config
    assert (prior.num_attention_heads, prior.attention_head_dim, prior.num_embeddings, prior.embedding_dim) == (
        2, 16, 32, 16)
    r = text_model.pipe.shap_e_renderer.config
    assert r.d_latent == 16 and r.d_hidden == 8 and [list(s) for s in r.param_shapes] == [[8, 93], [8, 8], [8, 8],
                                                                                        [8, 8]]
    assert text_model.pipe.text_encoder.config.hidden_size == 16
    assert image_model.pipe.image_encoder.config.hidden_size == 16
    # the tokenizer is built locally (open_clip's BPE) and reads a prompt like OpenAI CLIP's
    ids = text_model.pipe.tokenizer("a red chair").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5


@pytest.mark.parametrize("kind", ["text", "image"])
def test_sampling_loop_equals_the_diffusers_pipeline(kind, text_model, image_model):
    """Our cancellable loop gives the very latents ``pipe(..., output_type="latent")`` gives for the same seed."""
    from PIL import Image as PILImage

    model = text_model if kind == "text" else image_model
    cond = "a red chair" if kind == "text" else PILImage.open(io.BytesIO(_png()))
    steps = []
    ours = model.sample(cond, steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                        on_step=lambda i, n: steps.append((i, n)))
    ref = model.pipe(cond if kind == "text" else [cond], num_inference_steps=3, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == (1, 32, 16)
    torch.testing.assert_close(ours, ref)
    assert steps[0] == (0, 5) and steps[-1] == (5, 5)  # Heun: 2 x 3 - 1 scheduler steps


def test_sdf_grid_is_the_mlp_field_at_the_grid_corners(text_model):
    """Grid index (i, j, k) is the point (x_i, y_j, z_k) of Shap-E's [-1, 1]^3 box (volume_query_points' order)."""
    latent = text_model.sample("a lamp", steps=2, generator=torch.Generator().manual_seed(1))
    sdf, mlp = text_model.sdf_grid(latent, 9)
    lin = np.linspace(-1, 1, 9)
    for i, j, k in [(0, 4, 8), (8, 1, 3), (2, 7, 5)]:
        p = torch.tensor([[[lin[i], lin[j], lin[k]]]], dtype=torch.float32)
        with torch.no_grad():
            d = mlp(position=p, direction=None, ts=None, nerf_level="fine", rendering_mode="stf").signed_distance
        assert abs(float(d) - sdf[i, j, k]) < 1e-5


def test_decoded_mesh_is_in_the_unit_cube_with_colours_and_glb_gets_the_90_degree_fix(text_model, tmp_path):
    """Marching cubes through scikit-image, unit-cube normalisation, and the frame: the backend is Z-up like Shap-E,
    so the GLB written from it holds the raw vertices rotated -90 deg about X (the fix diffusers' docs apply)."""
    import trimesh

    from backend.geometry.io import export_mesh

    latent = text_model.sample("a table", steps=2, generator=torch.Generator().manual_seed(2))
    shape = text_model.decode_mesh(latent, 24)
    v = shape.vertices
    assert len(shape.faces) > 0 and shape.faces.max() < len(v)
    assert v.min() >= -0.5 and v.max() <= 0.5
    assert abs(float((v.max(0) - v.min(0)).max()) - 0.9) < 1e-4  # longest side 0.9, centred
    assert shape.colors is not None and shape.colors.dtype == np.uint8 and len(shape.colors) == len(v)
    export_mesh(tmp_path / "s.glb", v, shape.faces, shape.colors)
    file_v = np.asarray(trimesh.load(tmp_path / "s.glb", force="mesh", process=False).vertices)
    rot = trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])[:3, :3]
    np.testing.assert_allclose(np.sort(file_v, axis=0), np.sort(v @ rot.T, axis=0), atol=1e-5)
    # the project's SDF (negative inside) of the decoded shape, for Dream3D Eq. 9
    sdf = shap_e.prior_sdf(shape, 16)
    assert sdf.shape == (16, 16, 16) and sdf.min() < 0 < sdf.max()


# ------------------------------------------------------------------------------------------------ profiles


def test_capabilities_name_the_route_of_every_workflow(profile):
    caps = profile.capabilities()
    for wf in ("text-to-shape", "image-to-shape", "gallery"):
        assert caps[wf]["available"], caps[wf]
    assert "Shap-E" in caps["text-to-shape"]["route"] and "Dream3D" in caps["text-to-shape"]["route"]
    assert caps["image-to-shape"]["route"] == "Shap-E img2img lift"
    assert caps["image-to-shape"]["options"]["method"]["shap-e"]["available"]
    assert "Shap-E img2img" in caps["gallery"]["route"]
    assert caps["text-to-shape"]["options"]["quality"]["refined"]["available"]
    tiny = registry.load_profile("tiny").capabilities()
    assert "ISS++" in tiny["text-to-shape"]["route"] and "shap-e" not in tiny["image-to-shape"]["options"]["method"]
    assert set(profile.components()) == set(registry.KINDS + registry.PRIOR_KINDS)
    assert not profile.component("svr").present and not profile.component("svr").public


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-empty"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("STEPSTONE_SHAP_E_MODEL", raising=False)
    monkeypatch.delenv("STEPSTONE_SHAP_E_IMG2IMG_MODEL", raising=False)
    return cache


def test_missing_shap_e_download_names_the_command(empty_hf_cache):
    prof = registry.load_profile("pretrained")
    st = prof.component("shap-e")
    assert not st.present and st.fetch == "python -m backend models download shap-e"
    caps = prof.capabilities()
    assert "python -m backend models download shap-e" in caps["text-to-shape"]["reason"]
    assert "python -m backend models download shap-e-img2img" in caps["image-to-shape"]["reason"]
    assert "Shap-E" in caps["text-to-shape"]["route"]
    with pytest.raises(ModelUnavailable, match=r"python -m backend models download shap-e\b"):
        prof.shap_e()
    with pytest.raises(ModelUnavailable, match="models download shap-e"):
        get_workflow("text-to-shape").validate({"prompt": "a chair"}, [], profile=prof)
    with pytest.raises(ModelUnavailable, match="models download shap-e-img2img"):
        get_workflow("image-to-shape").validate({"image_png": base64.b64encode(_png()).decode()}, [], profile=prof)


def test_download_offline_is_a_clear_message(empty_hf_cache, monkeypatch, capsys):
    from backend.models.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "shap-e"]) == 2
    err = capsys.readouterr().err
    assert "openai/shap-e" in err and "python -m backend models download shap-e" in err


def _fake_download(cache: Path, repo: str, model: shap_e.ShapE) -> Path:
    """The tiny pipeline, in fp16, saved as the fp16 variant where ``snapshot_download`` would leave openai's."""
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    fp16 = shap_e.ShapE(shap_e.build_tiny_pipeline(model.kind), model.kind)
    fp16.pipe.to(torch.float16)
    fp16.save_pretrained(snap, variant="fp16")
    refs = snap.parents[1] / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text("0" * 40)
    return snap


@pytest.fixture(scope="module")
def fake_hf_cache(tmp_path_factory, text_model, image_model):
    cache = tmp_path_factory.mktemp("hf-cache")
    _fake_download(cache, "openai/shap-e", text_model)
    _fake_download(cache, "openai/shap-e-img2img", image_model)
    return cache


def test_pretrained_loads_shap_e_from_the_hf_cache_with_from_pretrained(fake_hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hf_cache))
    monkeypatch.delenv("STEPSTONE_SHAP_E_MODEL", raising=False)
    prof = registry.load_profile("pretrained")
    for kind in registry.PRIOR_KINDS:
        st = prof.component(kind)
        assert st.present and "fp16 weights" in st.detail, st.detail
        assert hub.shap_e_variant(shap_e.model_id(kind), kind) == "fp16"
    registry.clear_cache()
    try:
        loaded = prof.shap_e()
        assert loaded.pipe.prior.dtype == torch.float32  # fp16 files, fp32 on a CPU
        built = shap_e.build_tiny_pipeline("shap-e")
        for name, p in built.prior.state_dict().items():
            torch.testing.assert_close(loaded.pipe.prior.state_dict()[name], p.half().float())
        shape = loaded.decode_mesh(loaded.sample("a chair", steps=2, generator=torch.Generator().manual_seed(0)), 16)
        assert len(shape.faces) > 0
        lifted = prof.shap_e_img2img()
        assert type(lifted.pipe).__name__ == "ShapEImg2ImgPipeline"
        # the route text-to-shape takes on pretrained needs CLIP too: with only Shap-E cached the reason names CLIP
        caps = prof.capabilities()
        assert caps["image-to-shape"]["available"] and caps["image-to-shape"]["options"]["method"]["shap-e"][
            "available"]
        assert "download shap-e" not in caps["text-to-shape"]["reason"]
    finally:
        registry.clear_cache()


def test_models_check_lists_shap_e_from_the_cache(fake_hf_cache, monkeypatch, capsys):
    from huggingface_hub import constants

    from backend.models.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hf_cache))
    monkeypatch.delenv("STEPSTONE_SHAP_E_MODEL", raising=False)
    assert main(["check", "--profile", "pretrained"]) == 1  # CLIP, SD and the ISS models are still missing
    lines = capsys.readouterr().out.splitlines()
    assert any(l.split()[:2] == ["ok", "shap-e"] and "openai/shap-e" in l for l in lines), lines
    assert any(l.split()[:2] == ["ok", "shap-e-img2img"] for l in lines), lines
    assert any(l.split()[:2] == ["image-to-shape", "available"] for l in lines), lines
    assert any(l.split()[:2] == ["MISSING", "clip"] and "models download clip" in l for l in lines), lines


# ------------------------------------------------------------------------------------------------ workflows


def test_text_to_shape_streams_the_shap_e_prior_first_then_dream3d(profile):
    events = _run("text-to-shape", dict(T2S, variants=2), profile, seed=4)
    meshes = [e for e in events if isinstance(e, MeshUpdate)]
    first_mesh = events.index(meshes[0])
    assert meshes[0].info["stage"] == "shap-e prior" and not meshes[0].final
    assert meshes[0].colors is not None and len(meshes[0].faces) > 0
    # the prior preview comes before any Dream3D iteration
    assert not any(isinstance(e, Progress) and e.stage.startswith("dream3d") for e in events[:first_mesh])
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert "shap-e 1/2" in stages and "dream3d 2/2" in stages
    d3 = [e for e in events if isinstance(e, Progress) and e.stage == "dream3d 1/2"]
    assert len(d3) == 4 and all(k in d3[-1].message for k in ("clip=", "transmittance=", "prior="))
    assert any(e.info.get("stage") == "dream3d" for e in meshes)
    finals = [e for e in meshes if e.final]
    assert [e.name for e in finals] == ["variant_0", "variant_1"]
    for f in finals:
        assert f.info["route"] == "shap-e+dream3d" and 0.0 <= f.info["prior_iou"] <= 1.0
        assert f.colors is not None and len(f.faces) > 0
    # each variant samples its own Shap-E latent
    priors = [e for e in meshes if e.info.get("stage") == "shap-e prior"]
    assert len(priors) == 2 and not np.array_equal(priors[0].vertices, priors[1].vertices)


def test_a_prior_with_too_many_faces_is_decimated_before_it_streams(profile, monkeypatch):
    """A noisy Shap-E field (random full-size weights gave 4.3 M faces on an H100) must not hit the mesh limit:
    the route caps the decoded prior (vertex clustering) before the preview and Eq. 9's SDF."""
    from backend.pipelines import shap_e_route

    full = [e for e in _run("text-to-shape", dict(T2S, dream3d_iterations=1), profile)
            if isinstance(e, MeshUpdate) and e.info.get("stage") == "shap-e prior"][0]
    cap = max(50, len(full.faces) // 4)
    monkeypatch.setattr(shap_e_route, "PRIOR_MAX_FACES", cap)
    events = _run("text-to-shape", dict(T2S, dream3d_iterations=1), profile)
    prior = [e for e in events if isinstance(e, MeshUpdate) and e.info.get("stage") == "shap-e prior"][0]
    assert 0 < len(prior.faces) <= cap < len(full.faces)
    assert events[-1].final and len(events[-1].faces) > 0


def test_shape_prior_preserving_loss_keeps_the_shap_e_shape(profile):
    """Eq. 4 at a high weight against CLIP: the optimised grid stays close to the prior (IoU of the occupancies)."""
    params = dict(T2S, dream3d_iterations=6)
    kept = _run("text-to-shape", params, profile)[-1].info["prior_iou"]
    assert kept > 0.8


def test_refined_quality_adds_sds_with_the_text_to_image_model(profile):
    events = _run("text-to-shape", dict(T2S, quality="refined", dream3d_iterations=2), profile)
    d3 = [e for e in events if isinstance(e, Progress) and e.stage == "dream3d"]
    assert "sds=" in d3[-1].message
    assert events[-1].final and events[-1].info["quality"] == "refined"


def test_iss_method_on_a_shap_e_profile_is_a_clear_error(profile):
    wf = get_workflow("text-to-shape")
    with pytest.raises(ModelUnavailable, match="leave method and shape_prior out"):
        wf.validate({"prompt": "a chair", "method": "iss"}, [], profile=profile)
    with pytest.raises(InputError, match="dream3d"):
        wf.validate({"prompt": "a chair", "method": "iss", "shape_prior": "shap-e"}, [], profile=profile)
    assert wf.validate({"prompt": "a chair"}, [], profile=registry.load_profile("tiny"))["shape_prior"] == "iss"


def test_cancel_during_shap_e_sampling_stops_at_the_next_step(profile):
    wf = get_workflow("text-to-shape")
    p = wf.validate(dict(T2S, prior_steps=20), [], profile=profile)
    ctx = JobContext(profile=profile, device="cpu", seed=0)
    seen = []
    from backend.events import Cancelled

    with pytest.raises(Cancelled):
        for ev in wf.run(p, [], ctx):
            seen.append(ev)
            if isinstance(ev, Progress) and ev.stage == "shap-e" and ev.step == 3:
                ctx.cancel.cancel("stop")
    assert [e.step for e in seen if isinstance(e, Progress) and e.stage == "shap-e"][-1] == 3
    assert not any(isinstance(e, MeshUpdate) for e in seen)


def test_image_to_shape_lifts_with_shap_e_img2img(profile):
    params = {"image_png": base64.b64encode(_png()).decode(), "image_name": "red", "config": I2S_CONFIG}
    events = _run("image-to-shape", params, profile)
    final = events[-1]
    assert isinstance(final, MeshUpdate) and final.final and final.info["method"] == "shap-e"
    assert len(final.faces) > 0 and final.colors is not None
    assert np.abs(final.vertices).max() <= 0.5


def _exemplar(name: str) -> MeshInput:
    import trimesh

    m = trimesh.creation.box((0.5, 0.4, 0.8))
    c = np.tile(np.array([[180, 60, 40, 255]], np.uint8), (len(m.vertices), 1))
    return MeshInput(name=name, vertices=np.asarray(m.vertices, np.float32), faces=np.asarray(m.faces, np.uint32),
                     colors=c)


def test_gallery_of_two_lifts_concepts_with_shap_e(profile):
    events = _run("gallery", dict(GALLERY, count=2, subjects=["a barn"]), profile, inputs=[_exemplar("Tower")])
    images = [e for e in events if isinstance(e, Image)]
    meshes = [e for e in events if isinstance(e, MeshUpdate)]
    initial = [e for e in meshes if e.info.get("stage") == "initial model"]
    finals = [e for e in meshes if e.final]
    assert len(images) == 2 and len(initial) == 2 and [e.name for e in finals] == ["item_0", "item_1"]
    assert all(e.info["method"] == "shap-e" for e in initial + finals)
    assert all(len(e.faces) > 0 and e.colors is not None for e in finals)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_runs_every_route_of_the_pretrained_code_path(tmp_path, profile):
    from backend.cli import main
    from backend.geometry.io import export_mesh, load_mesh

    out = tmp_path / "chair.glb"
    args = ["--prior-steps", "3", "--prior-resolution", "24", "--dream3d-iterations", "2", "--grid-resolution", "24",
            "--views", "1", "--render-resolution", "16", "--resolution", "24"]
    assert main(["run", "text-to-shape", "--profile", "tiny-pretrained", "--device", "cpu", "--prompt", "a chair",
                 "--out", str(out), *args]) == 0
    assert len(load_mesh(out).faces) > 0
    (tmp_path / "red.png").write_bytes(_png())
    assert main(["run", "image-to-shape", "--profile", "tiny-pretrained", "--device", "cpu", "--image",
                 str(tmp_path / "red.png"), "--steps", "3", "--resolution", "24", "--out",
                 str(tmp_path / "red.glb")]) == 0
    assert len(load_mesh(tmp_path / "red.glb").faces) > 0
    ex = _exemplar("Tower")
    export_mesh(tmp_path / "tower.glb", ex.vertices, ex.faces, ex.colors)
    assert main(["run", "gallery", "--profile", "tiny-pretrained", "--device", "cpu", "--exemplar",
                 str(tmp_path / "tower.glb"), "--count", "2", "--preset", "smoke", "--config",
                 json.dumps(GALLERY["config"]), "--out", str(tmp_path / "gal")]) == 0
    assert sorted(p.name for p in (tmp_path / "gal").glob("*.glb")) == ["item_0.glb", "item_1.glb"]


def test_cli_without_the_download_names_the_command(empty_hf_cache, tmp_path, capsys):
    from backend.cli import main

    rc = main(["run", "image-to-shape", "--profile", "pretrained", "--device", "cpu", "--image",
               str(_write(tmp_path / "a.png", _png())), "--out", str(tmp_path / "a.glb")])
    assert rc != 0
    assert "python -m backend models download shap-e-img2img" in capsys.readouterr().err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from backend.selftest import BackendProcess

    with BackendProcess(tmp_path_factory.mktemp("shap-e-backend"), profile="tiny-pretrained") as b:
        c = b.client(name="test-shap-e")
        yield b, c
        c.close()


def _server_job(c, workflow: str, params: dict, meshes=None, timeout_s: float = 240):
    from backend.selftest import accepted_job, collect, is_terminal_for
    from shared import protocol as P

    ref = c.submit(workflow, params, meshes)
    msgs = collect(c, lambda m: (m.kind == P.REJECTED and m.fields.get("ref") == ref) or m.kind in P.TERMINAL_KINDS,
                   timeout_s)
    job = accepted_job(msgs, ref)
    if not is_terminal_for(job)(msgs[-1]):
        msgs += collect(c, is_terminal_for(job), timeout_s)
    mine = [m for m in msgs if m.fields.get("job") == job]
    assert mine[-1].kind == P.DONE, mine[-1].fields
    return mine


def test_server_welcome_names_the_routes(server):
    _, c = server
    w = c.welcome
    assert w["profile"] == "tiny-pretrained"
    caps = w["capabilities"]
    assert caps["text-to-shape"]["available"] and "Shap-E" in caps["text-to-shape"]["route"]
    assert caps["image-to-shape"]["route"] == "Shap-E img2img lift" and caps["gallery"]["available"]


def test_server_text_to_shape_streams_the_prior_then_the_final_mesh(server):
    from shared import protocol as P

    _, c = server
    msgs = _server_job(c, "text-to-shape", dict(T2S))
    meshes = [m for m in msgs if m.kind == P.MESH]
    assert meshes[0].fields["info"]["stage"] == "shap-e prior" and not meshes[0].fields["final"]
    final = [m for m in meshes if m.fields["final"]]
    assert len(final) == 1 and final[0].fields["info"]["route"] == "shap-e+dream3d"
    assert len(final[0].arrays["faces"]) > 0 and "colors" in final[0].arrays


def test_server_image_to_shape_and_gallery_of_two_lift_with_shap_e(server):
    from shared import protocol as P

    _, c = server
    msgs = _server_job(c, "image-to-shape", {"image_png": base64.b64encode(_png()).decode(), "image_name": "red",
                                             "config": I2S_CONFIG})
    final = [m for m in msgs if m.kind == P.MESH and m.fields["final"]]
    assert len(final) == 1 and final[0].fields["info"]["method"] == "shap-e"
    ex = _exemplar("Tower")
    msgs = _server_job(c, "gallery", dict(GALLERY, count=2, subjects=["a barn"]),
                       [{"name": ex.name, "vertices": ex.vertices, "faces": ex.faces, "colors": ex.colors}])
    finals = [m for m in msgs if m.kind == P.MESH and m.fields["final"]]
    assert [m.fields["name"] for m in finals] == ["item_0", "item_1"]
    assert all(m.fields["info"]["method"] == "shap-e" for m in finals)
    assert len([m for m in msgs if m.kind == P.IMAGE]) == 2
