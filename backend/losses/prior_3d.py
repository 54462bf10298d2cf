"""3D prior loss L_P of ISS++ (paper 000, Sec. 3.4.1, Eq. 6).

During shape-and-texture stylization the occupancy branch is optimised with the CLIP consistency loss (Eq. 4); to
keep the structure the shape had before stylization, ISS++ adds

    L_P = sum_p | D_o(p) - D'_o(p) |                                                    (Eq. 6)

where ``D_o(p)`` is the initial occupancy prediction at query point ``p`` and ``D'_o(p)`` the prediction of the
field being optimised. Here the field may be the SVR decoder or, for an artist's mesh, the Dream3D SDF-derived
density grid; the occupancy of the latter is ``beta * sigma`` (= ``sigmoid(-sdf / beta)`` at initialisation,
Dream3D Eq. 9a), a probability in [0, 1] like ``D_o``.

Simplification / choice: the paper writes a plain sum over the query points; the default ``reduction="mean"``
divides by the number of points so that the weight ``lambda_p`` does not depend on how many points are sampled
per iteration (``reduction="sum"`` gives Eq. 6 literally).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["prior_3d_loss", "sample_prior_points"]


def prior_3d_loss(
    occupancy: Tensor,
    occupancy_init: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """ISS++ Eq. 6: ``sum_p |D_o(p) - D'_o(p)|`` between current and initial occupancy at the same points.

    Args:
        occupancy: occupancy of the field being optimised at the query points, any shape, differentiable.
        occupancy_init: occupancy of the initial (frozen) field at the same points; gradients are not taken
            through it (it is detached).
        reduction: ``"sum"`` is Eq. 6 as written; ``"mean"`` (default) divides by the number of points.

    Returns a scalar tensor.
    """
    if occupancy.shape != occupancy_init.shape:
        raise ValueError(
            f"prior_3d_loss: occupancy shapes differ: {tuple(occupancy.shape)} vs {tuple(occupancy_init.shape)}"
        )
    diff = (occupancy - occupancy_init.detach().to(occupancy.dtype)).abs()
    if reduction == "sum":
        return diff.sum()
    if reduction == "mean":
        return diff.mean() if diff.numel() else diff.sum()
    raise ValueError(f"prior_3d_loss: unknown reduction {reduction!r}; use 'mean' or 'sum'")


def sample_prior_points(
    n: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    bound: float = 0.5,
    near_surface: Tensor | None = None,
    surface_fraction: float = 0.5,
    surface_std: float = 0.02,
) -> Tensor:
    """Query points ``p`` for Eq. 6: uniform in the cube ``[-bound, bound]^3``, optionally half near the surface.

    ISS++ does not say how ``p`` is drawn; uniform samples over the volume plus jittered samples around surface
    points (``near_surface``, (K, 3)) weight the loss where the shape can actually change.
    """
    if n <= 0:
        raise ValueError("sample_prior_points: n must be positive")
    n_surf = 0
    if near_surface is not None and len(near_surface) > 0:
        n_surf = int(round(n * float(surface_fraction)))
    n_uni = n - n_surf
    pts = (torch.rand(n_uni, 3, device=device, generator=generator) * 2.0 - 1.0) * bound
    if n_surf:
        surf = near_surface.to(device=device, dtype=pts.dtype)
        idx = torch.randint(0, len(surf), (n_surf,), device=device, generator=generator)
        jitter = torch.randn(n_surf, 3, device=device, generator=generator) * surface_std
        pts = torch.cat([pts, (surf[idx] + jitter).clamp(-bound, bound)], dim=0)
    return pts
