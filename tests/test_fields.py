"""Fields: Dream3D Eq. 6/8/9 known values, grid sampling conventions, the DVR-style decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.fields import (
    ColorGrid,
    ColorMLP,
    DecoderField,
    DensityGridField,
    ImplicitDecoder,
    SDFGridField,
    SphereField,
    density_shift,
    density_to_raw,
    field_color_fn,
    field_grid,
    grid_points,
    sample_grid,
    sdf_to_density,
)


def test_sdf_to_density_eq9a_known_values():
    beta = 0.05
    sdf = torch.tensor([-1.0, -0.05, 0.0, 0.05, 1.0])
    sigma = sdf_to_density(sdf, beta)
    assert sigma[2].item() == pytest.approx(1.0 / (2 * beta))  # surface: 1 / (2 beta)
    assert sigma[0].item() == pytest.approx(1.0 / beta, rel=1e-6)  # deep inside -> 1 / beta
    assert sigma[4].item() < 1e-6  # far outside -> 0
    assert torch.all(sigma[:-1] > sigma[1:])  # decreasing with distance
    assert sigma[1].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item() / beta)


def test_density_to_raw_inverts_shifted_softplus_and_clamps():
    shift = density_shift(1e-6, 1 / 63)
    sigma = torch.tensor([20.0, 10.0, 1.0, 1e-9])
    raw = density_to_raw(sigma, shift)
    back = F.softplus(raw + shift)
    assert torch.allclose(back[:3], sigma[:3], rtol=1e-4)
    assert raw[3].item() == 0.0  # Eq. 9b clamp: far outside keeps DVGO's initial value 0
    assert torch.all(raw >= 0)


def test_density_shift_eq8_gives_alpha_init_per_voxel():
    for res in (32, 128):
        s = 1.0 / (res - 1)
        b = density_shift(1e-6, s)
        alpha = 1 - math.exp(-F.softplus(torch.tensor(b)).item() * s)
        assert alpha == pytest.approx(1e-6, rel=1e-3)
    with pytest.raises(ValueError):
        density_shift(0.0, 0.1)


def test_sample_grid_axis_convention_and_trilinear_exactness():
    R = 9
    pts = grid_points(R)  # (R, R, R, 3) with indexing ij
    # A linear function is reproduced exactly by trilinear interpolation.
    grid = (pts[..., 0] * 1.0 + pts[..., 1] * 2.0 - pts[..., 2] * 3.0)[None]
    q = torch.rand(200, 3) - 0.5
    vals = sample_grid(grid, q)[..., 0]
    assert torch.allclose(vals, q[:, 0] + 2 * q[:, 1] - 3 * q[:, 2], atol=1e-5)
    # grid[ix, iy, iz] lives at -0.5 + (ix, iy, iz) / (R - 1)
    assert torch.allclose(pts[2, 5, 7], torch.tensor([-0.5 + 2 / 8, -0.5 + 5 / 8, -0.5 + 7 / 8]))
    assert sample_grid(grid, q.reshape(4, 50, 3)).shape == (4, 50, 1)


def test_density_grid_from_sdf_matches_eq9_and_is_transparent_when_empty():
    R = 17
    pts = grid_points(R)
    sdf = torch.linalg.norm(pts, dim=-1) - 0.3
    field = DensityGridField.from_sdf(sdf, beta=0.05, color="grid")
    expected = sdf_to_density(sdf, 0.05)
    got = field.density_grid()
    near = expected > 1.0
    assert torch.allclose(got[near], expected[near], rtol=1e-3)
    sigma, rgb = field.query(pts.reshape(-1, 3))
    assert sigma.shape == (R**3,) and rgb.shape == (R**3, 3)
    assert torch.all(sigma >= 0) and torch.all((rgb >= 0) & (rgb <= 1))
    empty = DensityGridField(resolution=R, color="mlp")
    assert empty.density_grid().max().item() < 1e-3  # alpha_init: nearly transparent
    with pytest.raises(ValueError):
        DensityGridField(resolution=R, color="nope")


def test_sdf_grid_field_and_colour_modules():
    R = 17
    sdf = torch.linalg.norm(grid_points(R), dim=-1) - 0.3
    f = SDFGridField(sdf, beta=0.05, color=(0.1, 0.2, 0.3))
    sigma, rgb = f.query(torch.zeros(5, 3))
    assert torch.allclose(sigma, sdf_to_density(torch.full((5,), -0.3), 0.05), rtol=1e-4)
    assert torch.allclose(rgb[0], torch.tensor([0.1, 0.2, 0.3]))
    assert ColorGrid(8)(torch.zeros(3, 3)).allclose(torch.full((3, 3), 0.5))
    out = ColorMLP(pe_freqs=2, hidden=16)(torch.rand(2, 7, 3) - 0.5)
    assert out.shape == (2, 7, 3) and torch.all((out > 0) & (out < 1))


def test_implicit_decoder_shapes_errors_and_latent_dependence():
    torch.manual_seed(0)
    dec = ImplicitDecoder(latent_dim=8, hidden=32, n_blocks=3, pe_freqs=2)
    for blk in dec.blocks:  # non-trivial blocks for the test (fc_1 starts at zero as in DVR)
        torch.nn.init.normal_(blk.fc_1.weight, std=0.1)
    p = torch.rand(2, 10, 3) - 0.5
    z = torch.randn(2, 8)
    logits, rgb = dec(p, z)
    assert logits.shape == (2, 10) and rgb.shape == (2, 10, 3)
    assert torch.all((rgb >= 0) & (rgb <= 1))
    logits2, _ = dec(p, torch.randn(2, 8))
    assert not torch.allclose(logits, logits2)  # the latent is added in each block
    with pytest.raises(ValueError):
        dec(p, torch.randn(2, 7))
    with pytest.raises(ValueError):
        dec(p[0], z)
    # ISS++ Sec. 3.3 split: outputs unchanged, colour branch separate from occupancy parameters
    branch = dec.split_heads()
    l3, c3 = dec(p, z)
    assert torch.allclose(l3, logits, atol=1e-6) and torch.allclose(c3, rgb, atol=1e-6)
    occ_ids = {id(q) for q in dec.occupancy_parameters()}
    assert all(id(q) not in occ_ids for q in branch.parameters())
    assert ImplicitDecoder(**dec.config()).config() == dec.config()


def test_decoder_field_query_and_sampling_helpers():
    torch.manual_seed(0)
    dec = ImplicitDecoder(latent_dim=4, hidden=16, n_blocks=2)
    field = DecoderField(dec, torch.randn(4))
    sigma, rgb = field.query(torch.rand(3, 5, 3) - 0.5)
    assert sigma.shape == (3, 5) and rgb.shape == (3, 5, 3)
    assert torch.all(sigma >= 0) and torch.all(sigma <= 1 / field.beta + 1e-4)
    with pytest.raises(ValueError):
        DecoderField(dec, torch.randn(2, 4))
    grid = field_grid(SphereField(0.3), 9)
    assert grid.shape == (9, 9, 9) and grid[4, 4, 4] > grid[0, 0, 0]
    colors = field_color_fn(SphereField(0.3, color=(0.2, 0.4, 0.6)))(np.zeros((4, 3), np.float32))
    assert np.allclose(colors, [[0.2, 0.4, 0.6]] * 4, atol=1e-4)


def test_cached_decoder_field_matches_the_decoder_on_its_grid_and_passes_gradients_to_z():
    """Stage 2 on a CPU renders the decoder through a decoded grid: at grid points it is the decoder itself, between
    them a trilinear blend, and the CLIP/Eq. 3 gradients still reach the latent."""
    from backend.fields.adapters import CachedDecoderField, DecoderField
    from backend.fields.decoder import ImplicitDecoder
    from backend.fields.grid import grid_points

    torch.manual_seed(0)
    dec = ImplicitDecoder(latent_dim=8, hidden=32, n_blocks=2, pe_freqs=2)
    z = torch.randn(1, 8, requires_grad=True)
    cached = CachedDecoderField(dec, z, 9, beta=0.05, chunk=100)  # chunking must not change anything
    direct = DecoderField(dec, z, beta=0.05)
    pts = grid_points(9).reshape(-1, 3)
    occ_c, rgb_c = cached.occupancy_and_colour(pts)
    occ_d, rgb_d = direct.occupancy_and_colour(pts)
    assert torch.allclose(occ_c, occ_d, atol=1e-5) and torch.allclose(rgb_c, rgb_d, atol=1e-5)
    sigma_c, _ = cached.query(pts)
    assert torch.allclose(sigma_c, occ_d / 0.05, atol=1e-4)
    mid = (pts[:1] + pts[1:2]) / 2  # halfway between two neighbouring grid points: the mean of their values
    assert torch.allclose(cached.occupancy_and_colour(mid)[0], occ_c[:2].mean(), atol=1e-5)
    cached.query(torch.rand(64, 3) - 0.5)[0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
