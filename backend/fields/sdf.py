"""SDF to volume density (Dream3D, paper 001, Sec. 3.2 Eq. 2-3 = appendix D.2 Eq. 9a/9b).

Eq. 9a: ``Sigma = (1 / beta) * sigmoid(-sdf / beta)``  (activated density, the sigma of Eq. 6b)
Eq. 9b: ``V_density = max(0, softplus^{-1}(Sigma))``  (raw, pre-activation density stored in the DVGO grid)

``beta = 0.05`` (Dream3D); smaller beta gives a sharper boundary. Distances are in the renderer's world units
(the unit cube [-0.5, 0.5]^3), so Sigma is a density per world unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_BETA = 0.05  # Dream3D appendix D.2


def sdf_to_density(sdf: Tensor, beta: float = DEFAULT_BETA) -> Tensor:
    """Activated density from signed distance (negative inside), Dream3D Eq. 9a. Differentiable, >= 0."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.sigmoid(-sdf / beta) / beta


def inverse_softplus(x: Tensor) -> Tensor:
    """``softplus^{-1}(x) = log(exp(x) - 1)`` computed stably (``x + log(-expm1(-x))``); needs x > 0."""
    x = x.clamp_min(1e-12)
    return x + torch.log(-torch.expm1(-x))


def density_to_raw(sigma: Tensor, shift: float = 0.0) -> Tensor:
    """Raw grid value whose shifted-softplus activation (Eq. 6b, ``softplus(raw + shift)``) is ``sigma``.

    Dream3D Eq. 9b: ``max(0, softplus^{-1}(Sigma))`` for ``shift = 0``. With DVGO's shift ``b`` (Eq. 8) we store
    ``max(0, softplus^{-1}(Sigma) - b)`` so that the rendered density inside and near the shape equals Eq. 9a
    exactly, while far from the shape the grid keeps DVGO's "transparent" initial value 0 (the clamp of Eq. 9b).
    """
    return torch.clamp_min(inverse_softplus(sigma) - shift, 0.0)


def sdf_to_raw_density(sdf: Tensor, beta: float = DEFAULT_BETA, shift: float = 0.0) -> Tensor:
    """Eq. 9a followed by Eq. 9b: the raw DVGO grid initialised from an SDF grid."""
    return density_to_raw(sdf_to_density(sdf, beta), shift)
