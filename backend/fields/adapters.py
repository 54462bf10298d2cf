"""Fields that are not grids: the latent-conditioned decoder as a field, and analytic test shapes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from backend.fields.decoder import ImplicitDecoder
from backend.fields.sdf import sdf_to_density


class DecoderField(nn.Module):
    """Wrap :class:`ImplicitDecoder` and one latent ``z`` (L,) or (1, L) as a field for the volume renderer.

    Occupancy logit -> density: DVR/ISS render the occupancy surface by root finding; Stepstone volume-renders it
    instead, giving the occupancy probability the shape of Dream3D's Eq. 9a:
    ``sigma = sigmoid(logit / temperature) / beta`` (Eq. 9a with ``-sdf / beta`` replaced by the logit).
    With ``temperature = 1`` this is the occupancy probability ``o = sigmoid(logit)`` scaled by ``1 / beta``, so
    the object (o > 0.5, DVR's threshold t) is dense and empty space (o -> 0) is transparent. ``beta`` defaults to
    0.02 (max density 50 per unit, opaque after ~0.1 units), sharper than Eq. 9's 0.05 because an occupancy field
    saturates to 1 inside instead of growing with depth like an SDF.

    ``z`` is used as given (a leaf with ``requires_grad`` lets gradients reach the latent).
    """

    def __init__(self, decoder: ImplicitDecoder, z: Tensor, beta: float = 0.02, temperature: float = 1.0) -> None:
        super().__init__()
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[0] != 1:
            raise ValueError(f"DecoderField takes one latent of shape (L,) or (1, L), got {tuple(z.shape)}")
        self.decoder = decoder
        self.z = z
        self.beta = float(beta)
        self.temperature = float(temperature)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        lead = points.shape[:-1]
        logits, rgb = self.decoder(points.reshape(1, -1, 3), self.z)
        sigma = torch.sigmoid(logits / self.temperature) / self.beta
        return sigma.reshape(lead), rgb.reshape(*lead, 3)

    def occupancy_logits(self, points: Tensor) -> Tensor:
        """Raw occupancy logits at points (..., 3), for marching cubes at level 0 (occupancy 0.5)."""
        lead = points.shape[:-1]
        logits, _ = self.decoder(points.reshape(1, -1, 3), self.z)
        return logits.reshape(lead)

    def occupancy_and_colour(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Occupancy probability (...,) and colour (..., 3) at points (..., 3) (what Eq. 3 of ISS++ reads)."""
        lead = points.shape[:-1]
        logits, rgb = self.decoder(points.reshape(1, -1, 3), self.z)
        return torch.sigmoid(logits / self.temperature).reshape(lead), rgb.reshape(*lead, 3)


class CachedDecoderField(nn.Module):
    """The decoder field of one latent, decoded once on a resolution-R grid and then sampled trilinearly.

    Same density law as :class:`DecoderField` (``sigma = o / beta``), but the decoder runs on R^3 grid points per
    construction instead of on every ray sample, and gradients flow to ``z`` through the grid values. Stage 2 on a
    CPU renders m views x H^2 pixels x K samples (~0.3 M decoder queries and their backward per iteration with the
    CPU view settings); a 32^3 grid is 33 k queries, about ten times less, for a slightly softer image (the CLIP
    input is 64-224 px). This is a substitution of ours for ISS's direct rendering, used where ``ViewConfig.
    field_grid`` asks for it; the paper's setting (``field_grid = 0``) queries the decoder directly.
    """

    def __init__(self, decoder: ImplicitDecoder, z: Tensor, resolution: int, beta: float = 0.02,
                 temperature: float = 1.0, chunk: int = 8192) -> None:
        super().__init__()
        from backend.fields.grid import grid_points

        if z.ndim == 1:
            z = z[None]
        self.beta = float(beta)
        pts = grid_points(int(resolution), device=z.device).reshape(1, -1, 3)
        from backend.fields.frozen_decoder import decode_frozen

        # a frozen decoder with a trainable z (stage 2): the same values, a quarter of autograd's saved bytes
        outs = [decode_frozen(decoder, pts[:, s:s + chunk], z) for s in range(0, pts.shape[1], chunk)]
        logits = torch.cat([o[0] for o in outs], dim=1)
        rgb = torch.cat([o[1] for o in outs], dim=1)
        r = int(resolution)
        occ = torch.sigmoid(logits / float(temperature)).reshape(1, r, r, r)
        self.grid = torch.cat([occ, rgb[0].t().reshape(3, r, r, r)], dim=0)  # (4, R, R, R)

    def occupancy_and_colour(self, points: Tensor) -> tuple[Tensor, Tensor]:
        from backend.fields.grid import sample_grid

        v = sample_grid(self.grid, points)
        return v[..., 0], v[..., 1:4]

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        occ, rgb = self.occupancy_and_colour(points)
        return occ / self.beta, rgb


class SphereField(nn.Module):
    """Analytic sphere: exact SDF ``|x - c| - r`` turned into density with Eq. 9a (small beta: a crisp edge).

    Used by tests (known silhouettes) and benchmarks; ``color`` is a learnable constant RGB in [0, 1] (logits).
    Eq. 9a's density tail makes the rendered silhouette grow by about ``beta * ln(sqrt(2 pi r / beta) / ln 2)``
    (0.4% of r = 0.3 for beta = 0.001, 6% for beta = 0.005).
    """

    def __init__(self, radius: float = 0.3, center: Sequence[float] = (0.0, 0.0, 0.0), beta: float = 0.002,
                 color: Sequence[float] = (0.9, 0.4, 0.2)) -> None:
        super().__init__()
        self.radius = float(radius)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))
        self.beta = float(beta)
        c = torch.tensor(color, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
        self.color_logit = nn.Parameter(torch.log(c / (1 - c)))

    def signed_distance(self, points: Tensor) -> Tensor:
        return torch.linalg.norm(points - self.center.to(points.dtype), dim=-1) - self.radius

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        sigma = sdf_to_density(self.signed_distance(points), self.beta)
        rgb = torch.sigmoid(self.color_logit).to(points.dtype).expand(*points.shape[:-1], 3)
        return sigma, rgb
