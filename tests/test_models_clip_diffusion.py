"""CLIP wrapper and diffusion bundle: save/load through the production code, gradients, CFG, LoRA."""

from __future__ import annotations

import pytest
import torch

from backend.errors import InputError, ModelUnavailable
from backend.fields.adapters import DecoderField
from backend.models.clip import ClipModel
from backend.models.diffusion import DiffusionBundle, TinyDiffusionConfig
from backend.models.mapper import Mapper
from backend.models.svr import SVRModel
from backend.render import volume
from backend.render.cameras import orbit_cameras


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """One intra-op thread: on 2 shared, busy cores, 2 OpenMP threads spin-wait and run ~40x slower."""
    torch.set_num_threads(1)
    yield



@pytest.fixture(scope="module")
def clip():
    return ClipModel.tiny()


@pytest.fixture(scope="module")
def pixel_bundle():
    return DiffusionBundle.tiny()


def test_clip_embeddings_are_unit_norm_and_tokenizer_is_open_clips(clip):
    import open_clip

    t = clip.encode_text(["a red chair", "a blue car"])
    assert t.shape == (2, clip.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    ids = clip.tokenize(["a red chair"])
    assert ids.shape == (1, clip.context_length)
    assert ids[0, :5].tolist() == open_clip.tokenize(["a red chair"])[0, :5].tolist()
    img = clip.encode_image(torch.rand(3, 3, 40, 56))  # non-square: resize shortest side + centre crop
    assert img.shape == (3, clip.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(InputError):
        clip.encode_image(torch.rand(1, 4, 32, 32))
    with pytest.raises(InputError):
        clip.encode_text([])


def test_clip_saves_and_loads_in_open_clip_local_dir_layout(clip, tmp_path):
    clip.save(tmp_path / "clip")
    assert (tmp_path / "clip" / "open_clip_config.json").is_file()
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file()
    again = ClipModel.load(tmp_path / "clip")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again.encode_image(x), clip.encode_image(x), atol=1e-6)
    assert torch.allclose(again.encode_text(["a lamp"]), clip.encode_text(["a lamp"]), atol=1e-6)
    with pytest.raises(ModelUnavailable, match="open_clip_config.json is missing"):
        ClipModel.load(tmp_path / "nothing-here")


def test_clip_gradient_reaches_rendered_pixels_and_the_mapper(clip):
    """ISS stage 2 in miniature: text -> mapper -> latent -> decoder field -> render -> CLIP loss (Eq. 4)."""
    torch.manual_seed(0)
    svr, mapper = SVRModel.tiny(), Mapper.tiny()
    f_t = clip.encode_text(["a tall chair"]).detach()
    z = mapper(f_t)
    field = DecoderField(svr.decoder, z[0])
    out = volume.render(field, orbit_cameras([0.0, 120.0]), 16, 16, n_samples=12, normals=None)
    rgb = out["rgb"]
    rgb.retain_grad()
    f_i = clip.encode_image(rgb.permute(0, 3, 1, 2))
    loss = -(f_i @ f_t.t()).mean()
    loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    grads = [p.grad for p in mapper.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in clip.model.parameters())  # CLIP stays frozen


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
def test_diffusion_bundle_save_pretrained_roundtrip(tmp_path, latent):
    bundle = DiffusionBundle.tiny(config=TinyDiffusionConfig(latent=latent))
    assert (bundle.vae is None) == (not latent)
    bundle.save_pretrained(tmp_path / "sd")
    for sub in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json", "tokenizer/vocab.json"):
        assert (tmp_path / "sd" / sub).is_file(), sub
    assert (tmp_path / "sd" / "vae").is_dir() == latent
    again = DiffusionBundle.from_pretrained(tmp_path / "sd")
    assert again.resolution == bundle.resolution == 16
    assert again.num_train_timesteps == 1000
    assert torch.allclose(again.alphas_cumprod, bundle.alphas_cumprod)

    images = torch.rand(2, 3, 24, 24)
    x0 = bundle.to_model_space(images)
    r = bundle.resolution // bundle.vae_scale_factor
    assert x0.shape == (2, bundle.latent_channels, r, r)
    assert torch.allclose(again.to_model_space(images), x0, atol=1e-5)
    back = bundle.from_model_space(x0)
    assert back.shape == (2, 3, 16, 16) and back.min() >= 0 and back.max() <= 1

    cond = bundle.encode_prompt(["a chair"])
    assert torch.allclose(again.encode_prompt(["a chair"]), cond, atol=1e-5)
    t = torch.tensor([400, 900])
    x_t = bundle.add_noise(x0, torch.randn_like(x0), t)
    assert torch.allclose(again.predict_noise(x_t, t, cond), bundle.predict_noise(x_t, t, cond), atol=1e-5)


def test_classifier_free_guidance_formula(pixel_bundle):
    b = pixel_bundle
    cond, uncond = b.encode_prompt(["a chair"]), b.encode_prompt([""])
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([500])
    e_c, e_u = b.predict_noise(x, t, cond), b.predict_noise(x, t, uncond)
    guided = b.predict_noise(x, t, cond, uncond, guidance_scale=7.5)
    assert torch.allclose(guided, e_u + 7.5 * (e_c - e_u), atol=1e-4)


def test_sample_is_reproducible_images(pixel_bundle):
    b = pixel_bundle
    a = b.sample(["a chair", "a car"], steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    c = b.sample(["a chair", "a car"], steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, c)
    with pytest.raises(InputError):
        b.sample(["x"], steps=0)


def test_sds_gradient_flows_through_to_model_space(pixel_bundle):
    """ISS++ Eq. 7 shape: grad = w(t) (eps_hat - eps), pushed into the rendered image through to_model_space."""
    b = pixel_bundle
    img = torch.rand(1, 3, 20, 20, requires_grad=True)
    x0 = b.to_model_space(img)
    noise = torch.randn_like(x0)
    t = torch.tensor([600])
    with torch.no_grad():
        eps = b.predict_noise(b.add_noise(x0, noise, t), t, b.encode_prompt(["a lamp"]))
    (x0 * (eps - noise)).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_lora_trains_saves_and_loads(tmp_path):
    b = DiffusionBundle.tiny()
    params = b.add_lora(rank=2)
    assert params and all(p.requires_grad for p in params)
    base = [p for n, p in b.unet.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    cond = b.encode_prompt(["a vase in the style of sks"])
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([300])
    before = b.predict_noise(b.add_noise(x0, noise, t), t, cond).detach()
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(b.predict_noise(b.add_noise(x0, noise, t), t, cond), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = b.predict_noise(b.add_noise(x0, noise, t), t, cond).detach()
    assert not torch.allclose(before, after)
    b.save_lora(tmp_path / "lora")
    fresh = DiffusionBundle.tiny()
    assert torch.allclose(fresh.predict_noise(b.add_noise(x0, noise, t), t, cond), before, atol=1e-5)
    fresh.load_lora(tmp_path / "lora")
    assert torch.allclose(fresh.predict_noise(b.add_noise(x0, noise, t), t, cond), after, atol=1e-5)
    with pytest.raises(ModelUnavailable, match="adapter_model.safetensors"):
        fresh.load_lora(tmp_path / "missing")


def test_hub_id_offline_is_model_unavailable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="python -m backend models download diffusion"):
        DiffusionBundle.from_pretrained("stepstone-test/no-such-diffusion-model")
