"""Shape-prior-preserving loss of Dream3D (paper 001, Sec. 3.1, Eq. 4).

``L_prior = - sum_{x,y,z} 1(V_sdf < 0) * alpha(V_density)``: keep the voxels inside the shape prior opaque, where
``alpha(sigma) = 1 - exp(-sigma * delta)`` is the opacity of a voxel for a ray step ``delta`` (appendix D.1, Eq. 7b)
and ``sigma = softplus(V_density + b)`` the activated density (Eq. 6b).

We average over the inside voxels instead of summing (a constant rescaling of Eq. 4, so the weight does not depend
on the grid resolution); the loss lies in [-1, 0].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["opacity", "shape_prior_preserving_loss"]


def opacity(sigma: Tensor, delta: float) -> Tensor:
    """Dream3D Eq. 7b: ``alpha = 1 - exp(-sigma * delta)`` for activated density ``sigma`` and step ``delta``."""
    return 1.0 - torch.exp(-sigma.clamp_min(0.0) * float(delta))


def shape_prior_preserving_loss(sigma: Tensor, prior_sdf: Tensor, delta: float) -> Tensor:
    """Dream3D Eq. 4 (mean form): ``-mean_{V_sdf < 0} alpha(sigma)``.

    Args:
        sigma: activated density grid (..., X, Y, Z) (differentiable).
        prior_sdf: the prior's SDF grid, same shape (negative inside).
        delta: ray step length used by the renderer (or the voxel size), in the grid's world units.
    """
    if sigma.shape != prior_sdf.shape:
        raise ValueError(f"density grid {tuple(sigma.shape)} and prior SDF grid {tuple(prior_sdf.shape)} differ")
    inside = (prior_sdf < 0).to(sigma.dtype).detach()
    n = inside.sum()
    if float(n) == 0.0:
        raise ValueError("the shape prior has no voxel inside (SDF never negative): nothing to preserve")
    return -(opacity(sigma, delta) * inside).sum() / n
