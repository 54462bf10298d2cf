"""CLIP consistency loss of ISS/ISS++ (paper 000, Eq. 4 and Eq. 5) and the CLIP loss of Dream3D (paper 001, Eq. 1).

ISS++ Eq. 4 writes ``L_C = sum_i <f_T . E_I(R_i) / |E_I(R_i)|>`` over the m rendered views ``R_i``. As printed the
inner product is a *similarity* (to be maximised); the official code and the text ("by minimizing this loss we
encourage the output shape to be consistent with the input text") minimise the cosine *distance*. We therefore
minimise ``1 - <t, e_i>`` with unit-norm ``e_i``; the gradient is the same as maximising Eq. 4 up to sign, and the
value is a distance in [0, 2] that falls as the views become consistent with the text.

Eq. 5 replaces the target ``f_T`` by the blend ``tau f_{T->I} + (1 - tau) f_T`` of a diffusion-prior image feature and
the text feature (:func:`blend_target`). The blend is used as printed, without re-normalisation (for tau = 0 it is
exactly ``f_T``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip_consistency_loss", "blend_target", "clip_loss"]


def _as_target(target: Tensor, n: int) -> Tensor:
    if target.ndim == 1:
        target = target[None]
    if target.ndim != 2 or target.shape[0] not in (1, n):
        raise ValueError(f"target must have shape (D,), (1, D) or ({n}, D), got {tuple(target.shape)}")
    return target


def clip_consistency_loss(target: Tensor, image_features: Tensor, reduction: str = "mean") -> Tensor:
    """ISS++ Eq. 4: cosine distance between the text (or blended, Eq. 5) target and the CLIP features of m views.

    Args:
        target: ``f_T`` (D,) or (1|m, D); used as given (CLIP text features are unit-norm already).
        image_features: ``E_I(R_i)`` (m, D); normalised here, as in Eq. 4.
        reduction: "mean" (default, scale independent of m) or "sum" (Eq. 4 as printed).

    Returns ``sum_i (1 - <target, E_I(R_i)/|E_I(R_i)|>)`` (or its mean over the views), differentiable in both inputs.
    """
    if image_features.ndim != 2:
        raise ValueError(f"image_features must have shape (m, D), got {tuple(image_features.shape)}")
    t = _as_target(target, image_features.shape[0]).to(image_features.dtype)
    if t.shape[-1] != image_features.shape[-1]:
        raise ValueError(f"feature sizes differ: target {t.shape[-1]} vs images {image_features.shape[-1]}")
    e = image_features / image_features.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    dist = 1.0 - (t * e).sum(-1)
    if reduction == "sum":
        return dist.sum()
    if reduction == "mean":
        return dist.mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def blend_target(f_text: Tensor, f_text_to_image: Tensor, tau: float) -> Tensor:
    """ISS++ Eq. 5: ``tau * f_{T->I} + (1 - tau) * f_T`` (tau = 0.5 in Sec. 4.2; larger tau = more diversity)."""
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if f_text.shape != f_text_to_image.shape:
        raise ValueError(f"f_T {tuple(f_text.shape)} and f_T->I {tuple(f_text_to_image.shape)} differ in shape")
    return float(tau) * f_text_to_image + (1.0 - float(tau)) * f_text


def clip_loss(text_features: Tensor, image_features: Tensor) -> Tensor:
    """Dream3D Eq. 1: ``L_CLIP = -E_I(R(theta; v_i))^T E_T(y)``, averaged over the rendered views (both unit-norm)."""
    if image_features.ndim != 2:
        raise ValueError(f"image_features must have shape (B, D), got {tuple(image_features.shape)}")
    t = _as_target(text_features, image_features.shape[0]).to(image_features.dtype)
    e = image_features / image_features.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return -(t * e).sum(-1).mean()
