"""Tools around the starter trainers: the caption-embedding cache, the training deadline, slim data sets,
image-only CLIP loading, and stage 2's Eq. 6 term against the stage-1 shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.training.dataset import DatasetConfig, StarterDataset, build_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> StarterDataset:
    cfg = DatasetConfig(n_shapes=8, views=2, resolution=32, voxel_res=16, n_points=512, seed=5)
    return StarterDataset.load(build_dataset(cfg).save(tmp_path_factory.mktemp("data") / "tiny.npz"))


def test_text_cache_embeds_only_what_is_missing_and_refuses_other_towers(tmp_path):
    from backend.training.text_cache import TextCache, TextCacheMiss

    calls: list[list[str]] = []

    def encode(caps):
        calls.append(list(caps))
        return np.stack([np.full(4, len(c), np.float32) for c in caps])

    path = tmp_path / "cache.npz"
    cache = TextCache("tower-a", "pooled", path)
    first = cache.embed(["a chair", "a red lamp", "a chair"], encode)
    assert first.shape == (3, 4) and calls == [["a chair", "a red lamp"]]
    cache.save()
    again = TextCache("tower-a", "pooled", path)
    assert len(again) == 2 and "a red lamp" in again
    np.testing.assert_array_equal(again.embed(["a red lamp", "a chair"]), first[[1, 0]])  # no encoder needed
    with pytest.raises(TextCacheMiss, match="not in the text cache"):
        again.embed(["a blue car"])
    again.embed(["a blue car"], encode)
    assert calls[-1] == ["a blue car"]
    with pytest.raises(ValueError, match="tower-a"):
        TextCache("tower-b", "pooled", path)


def test_locked_tower_clip_trains_from_a_complete_cache_alone(tiny_data, tmp_path):
    """The second run finds every caption in the cache, builds the tower without its weights, trains the same."""
    from backend.training.clip_trainer import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(image_size=32, vision_layers=1, vision_width=64, vision_head_width=32, steps=6,
                          batch_size=8, warmup=2, captions_per_shape=2, text_cache=str(tmp_path / "tc.npz"))
    a = train_clip(tiny_data, cfg, out_dir=tmp_path / "a")
    assert (tmp_path / "tc.npz").is_file()
    import backend.models.clip as clip_mod

    built = []
    real = clip_mod.build_open_clip

    def spy(model_cfg, pretrained_text=True):
        built.append(pretrained_text)
        return real(model_cfg, pretrained_text=pretrained_text)

    clip_mod.build_open_clip = spy
    try:
        b = train_clip(tiny_data, cfg, out_dir=tmp_path / "b")
    finally:
        clip_mod.build_open_clip = real
    assert built == [False]  # the tower's 90 MB were not read
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4, atol=1e-5)


def test_deadline_stops_a_trainer_early_and_it_still_saves(tiny_data, tmp_path):
    from backend.training.classifier import ClassifierConfig, ShapeClassifier, train_classifier
    from backend.training.common import set_deadline

    set_deadline(1e-6)
    try:
        res = train_classifier(tiny_data, ClassifierConfig(image_size=32, width=8, steps=500, batch_size=4),
                               out_dir=tmp_path / "cls")
    finally:
        set_deadline(0)
    assert len(res.losses) < 500 and res.metrics["classifier_stopped_early_at"] == len(res.losses)
    ShapeClassifier.load(tmp_path / "cls")


def test_slim_data_set_reads_back_with_empty_depth_and_normals(tiny_data, tmp_path):
    path = tiny_data.save(tmp_path / "slim.npz", slim=True)
    with np.load(path) as z:
        assert "depth" not in z.files and "normal" not in z.files
    d = StarterDataset.load(path)
    np.testing.assert_array_equal(d.rgb, tiny_data.rgb)
    np.testing.assert_array_equal(d.points, tiny_data.points)
    assert d.depth.shape == tiny_data.depth.shape and not d.depth.any()
    assert d.normal.shape == tiny_data.normal.shape and not d.normal.any()


def test_image_only_clip_refuses_text(tmp_path):
    from backend.errors import ModelUnavailable
    from backend.models.clip import ClipModel
    from backend.training.clip_trainer import ClipTrainConfig, build_clip, save_clip

    cfg = ClipTrainConfig(image_size=32, vision_layers=1, vision_width=64, vision_head_width=32)
    model, _ = build_clip(cfg, pretrained_text=False)
    save_clip(model, cfg, tmp_path / "clip")
    clip = ClipModel.load(tmp_path / "clip", text=False)
    assert clip.encode_image(torch.rand(1, 3, 32, 32)).shape == (1, 384)
    with pytest.raises(ModelUnavailable, match="image features only"):
        clip.encode_text(["a chair"])


def test_stage2_prior_term_is_zero_at_stage_one_and_grows_when_the_shape_moves():
    from backend.models.clip import ClipModel
    from backend.models.mapper import Mapper, MapperConfig
    from backend.models.svr import SVRModel
    from backend.pipelines.iss_stages import Stage2Aligner, Stage2Config, ViewConfig

    torch.manual_seed(0)
    clip, svr = ClipModel.tiny(), SVRModel.tiny()
    mapper = Mapper(MapperConfig(in_dim=clip.embed_dim, out_dim=svr.latent_dim, hidden=32, n_layers=3))
    f = torch.nn.functional.normalize(torch.randn(1, clip.embed_dim), dim=-1)
    cfg = Stage2Config(views=1, lambda_clip=0.0, lambda_bg=0.0, lambda_prior=1.0, prior_points=512,
                       view=ViewConfig(resolution=16, n_samples=8))
    al = Stage2Aligner(mapper, svr.decoder, clip, f, f, cfg, torch.Generator().manual_seed(0))
    assert al.losses(al.cameras())["prior"].item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for p in al.mapper.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = al.losses(al.cameras())
    assert moved["prior"].item() > 1e-4 and moved["prior"].requires_grad
