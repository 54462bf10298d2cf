"""Unit tests of the text-to-shape loss terms (ISS++ Eq. 3-5, 7; Dream3D Eq. 1, 4; Dream Fields transmittance)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from backend.losses.background import background_loss, background_ray_mask
from backend.losses.clip_consistency import blend_target, clip_consistency_loss, clip_loss
from backend.losses.sds import anneal_t_range, model_resolution, sds_loss, sds_terms
from backend.losses.shape_prior_preserving import opacity, shape_prior_preserving_loss
from backend.losses.transmittance import transmittance_loss, transmittance_target


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_consistency_zero_when_aligned_and_two_when_opposite():
    t = _unit(torch.randn(16))
    assert clip_consistency_loss(t, t[None].repeat(4, 1) * 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_consistency_loss(t, -t[None].repeat(4, 1)).item() == pytest.approx(2.0, abs=1e-6)
    # sum = m * mean (Eq. 4 as printed sums over the m views)
    imgs = torch.randn(5, 16)
    assert clip_consistency_loss(t, imgs, "sum").item() == pytest.approx(5 * clip_consistency_loss(t, imgs).item(), rel=1e-5)


def test_clip_consistency_gradient_descends():
    torch.manual_seed(0)
    t = _unit(torch.randn(8))
    feats = torch.randn(3, 8, requires_grad=True)
    opt = torch.optim.SGD([feats], lr=0.5)
    first = clip_consistency_loss(t, feats).item()
    for _ in range(30):
        opt.zero_grad()
        loss = clip_consistency_loss(t, feats)
        loss.backward()
        opt.step()
    assert clip_consistency_loss(t, feats).item() < first * 0.5


def test_clip_consistency_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        clip_consistency_loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="differ"):
        clip_consistency_loss(torch.randn(8), torch.randn(2, 7))


def test_blend_target_eq5():
    a, b = torch.randn(4), torch.randn(4)
    assert torch.equal(blend_target(a, b, 0.0), a)
    assert torch.allclose(blend_target(a, b, 1.0), b)
    assert torch.allclose(blend_target(a, b, 0.5), 0.5 * (a + b))
    with pytest.raises(ValueError):
        blend_target(a, b, 1.5)


def test_dream3d_clip_loss_is_negative_cosine():
    t = _unit(torch.randn(6))
    assert clip_loss(t, t[None] * 2).item() == pytest.approx(-1.0, abs=1e-6)


def test_background_mask_and_loss():
    occ = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.9, 0.2]])
    mask = background_ray_mask(occ, 0.5)
    assert mask.tolist() == [True, False]
    colors = torch.zeros(2, 3, 3, requires_grad=True)
    loss = background_loss(colors, mask)
    assert loss.item() == pytest.approx(3.0)  # ||0 - 1||^2 over three channels
    loss.backward()
    assert colors.grad[1].abs().sum() == 0  # the object ray is untouched
    assert (colors.grad[0] < 0).all()  # the background ray is pushed towards white
    assert background_loss(torch.ones(2, 3, 3), mask).item() == 0.0
    assert background_loss(colors, torch.zeros(2, dtype=torch.bool)).item() == 0.0


def test_transmittance_loss_and_schedule():
    assert transmittance_target(0) == pytest.approx(0.5)
    assert transmittance_target(250) == pytest.approx(0.69)
    assert transmittance_target(10_000) == pytest.approx(0.88)
    alpha = torch.full((2, 4, 4), 0.9, requires_grad=True)
    loss = transmittance_loss(alpha, 0.5)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    loss.backward()
    assert (alpha.grad > 0).all()  # lowering alpha (more transmittance) lowers the loss
    clear = torch.zeros(2, 4, 4, requires_grad=True)
    l2 = transmittance_loss(clear, 0.5)
    assert l2.item() == pytest.approx(-0.5)
    l2.backward()
    assert clear.grad.abs().sum() == 0  # beyond the target, no push


def test_shape_prior_preserving_loss():
    sdf = torch.linspace(-1, 1, 8).view(8, 1, 1).expand(8, 2, 2).contiguous()
    sigma = torch.zeros(8, 2, 2, requires_grad=True)
    loss = shape_prior_preserving_loss(sigma, sdf, delta=0.1)
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    inside = sdf < 0
    assert (sigma.grad[inside] < 0).all() and (sigma.grad[~inside] == 0).all()
    dense = torch.full((8, 2, 2), 1e4)
    assert shape_prior_preserving_loss(dense, sdf, 0.1).item() == pytest.approx(-1.0)
    assert opacity(torch.tensor(0.0), 0.1).item() == 0.0
    with pytest.raises(ValueError, match="nothing to preserve"):
        shape_prior_preserving_loss(sigma, torch.ones_like(sdf), 0.1)


def test_anneal_t_range():
    assert anneal_t_range(0, 10, (0.02, 0.98), (0.02, 0.5)) == (0.02, 0.98)
    lo, hi = anneal_t_range(9, 10, (0.02, 0.98), (0.02, 0.5))
    assert hi == pytest.approx(0.5)


def _tiny_pixel_bundle():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
    unet.requires_grad_(False)
    return SimpleNamespace(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))


def test_sds_gradient_is_weighted_noise_residual():
    bundle = _tiny_pixel_bundle()
    assert model_resolution(bundle) == 8
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    cond, uncond = torch.randn(1, 4, 8), torch.zeros(1, 4, 8)
    g1 = torch.Generator().manual_seed(3)
    terms = sds_terms(bundle, images, cond, uncond, 7.5, (0.2, 0.6), g1)
    assert ((terms["t"] >= 20) & (terms["t"] <= 60)).all()
    alphas = bundle.scheduler.alphas_cumprod
    assert torch.allclose(terms["w"], 1 - alphas[terms["t"]])
    g2 = torch.Generator().manual_seed(3)
    loss = sds_loss(bundle, images, cond, uncond, 7.5, (0.2, 0.6), g2)
    loss.backward()
    # pixel-space model: z0 = 2x - 1, so dL/dx = 2 * w(t) (eps_hat - eps)
    assert torch.allclose(images.grad, 2 * terms["grad"], atol=1e-5)
    assert images.grad.abs().sum() > 0


def test_sds_through_vae_and_resize_reaches_images():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    ).eval().requires_grad_(False)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval().requires_grad_(False)
    bundle = SimpleNamespace(unet=unet, vae=vae, scheduler=DDPMScheduler(num_train_timesteps=50))
    assert model_resolution(bundle) == 8
    images = torch.rand(1, 3, 12, 12, requires_grad=True)  # resized to 8x8 inside
    loss = sds_loss(bundle, images, torch.randn(1, 3, 8), None, 1.0, (0.02, 0.98), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_sds_rejects_bad_range():
    bundle = _tiny_pixel_bundle()
    with pytest.raises(ValueError, match="t_range"):
        sds_loss(bundle, torch.rand(1, 3, 8, 8), torch.randn(1, 4, 8), t_range=(0.9, 0.1))


def test_sds_with_project_diffusion_bundle():
    from backend.models.diffusion import DiffusionBundle

    bundle = DiffusionBundle.tiny()
    cond, uncond = bundle.encode_prompt(["a chair"]), bundle.encode_prompt([""])
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    terms = sds_terms(bundle, images, cond, uncond, 10.0, (0.5, 0.5), torch.Generator().manual_seed(1))
    assert (terms["t"] == int(0.5 * bundle.num_train_timesteps)).all()
    loss = sds_loss(bundle, images, cond, uncond, 10.0, (0.02, 0.98), torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
