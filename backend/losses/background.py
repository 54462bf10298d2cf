"""Background loss of ISS/ISS++ (paper 000, Eq. 3).

``L_bg = sum_p ||D_c(p) - 1||^2 * 1(F n ray(o, p) = {})``: the decoder's colour ``D_c`` at query points ``p`` whose
camera ray does not meet the object region ``F = {p : D_o(p) > t}`` is pulled to white. The threshold ``t`` is 0.5
(Sec. 4.2). :func:`background_ray_mask` computes the indicator per ray from the occupancy of the ray's samples;
:func:`background_loss` is the loss over the colours of the samples of those rays.

We average instead of summing (so lambda_bg = 10 of Sec. 4.2 keeps its meaning whatever the number of rays and
samples); that is a constant rescaling of Eq. 3.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["background_ray_mask", "background_loss"]


def background_ray_mask(occupancy: Tensor, threshold: float = 0.5) -> Tensor:
    """``1(F n ray = {})`` per ray: True where no sample of the ray has occupancy probability above ``threshold``.

    Args:
        occupancy: (..., K) occupancy probabilities ``D_o(p)`` in [0, 1] of K samples along each ray.
    Returns a bool tensor (...,) with the indicator of Eq. 3 (no gradient).
    """
    return ~(occupancy.detach() > threshold).any(dim=-1)


def background_loss(colors: Tensor, background: Tensor) -> Tensor:
    """ISS++ Eq. 3 (mean form): mean of ``||D_c(p) - 1||^2`` over the samples of background rays.

    Args:
        colors: (..., K, 3) or (..., 3) colours ``D_c(p)`` in [0, 1].
        background: bool (...,) mask of background rays (see :func:`background_ray_mask`) broadcastable to the
            leading dimensions of ``colors``.
    Returns a scalar; zero when there is no background ray.
    """
    if colors.shape[-1] != 3:
        raise ValueError(f"colors must end in 3 channels, got {tuple(colors.shape)}")
    sq = ((colors - 1.0) ** 2).sum(-1)  # (..., K) or (...)
    mask = background.to(sq.dtype)
    while mask.ndim < sq.ndim:
        mask = mask[..., None]
    mask = mask.expand_as(sq)
    denom = mask.sum()
    if float(denom) == 0.0:
        return sq.sum() * 0.0
    return (sq * mask).sum() / denom
