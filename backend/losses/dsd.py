"""Dual score distillation (ThemeStation, paper 003, Sec. 3.3, Eq. 3-5; noise ranges and weights from appendix A).

Two fine-tuned copies of one text-to-image diffusion model guide the optimisation of a 3D model:

- the **concept prior** ``phi_c`` (fine-tuned on the concept image and augmented views of the initial model),
  applied to the rendered colour image at *high* noise levels ``t_h ~ U[0.5, 0.75] T`` (global layout, colour),
  Eq. 3::

      grad L_concept = E[ w(t_h) (eps_phi_c(x_{t_h}; y, t_h) - eps) dx/dtheta ]

- the **reference prior** ``phi_r`` (fine-tuned on the exemplars' colour renders with prompt ``y_x`` and normal
  maps with ``y_n = y_x + ", normal map"``), applied at *low* noise levels ``t_l ~ U[0.1, 0.25] T`` to both the
  rendered colour image and the rendered normal map (fine detail), Eq. 4::

      grad L_ref = E[ w(t_l) (eps_phi_r(x_{t_l}; y_x, t_l) - eps) dx/dtheta ]
                 + E[ w(t_l) (eps_phi_r(n_{t_l}; y_n, t_l) - eps) dn/dtheta ]

- Eq. 5: ``grad L_DSD = alpha grad L_concept + beta grad L_ref`` with ``alpha = 0.2``, ``beta = 1.0``.

**Simplification (stated honestly):** the paper (and its official code) builds each term on VSD (Eq. 2), i.e.
subtracts the score ``eps_lora`` of a LoRA model trained online on the current renders. Here each term is plain
SDS (Eq. 1): ``eps_lora`` is replaced by the sampled noise ``eps``, so no third network is trained during
optimisation. Each term is computed by :func:`backend.losses.sds.sds_terms` (DreamFusion weighting
``w(t) = 1 - alpha_bar_t``) with the timestep range restricted to the prior's noise band.

The two priors may be two adapters (peft LoRA) on one UNet: a :class:`ScorePrior` names the adapter to activate
while its term is evaluated (``None`` = the base model with adapters disabled).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.losses.sds import sds_terms

__all__ = [
    "DSDConfig",
    "ScorePrior",
    "DSDResult",
    "timestep_bounds",
    "sample_timesteps",
    "use_adapter",
    "concept_loss",
    "reference_loss",
    "dsd_loss",
]


@dataclass
class DSDConfig:
    """DSD hyper-parameters (ThemeStation appendix A)."""

    alpha: float = 0.2  # Eq. 5: weight of the concept prior
    beta: float = 1.0  # Eq. 5: weight of the reference prior
    concept_t_range: tuple[float, float] = (0.5, 0.75)  # t_h, fractions of the T training steps (high noise)
    reference_t_range: tuple[float, float] = (0.1, 0.25)  # t_l (low noise)
    # Classifier-free guidance of each SDS term. The paper's priors are sampled with CFG 7.5 (appendix A); VSD
    # works at that scale. Plain SDS usually wants more (DreamFusion uses 100); 7.5 keeps the refinement close to
    # the initial model, which is what DSD starts from.
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        for name in ("concept_t_range", "reference_t_range"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("DSD weights alpha and beta must be >= 0")


@dataclass
class ScorePrior:
    """One diffusion prior of DSD: a bundle (``unet``, ``scheduler``, optional ``vae``), the LoRA adapter to
    activate (``None`` = base model) and the text conditioning(s) it was fine-tuned with.

    ``cond`` is the prompt embedding ``y`` (concept prior) or ``y_x`` (reference prior, colour); ``cond_normal``
    is ``y_n`` (reference prior, normal maps); ``uncond`` the empty-prompt embedding for classifier-free guidance.
    """

    bundle: Any
    cond: Tensor
    uncond: Optional[Tensor] = None
    adapter: Optional[str] = None
    cond_normal: Optional[Tensor] = None


@dataclass
class DSDResult:
    """The DSD loss (Eq. 5) and its parts; ``t_concept`` / ``t_reference`` are the timesteps drawn."""

    loss: Tensor
    concept: Tensor
    reference: Tensor
    t_concept: Tensor
    t_reference: Tensor


def timestep_bounds(t_range: tuple[float, float], num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer bounds ``[ceil(lo T), floor(hi T)]`` so every drawn ``t / T`` lies inside ``t_range``."""
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {t_range}")
    n = int(num_train_timesteps)
    t_lo = min(math.ceil(lo * n - 1e-6), n - 1)  # tolerance: 0.1 * 1000 is 100.00000000000001 in floats
    t_hi = min(math.floor(hi * n + 1e-6), n - 1)
    return t_lo, max(t_lo, t_hi)


def sample_timesteps(
    n: int, t_range: tuple[float, float], num_train_timesteps: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``n`` integer timesteps uniform in the band ``t_range`` (fractions of T), ThemeStation appendix A's
    "dynamic diffusion timestep": ``[0.5, 0.75]`` for the concept prior, ``[0.1, 0.25]`` for the reference prior."""
    lo, hi = timestep_bounds(t_range, num_train_timesteps)
    return torch.randint(lo, hi + 1, (n,), generator=generator)


@contextlib.contextmanager
def use_adapter(bundle: Any, adapter: Optional[str]) -> Iterator[None]:
    """Activate the peft adapter ``adapter`` of ``bundle.unet`` (``None``: disable all adapters) for a block."""
    unet = bundle.unet
    has_peft = bool(getattr(unet, "peft_config", None))
    if not has_peft:
        if adapter is not None:
            raise ValueError(f"the UNet has no LoRA adapters; cannot activate {adapter!r}")
        yield
        return
    if adapter is None:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    if adapter not in unet.peft_config:
        raise ValueError(f"the UNet has no LoRA adapter {adapter!r} (has {sorted(unet.peft_config)})")
    unet.enable_adapters()
    unet.set_adapter(adapter)
    yield


def _sds_band(
    prior: ScorePrior,
    images: Tensor,
    cond: Tensor,
    t_range: tuple[float, float],
    guidance_scale: float,
    generator: Optional[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """SDS (Eq. 1, plain-SDS form of Eq. 3/4) of ``images`` under ``prior`` with t restricted to ``t_range``."""
    # sds_terms draws t in [int(lo T), int(hi T)]; hand it the band tightened to whole timesteps (plus half a step,
    # so float rounding cannot move a bound) so every draw satisfies lo <= t/T <= hi exactly.
    n = int(prior.bundle.scheduler.config.num_train_timesteps)
    t_lo, t_hi = timestep_bounds(t_range, n)
    band = ((t_lo + 0.5) / n, (t_hi + 0.5) / n)
    with use_adapter(prior.bundle, prior.adapter):
        terms = sds_terms(prior.bundle, images, cond, prior.uncond, guidance_scale, band, generator=generator)
    latents, grad = terms["latents"].float(), terms["grad"].float()  # fp32 sum: fp16 latents would overflow
    loss = 0.5 * F.mse_loss(latents, (latents - grad).detach(), reduction="sum")
    return loss, terms["t"]


def concept_loss(
    prior: ScorePrior, images: Tensor, cfg: DSDConfig = DSDConfig(), generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """Concept-prior term, Eq. 3 (plain SDS): rendered colour ``images`` (B, 3, H, W) in [0, 1] at high noise.

    Returns ``(loss, t)``; the loss's gradient w.r.t. the model-space images is ``w(t_h)(eps_phi_c - eps)``.
    """
    return _sds_band(prior, images, prior.cond, cfg.concept_t_range, cfg.guidance_scale, generator)


def reference_loss(
    prior: ScorePrior,
    images: Tensor,
    normals: Optional[Tensor],
    cfg: DSDConfig = DSDConfig(),
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Reference-prior term, Eq. 4 (plain SDS): colour ``images`` with ``y_x`` plus normal maps ``normals``
    (B, 3, H, W) in [0, 1] with ``y_n``, both at low noise. ``normals=None`` drops the normal-map half.

    Returns ``(loss, t)`` with ``t`` the timesteps of both halves concatenated.
    """
    loss_x, t_x = _sds_band(prior, images, prior.cond, cfg.reference_t_range, cfg.guidance_scale, generator)
    if normals is None:
        return loss_x, t_x
    cond_n = prior.cond_normal if prior.cond_normal is not None else prior.cond
    loss_n, t_n = _sds_band(prior, normals, cond_n, cfg.reference_t_range, cfg.guidance_scale, generator)
    return loss_x + loss_n, torch.cat([t_x, t_n])


def dsd_loss(
    concept: ScorePrior,
    reference: ScorePrior,
    images: Tensor,
    normals: Optional[Tensor],
    cfg: DSDConfig = DSDConfig(),
    generator: Optional[torch.Generator] = None,
) -> DSDResult:
    """Eq. 5: ``alpha L_concept(phi_c, t_h) + beta L_ref(phi_r, t_l)``; a term with weight 0 is skipped.

    The random draws happen in the order concept (t, eps), reference colour, reference normal, so a caller that
    evaluates :func:`concept_loss` then :func:`reference_loss` with the same generator gets the same terms.
    """
    zero = images.sum() * 0.0
    empty = torch.zeros(0, dtype=torch.long)
    l_c, t_c = concept_loss(concept, images, cfg, generator) if cfg.alpha > 0 else (zero, empty)
    l_r, t_r = reference_loss(reference, images, normals, cfg, generator) if cfg.beta > 0 else (zero, empty)
    total = cfg.alpha * l_c + cfg.beta * l_r
    return DSDResult(loss=total, concept=l_c, reference=l_r, t_concept=t_c, t_reference=t_r)
