"""Transmittance loss of Dream Fields (Jain et al. 2022, Sec. 3.2 "Encouraging coherent objects"), as Dream3D uses
it (paper 001, Sec. 3.1: "leverage the transmittance loss introduced by [25] to reduce noise and spurious density").

Dream Fields: ``L_T = -min(tau, mean(T(theta, p)))`` where ``T = 1 - alpha`` is the transmittance of each rendered
pixel (probability the ray reaches the background) and ``tau`` the target transmittance, annealed from 0.5 to
0.88 over the first 500 iterations. Maximising transmittance up to the target makes the scene sparse without
forcing it empty.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["transmittance_loss", "transmittance_target"]


def transmittance_target(step: int, start: float = 0.5, end: float = 0.88, anneal_steps: int = 500) -> float:
    """Dream Fields target transmittance ``tau``: linear from ``start`` to ``end`` over ``anneal_steps`` iterations."""
    if anneal_steps <= 0:
        return float(end)
    f = min(max(step, 0) / anneal_steps, 1.0)
    return float(start + (end - start) * f)


def transmittance_loss(alpha: Tensor, target: float) -> Tensor:
    """``-min(target, mean(1 - alpha))`` (Dream Fields Eq. 3); ``alpha`` is the accumulated opacity of any shape."""
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target transmittance must lie in [0, 1], got {target}")
    trans = (1.0 - alpha).mean()
    return -trans.clamp(max=float(target))
