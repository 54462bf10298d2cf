"""Prompts, concept images and view augmentation (ThemeStation, paper 003, Sec. 3.1 and 3.3.2).

- Shared theme prompt (Sec. 3.1): "a 3D model of <subject>, in the style of [V]"; the normal-map prompt of the
  reference prior (Sec. 3.3.3) appends ", normal map"; the concept prior's prompt (Sec. 3.3.2) is
  "a 3D model of [V] <subject>". ``[V]`` is written as the rare token "sks" (DreamBooth's identifier), a single
  token the fine-tuning binds to the theme.
- Concept images (Sec. 3.1): DDIM samples of the theme-tuned model for new subjects with classifier-free guidance
  7.5 (appendix A), asked for a front view so the image-to-3D step sees the pose it expects.
- Augmented views (Sec. 3.3.2): renders of the initial model passed through an image-to-image translation
  ``a(.)``; as in DreamBooth3D this is SDEdit (noise the render to ``strength * T``, denoise with the theme-tuned
  model), which sharpens the initial model's blurry renders towards the theme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from backend.events import checkpoint as cancel_checkpoint

IDENTIFIER = "sks"  # the paper's [V]


@dataclass
class ConceptConfig:
    """Concept-image sampling (ThemeStation appendix A)."""

    steps: int = 50  # DDIM steps (Stable Diffusion's usual count; the paper does not state it)
    guidance_scale: float = 7.5  # appendix A: CFG weight at inference
    negative_prompt: str = ""


@dataclass
class ConceptPriorConfig:
    """Learning the concept prior (Sec. 3.3.2; appendix A: the concept image and 20 augmented views)."""

    augmented_views: int = 20
    iterations: int = 200  # not stated for this prior; the theme model's single-exemplar count (appendix A)
    augment_strength: float = 0.5  # SDEdit noise level of a(.) as a fraction of T
    augment_steps: int = 20  # DDIM steps over the full schedule (only the last ``strength`` part runs)


def subject_from_name(name: str) -> str:
    """A subject phrase from an object name: "Tower.001" -> "tower", "old_house-2" -> "old house"."""
    base = re.sub(r"\.\d+$", "", str(name or ""))
    words = re.sub(r"[_\-.]+|(?<=[a-z])(?=[A-Z])", " ", base).split()
    words = [w.lower() for w in words if not w.isdigit()]
    return " ".join(words) or "object"


def theme_prompt(subject: str, view: Optional[str] = None, normal: bool = False) -> str:
    """Sec. 3.1 / 3.3.3: ``y_x`` = "a 3D model of <subject>, in the style of [V]"; ``y_n`` = y_x + ", normal map"."""
    p = f"a 3D model of {subject}, in the style of {IDENTIFIER}"
    if normal:
        p += ", normal map"
    if view:
        p += f", {view}"
    return p


def concept_prior_prompt(subject: str, view: Optional[str] = None) -> str:
    """Sec. 3.3.2: "a 3D model of [V] <subject>"."""
    p = f"a 3D model of {IDENTIFIER} {subject}"
    return f"{p}, {view}" if view else p


def subjects_for(count: int, subjects: Sequence[str], exemplar_subjects: Sequence[str]) -> list[str]:
    """``count`` subjects: the artist's list cycled; without one, the exemplars' subjects (variations of them)."""
    pool = [s.strip() for s in subjects if s and s.strip()] or list(exemplar_subjects) or ["object"]
    return [pool[i % len(pool)] for i in range(count)]


@torch.no_grad()
def sample_concepts(bundle: Any, prompts: Sequence[str], cfg: ConceptConfig, seeds: Sequence[int]) -> Tensor:
    """One concept image per prompt (B, 3, R, R) in [0, 1], each from its own seed (the theme adapter active)."""
    out = []
    for prompt, seed in zip(prompts, seeds):
        g = torch.Generator().manual_seed(int(seed))
        out.append(bundle.sample([prompt], steps=cfg.steps, guidance_scale=cfg.guidance_scale, generator=g,
                                 negative_prompt=cfg.negative_prompt))
    return torch.cat(out)


@torch.no_grad()
def img2img(
    bundle: Any,
    images: Tensor,
    prompts: Sequence[str],
    strength: float,
    steps: int,
    guidance_scale: float = 7.5,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """SDEdit (Meng et al.): noise ``images`` (B, 3, H, W) to ``strength * T`` and denoise with DDIM + CFG.

    Returns images at the model's resolution in [0, 1]. ``strength = 0`` returns the inputs resized.
    """
    x0 = bundle.to_model_space(images)
    n_train = bundle.num_train_timesteps
    bundle.sampler.set_timesteps(max(1, int(steps)), device=x0.device)
    ts = [t for t in bundle.sampler.timesteps if int(t) <= float(strength) * n_train]
    if not ts:
        return bundle.from_model_space(x0)
    cond = bundle.encode_prompt(list(prompts))
    uncond = bundle.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x = bundle.add_noise(x0, noise, torch.full((len(x0),), int(ts[0]), device=x0.device))
    for t in ts:
        cancel_checkpoint()
        eps = bundle.predict_noise(x, t, cond, uncond, guidance_scale)
        x = bundle.sampler.step(eps, t, x).prev_sample
    return bundle.from_model_space(x)
