"""Theme gallery (ThemeStation, paper 003) on the tiny profile: DSD (Eq. 3-5), theme fine-tuning, the workflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.errors import Cancelled, InputError, StepstoneError
from backend.events import CancelToken, Image, JobContext, MeshInput, MeshUpdate, Progress
from backend.losses.dsd import DSDConfig, ScorePrior, concept_loss, dsd_loss, reference_loss, sample_timesteps
from backend.losses.dsd import timestep_bounds
from backend.models.registry import load_profile
from backend.pipelines import get_workflow
from backend.pipelines.theme.concepts import subject_from_name, theme_prompt
from backend.pipelines.theme.finetune import FinetuneConfig, finetune

# Every stage shrunk to seconds on a CPU: the workflow's "smoke" preset (the paper's sizes are the defaults).
SMOKE = {"preset": "smoke"}


@pytest.fixture(scope="module")
def profile():
    return load_profile("tiny")


@pytest.fixture(scope="module")
def bundle(profile):
    return profile.diffusion()


def _mesh(kind: str, name: str, color) -> MeshInput:
    m = trimesh.creation.box((0.6, 0.4, 1.0)) if kind == "box" else trimesh.creation.cylinder(0.3, 0.8, sections=12)
    cols = np.tile(np.array([list(color) + [255]], np.uint8), (len(m.vertices), 1))
    return MeshInput(name, m.vertices.astype(np.float32), m.faces.astype(np.uint32), cols, None)


def _images(n: int = 2, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, res, res, generator=g)


# ------------------------------------------------------------------------------------------- DSD (Eq. 3-5)


def test_timestep_bounds_are_inside_the_bands():
    assert timestep_bounds((0.5, 0.75), 1000) == (500, 750)
    assert timestep_bounds((0.1, 0.25), 1000) == (100, 250)
    t = sample_timesteps(500, (0.1, 0.25), 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 100 and int(t.max()) <= 250


def test_every_drawn_timestep_lies_in_its_prior_band(bundle):
    cond = bundle.encode_prompt([theme_prompt("tower")])
    prior = ScorePrior(bundle, cond, None, None, bundle.encode_prompt([theme_prompt("tower", normal=True)]))
    g = torch.Generator().manual_seed(1)
    n = bundle.num_train_timesteps
    tc, tr = [], []
    for _ in range(2):  # one timestep per image: 2 x 24 draws per band
        x = _images(24, res=8).requires_grad_(True)
        res = dsd_loss(prior, prior, x, x.detach().flip(-1), DSDConfig(), generator=g)
        tc.append(res.t_concept)
        tr.append(res.t_reference)
    tc, tr = torch.cat(tc).float() / n, torch.cat(tr).float() / n
    assert len(tc) == 48 and len(tr) == 96  # the reference prior scores colour and normal maps
    assert float(tc.min()) >= 0.5 and float(tc.max()) <= 0.75
    assert float(tr.min()) >= 0.1 and float(tr.max()) <= 0.25
    assert float(tc.max() - tc.min()) > 0.1 and float(tr.max() - tr.min()) > 0.05  # really drawn, not constant


def test_dsd_gradient_is_the_weighted_sum_of_the_two_priors(bundle):
    cond = bundle.encode_prompt(["a 3D model of sks tower"])
    cond_x = bundle.encode_prompt([theme_prompt("tower")])
    cond_n = bundle.encode_prompt([theme_prompt("tower", normal=True)])
    uncond = bundle.encode_prompt([""])
    concept = ScorePrior(bundle, cond, uncond, None)
    reference = ScorePrior(bundle, cond_x, uncond, None, cond_n)
    cfg = DSDConfig(alpha=0.2, beta=1.0)
    base = _images(2)
    normals = _images(2).flip(0)

    x = base.clone().requires_grad_(True)
    n = normals.clone().requires_grad_(True)
    res = dsd_loss(concept, reference, x, n, cfg, generator=torch.Generator().manual_seed(7))
    gx, gn = torch.autograd.grad(res.loss, [x, n])

    # the same draws, term by term (dsd_loss draws concept first, then reference colour, then normal)
    g = torch.Generator().manual_seed(7)
    xc = base.clone().requires_grad_(True)
    lc, tc = concept_loss(concept, xc, cfg, g)
    (gc,) = torch.autograd.grad(lc, [xc])
    xr = base.clone().requires_grad_(True)
    nr = normals.clone().requires_grad_(True)
    lr, tr = reference_loss(reference, xr, nr, cfg, g)
    gr_x, gr_n = torch.autograd.grad(lr, [xr, nr])

    assert torch.equal(res.t_concept, tc) and torch.equal(res.t_reference, tr)
    assert gc.abs().sum() > 0 and gr_x.abs().sum() > 0 and gr_n.abs().sum() > 0
    torch.testing.assert_close(gx, 0.2 * gc + 1.0 * gr_x, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gn, 1.0 * gr_n, rtol=1e-5, atol=1e-7)  # normals only feel the reference prior


def test_dsd_uses_the_named_adapters(bundle):
    """Each term is evaluated with its own prior's LoRA adapter active."""
    cfg_ft = FinetuneConfig(batch_size=2, lr_lora=5e-2)
    imgs = _images(2)
    a = b = None
    try:
        a = _run(finetune(bundle, imgs, ["a", "b"], 1, cfg_ft, name="pa"))
        b = _run(finetune(bundle, imgs.flip(-1), ["c", "d"], 1, cfg_ft, name="pb"))
        cond = bundle.encode_prompt(["x"])
        x = _images(1)
        losses = {}
        for name, adapter in (("a", a.adapter), ("b", b.adapter), ("base", None)):
            losses[name] = float(concept_loss(ScorePrior(bundle, cond, None, adapter), x, DSDConfig(),
                                              torch.Generator().manual_seed(0))[0])
        assert len({round(v, 6) for v in losses.values()}) == 3
    finally:
        for p in (a, b):
            if p is not None:
                p.release()
    assert not getattr(bundle.unet, "peft_config", None)


# ------------------------------------------------------------------------------------------- fine-tuning


def _run(gen):
    """Drain a generator and return its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_theme_lora_weights_change_and_load_back(bundle, tmp_path):
    imgs = _images(4)
    prompts = [theme_prompt("house", "front view")] * 2 + [theme_prompt("house", "side view", normal=True)] * 2
    cfg = FinetuneConfig(iterations_single=4, batch_size=2, lr_lora=1e-2)
    gen = finetune(bundle, imgs, prompts, 4, cfg, name="theme")
    events = []
    prior = None
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        prior = stop.value
    try:
        assert [e.step for e in events] == [1, 2, 3, 4] and all(isinstance(e, Progress) for e in events)
        lora_b = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()
                  if "lora_B" in n and prior.adapter in n}
        assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b.values())  # B starts at zero
        bundle.save_lora(tmp_path / "theme", adapter_name=prior.adapter)
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        cond = bundle.encode_prompt([prompts[0]])
        bundle.unet.set_adapter(prior.adapter)
        with torch.no_grad():
            ref = bundle.predict_noise(x, 500, cond)
        prior.release()
        with torch.no_grad():
            base = bundle.predict_noise(x, 500, cond)
        assert not torch.allclose(ref, base)  # the adapter changed the model
        bundle.load_lora(tmp_path / "theme", adapter_name="reloaded")
        with torch.no_grad():
            back = bundle.predict_noise(x, 500, cond)
        torch.testing.assert_close(back, ref)
    finally:
        prior.release()
        if getattr(bundle.unet, "peft_config", None) and "reloaded" in bundle.unet.peft_config:
            bundle.unet.delete_adapters(["reloaded"])


def test_full_finetune_leaves_the_shared_model_alone(bundle):
    before = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}
    cfg = FinetuneConfig(method="full", batch_size=2, lr_full=1e-2)
    prior = _run(finetune(bundle, _images(2), ["a", "b"], 2, cfg))
    assert prior.adapter is None and prior.bundle.unet is not bundle.unet
    changed = any(not torch.equal(p, before[n]) for n, p in prior.bundle.unet.named_parameters())
    assert changed
    assert all(torch.equal(p, before[n]) for n, p in bundle.unet.named_parameters())


def test_cancel_during_finetuning_stops_and_removes_the_adapter(bundle):
    tok = CancelToken()
    gen = finetune(bundle, _images(2), ["a", "b"], 50, FinetuneConfig(batch_size=2), cancel=tok)
    assert isinstance(next(gen), Progress)
    tok.cancel("artist pressed cancel")
    with pytest.raises(Cancelled):
        next(gen)
    assert not getattr(bundle.unet, "peft_config", None)


# ------------------------------------------------------------------------------------------- workflow


def test_subject_from_object_names():
    assert subject_from_name("Tower.001") == "tower"
    assert subject_from_name("old_house-2") == "old house"
    assert subject_from_name("") == "object"


def test_gallery_of_three_from_two_exemplars(profile):
    wf = get_workflow("gallery")
    inputs = [_mesh("box", "House", (200, 60, 40)), _mesh("cyl", "Tower.001", (40, 90, 200))]
    params = wf.validate({"count": 3, "subjects": ["a well", "a gate"], **SMOKE}, inputs)
    ctx = JobContext(profile=profile, device="cpu", seed=3)
    events = list(wf.run(params, inputs, ctx))
    images = [e for e in events if isinstance(e, Image)]
    meshes = [e for e in events if isinstance(e, MeshUpdate)]
    finals = [e for e in meshes if e.final]
    stages = {e.stage for e in events if isinstance(e, Progress)}
    assert len(images) == 3 and all(im.png.startswith(b"\x89PNG") for im in images)
    assert {"renders", "theme fine-tune", "concept images", "initial model", "concept prior",
            "dual score distillation", "final mesh"} <= stages
    assert [e.name for e in finals] == ["item_0", "item_1", "item_2"]
    for name in ("item_0", "item_1", "item_2"):
        inter = [e for e in meshes if e.name == name and not e.final]
        assert any(e.info.get("stage") == "initial model" for e in inter)
        assert any(e.info.get("stage") == "dual score distillation" for e in inter)
    for e in finals:
        assert len(e.faces) > 0 and e.colors is not None and e.colors.shape == (len(e.vertices), 3)
        assert e.faces.max() < len(e.vertices)
        assert -1.0 <= e.info["theme_clip"] <= 1.0 and -1.0 <= e.info["theme_cisp"] <= 1.0
    assert finals[0].info["subject"] == "a well" and finals[2].info["subject"] == "a well"
    assert "diversity_clip" not in finals[0].info and 0.0 <= finals[2].info["diversity_clip"] <= 2.0
    # a final mesh comes right after its own DSD stage, before the next asset starts (streamed as it finishes)
    first_final = next(k for k, e in enumerate(events) if e is finals[0])
    assert any(isinstance(e, Progress) and e.stage == "initial model" for e in events[first_final:])
    assert not getattr(profile.diffusion().unet, "peft_config", None)  # every adapter released


def test_gallery_cancel_during_finetuning(profile):
    wf = get_workflow("gallery")
    inputs = [_mesh("box", "House", (200, 60, 40))]
    params = wf.validate({"count": 2, **SMOKE, "config": {"finetune": {"iterations_single": 100}}}, inputs)
    ctx = JobContext(profile=profile, device="cpu", seed=0)
    seen = []
    with pytest.raises(Cancelled):
        for ev in wf.run(params, inputs, ctx):
            seen.append(ev)
            if isinstance(ev, Progress) and ev.stage == "theme fine-tune" and ev.step == 2:
                ctx.cancel.cancel("stop")
    ft = [e for e in seen if isinstance(e, Progress) and e.stage == "theme fine-tune"]
    assert ft[-1].step == 2
    assert not any(isinstance(e, (Image, MeshUpdate)) for e in seen)
    assert not getattr(profile.diffusion().unet, "peft_config", None)


def test_bad_exemplars_get_clear_errors():
    wf = get_workflow("gallery")
    good = _mesh("box", "House", (200, 60, 40))
    empty = MeshInput("Empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32))
    with pytest.raises(InputError, match="empty"):
        wf.validate({"count": 2}, [good, empty])
    with pytest.raises(InputError, match="not a mesh"):
        wf.validate({"count": 2}, [good, "a curve object"])
    with pytest.raises(InputError, match="limit"):
        wf.validate({"count": 2, "max_faces": 5}, [good])
    lines = MeshInput("Edges", np.zeros((3, 3), np.float32), np.zeros((2, 2), np.uint32))
    with pytest.raises(InputError, match="triangles"):
        wf.validate({"count": 2}, [lines])
    nan = MeshInput("Nan", np.full((3, 3), np.nan, np.float32), np.array([[0, 1, 2]], np.uint32))
    with pytest.raises(InputError, match="NaN"):
        wf.validate({"count": 2}, [nan])
    with pytest.raises(InputError, match="at least one exemplar"):
        wf.validate({"count": 2}, [])
    with pytest.raises(InputError, match="count"):
        wf.validate({"count": 0}, [good])
    with pytest.raises(InputError, match="unknown gallery config key"):
        wf.validate({"count": 2, "config": {"optimize": {"iters": 3}}}, [good])
    with pytest.raises(InputError, match="method"):
        wf.validate({"count": 2, "config": {"finetune": {"method": "dreambooth"}}}, [good])


def test_gallery_rejects_profiles_without_a_diffusion_model(tmp_path, monkeypatch):
    """A starter profile without its diffusion model cannot run the gallery; the reason names what is missing."""
    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(tmp_path / "nothing"))
    wf = get_workflow("gallery")
    inputs = [_mesh("box", "House", (200, 60, 40))]
    params = wf.validate({"count": 1, **SMOKE}, inputs)
    with pytest.raises(StepstoneError) as info:
        list(wf.run(params, inputs, JobContext(profile=load_profile("starter"), device="cpu")))
    assert info.value.code == "model_unavailable" and "diffusion" in info.value.message


def test_cli_gallery_writes_one_glb_per_asset(tmp_path, profile):
    from backend.cli import main
    from backend.geometry.io import export_mesh, load_mesh

    m = _mesh("box", "House", (200, 60, 40))
    export_mesh(tmp_path / "house.glb", m.vertices, m.faces, m.colors)
    out = tmp_path / "gallery"
    rc = main(["run", "gallery", "--profile", "tiny", "--device", "cpu", "--exemplar", str(tmp_path / "house.glb"),
               "--subject", "a barn", "--count", "1", "--preset", "smoke", "--out", str(out)])
    assert rc == 0
    assert len(load_mesh(out / "item_0.glb").faces) > 0
    assert len(list((out / "images").glob("*.png"))) == 1  # the concept image
    assert main(["run", "gallery", "--profile", "tiny", "--exemplar", str(tmp_path / "house.glb"),
                 "--config", "{not json", "--out", str(out)]) == 2
