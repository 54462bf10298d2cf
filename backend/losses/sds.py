"""Score distillation sampling (DreamFusion, Poole et al. 2022) as ISS++ uses it (paper 000, Sec. 3.4.2, Eq. 7).

Given rendered images ``R`` (B, 3, H, W) in [0, 1] and a frozen text-to-image diffusion model ``phi``:

1. ``z_0`` = the images in the model's space: VAE latents times ``scaling_factor`` for latent diffusion (Stable
   Diffusion), or ``2R - 1`` for a pixel-space UNet; images are resized (differentiably) to the model resolution.
2. sample ``t ~ U[t_min T, t_max T]`` (the annealable range) and ``eps ~ N(0, I)``;
   ``z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps`` (``scheduler.add_noise``).
3. ``eps_hat = eps_u + s (eps_c - eps_u)`` (classifier-free guidance with scale ``s``).
4. Eq. 7c: ``grad = w(t) (eps_hat - eps)`` with ``w(t) = 1 - alpha_bar_t`` (DreamFusion's choice; ISS++ writes
   ``sqrt(alpha_t)``, the Jacobian dz_t/dR, which DreamFusion folds into the weighting), skipping the UNet Jacobian.

The returned scalar is ``0.5 * ||z_0 - stopgrad(z_0 - grad)||^2`` summed over the batch, so its gradient w.r.t.
``z_0`` is exactly ``w(t)(eps_hat - eps)`` per image and autograd carries it through the VAE encoder (if any) and
the resize back to the images and on to the renderer's parameters.

The *bundle* is :class:`backend.models.diffusion.DiffusionBundle` (its ``to_model_space`` and ``predict_noise``
handle VAE, dtype, CPU offload and v-prediction models) or, duck-typed, any object with ``unet`` (diffusers
``UNet2DConditionModel``-like), ``scheduler`` (``alphas_cumprod``, ``add_noise``, ``config.num_train_timesteps``)
and optionally ``vae`` (``AutoencoderKL``-like); an optional ``resolution`` attribute overrides the image size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sds_loss", "sds_terms", "anneal_t_range", "model_resolution"]


def anneal_t_range(
    step: int,
    total: int,
    start: tuple[float, float] = (0.02, 0.98),
    end: tuple[float, float] = (0.02, 0.98),
) -> tuple[float, float]:
    """Linearly anneal the timestep range ``(t_min, t_max)`` (fractions of T) from ``start`` to ``end``.

    With ``start == end`` (the default) the range is fixed, as in DreamFusion; e.g. ``end=(0.02, 0.5)`` lowers the
    maximum noise level late in refinement, which sharpens details.
    """
    f = 0.0 if total <= 1 else min(max(step, 0) / (total - 1), 1.0)
    return (start[0] + (end[0] - start[0]) * f, start[1] + (end[1] - start[1]) * f)


def model_resolution(bundle: Any) -> int:
    """Image side length the diffusion model expects (``bundle.resolution`` or UNet sample size x VAE factor)."""
    res = getattr(bundle, "resolution", None)
    if res:
        return int(res)
    size = int(bundle.unet.config.sample_size)
    vae = getattr(bundle, "vae", None)
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return size


def _encode(bundle: Any, images: Tensor) -> Tensor:
    if hasattr(bundle, "to_model_space"):
        return bundle.to_model_space(images)
    res = model_resolution(bundle)
    x = images
    if x.shape[-2:] != (res, res):
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=False)
    x = x * 2.0 - 1.0
    vae = getattr(bundle, "vae", None)
    if vae is None:
        return x
    x = x.to(next(vae.parameters()).dtype)
    posterior = vae.encode(x).latent_dist
    return posterior.mean * float(getattr(vae.config, "scaling_factor", 0.18215))


def _expand(emb: Tensor, b: int) -> Tensor:
    if emb.ndim == 2:
        emb = emb[None]
    if emb.shape[0] == 1 and b > 1:
        emb = emb.expand(b, *emb.shape[1:])
    if emb.shape[0] != b:
        raise ValueError(f"text embeddings have batch {emb.shape[0]}, images have {b}")
    return emb


def sds_terms(
    bundle: Any,
    images: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor] = None,
    guidance_scale: float = 100.0,
    t_range: tuple[float, float] = (0.02, 0.98),
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """Compute the SDS pieces: ``latents`` z_0 (with grad), ``grad`` = w(t)(eps_hat - eps), ``t`` and ``w``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= t_min <= t_max <= 1, got {t_range}")
    unet, scheduler = bundle.unet, bundle.scheduler
    dev = images.device
    latents = _encode(bundle, images)
    b = latents.shape[0]
    n_train = int(scheduler.config.num_train_timesteps)
    t_lo = max(int(lo * n_train), 0)
    t_hi = min(max(int(hi * n_train), t_lo), n_train - 1)
    t = torch.randint(t_lo, t_hi + 1, (b,), generator=generator, device="cpu").to(dev)
    noise = torch.randn(latents.shape, generator=generator, device="cpu", dtype=torch.float32).to(dev, latents.dtype)
    alphas = scheduler.alphas_cumprod.to(dev, torch.float32)
    w = (1.0 - alphas[t]).to(latents.dtype)
    unet_dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        z_t = scheduler.add_noise(latents.detach(), noise, t)
        if hasattr(bundle, "predict_noise"):
            eps_hat = bundle.predict_noise(z_t, t, cond, uncond, float(guidance_scale)).to(latents.dtype)
            grad = torch.nan_to_num(w.view(-1, *([1] * (latents.ndim - 1))) * (eps_hat - noise))
            return {"latents": latents, "grad": grad, "t": t, "w": w}
        cond_e = _expand(cond.to(dev, unet_dtype), b)
        if uncond is not None and guidance_scale != 1.0:
            uncond_e = _expand(uncond.to(dev, unet_dtype), b)
            eps = unet(
                torch.cat([z_t, z_t]).to(unet_dtype), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond_e, cond_e])
            ).sample.to(latents.dtype)
            eps_u, eps_c = eps.chunk(2)
            eps_hat = eps_u + float(guidance_scale) * (eps_c - eps_u)
        else:
            eps_hat = unet(z_t.to(unet_dtype), t, encoder_hidden_states=cond_e).sample.to(latents.dtype)
        grad = w.view(-1, *([1] * (latents.ndim - 1))) * (eps_hat - noise)
        grad = torch.nan_to_num(grad)
    return {"latents": latents, "grad": grad, "t": t, "w": w}


def sds_loss(
    bundle: Any,
    images: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor] = None,
    guidance_scale: float = 100.0,
    t_range: tuple[float, float] = (0.02, 0.98),
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """ISS++ Eq. 7 / DreamFusion SDS as a scalar whose gradient w.r.t. ``z_0`` is ``w(t)(eps_hat - eps)``.

    Args:
        bundle: diffusion model bundle (``unet``, ``scheduler``, optional ``vae``), frozen.
        images: rendered images (B, 3, H, W) in [0, 1], differentiable.
        cond / uncond: text embeddings (``encoder_hidden_states``) (1|B, L, C) of the prompt and of "".
        guidance_scale: classifier-free guidance ``s`` (100 in DreamFusion); ``uncond=None`` disables guidance.
        t_range: ``(t_min, t_max)`` as fractions of the training timesteps (see :func:`anneal_t_range`).
        generator: CPU ``torch.Generator`` for t and eps (reproducible runs).
    """
    terms = sds_terms(bundle, images, cond, uncond, guidance_scale, t_range, generator)
    latents, grad = terms["latents"], terms["grad"]
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum")
