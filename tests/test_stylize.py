"""Stylize workflow (issue 7): ISS++ Sec. 3.4 texture / shape-and-texture / SDS stylization of an artist's mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.losses.augment import AugmentConfig, augment, composite_background, random_crop_perspective
from backend.losses.prior_3d import prior_3d_loss, sample_prior_points


# ----------------------------------------------------------------------------------------- losses (pure torch)


def test_prior_3d_loss_is_eq6_and_pulls_back_to_the_initial_occupancy():
    init = torch.tensor([0.0, 1.0, 0.5, 0.2])
    occ = torch.tensor([0.5, 0.5, 0.5, 0.2], requires_grad=True)
    assert prior_3d_loss(occ, init, reduction="sum").item() == pytest.approx(1.0)  # Eq. 6 as written
    loss = prior_3d_loss(occ, init)  # mean
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    # gradient descent moves each point towards its initial occupancy; equal points get no push (subgradient 0)
    assert occ.grad[0] > 0 and occ.grad[1] < 0 and occ.grad[3] == 0
    assert prior_3d_loss(init, init).item() == 0.0
    with pytest.raises(ValueError):
        prior_3d_loss(occ, init[:2])


def test_prior_points_lie_in_the_cube_and_near_the_surface():
    g = torch.Generator().manual_seed(0)
    surf = torch.tensor([[0.25, 0.0, 0.0]])
    p = sample_prior_points(1000, generator=g, near_surface=surf, surface_fraction=0.5)
    assert p.shape == (1000, 3) and p.abs().max() <= 0.5
    near = ((p - surf).norm(dim=-1) < 0.1).float().mean()
    assert near > 0.45


def test_background_composite_and_augment_are_differentiable():
    g = torch.Generator().manual_seed(0)
    rgb = torch.zeros(2, 3, 16, 16, requires_grad=True)
    alpha = torch.zeros(2, 16, 16)
    red = torch.tensor([1.0, 0.0, 0.0])
    out = composite_background(rgb, alpha, red)
    assert torch.allclose(out[:, 0], torch.ones(2, 16, 16)) and out[:, 1:].abs().max() == 0
    # random background: one colour per iteration, different across iterations
    a = torch.ones(2, 1, 16, 16)
    a[..., :4] = 0.0
    img1, bg1 = augment(rgb, a, AugmentConfig(), generator=g)
    img2, bg2 = augment(rgb, a, AugmentConfig(), generator=g)
    assert torch.allclose(bg1[0], bg1[1]) and not torch.allclose(bg1, bg2)
    assert torch.allclose(img1[0, :, 0, 0], bg1[0])
    img3, _ = augment(rgb, a, AugmentConfig(crops=True, perspective_p=1.0), generator=g)
    assert img3.shape == rgb.shape
    img3.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_perspective_fill_is_the_background_colour():
    g = torch.Generator().manual_seed(3)
    img = torch.full((1, 3, 32, 32), 0.5)
    fill = torch.tensor([0.0, 1.0, 0.0])
    out = random_crop_perspective(img, AugmentConfig(crops=True, crop_scale=(1.0, 1.0), perspective_p=1.0,
                                                     distortion_scale=0.9), generator=g, fill=fill)
    uncovered = (out - 0.5).abs().sum(1) > 0.1
    assert uncovered.any()
    assert torch.allclose(out[0, :, uncovered[0]].mean(-1), fill, atol=0.2)
