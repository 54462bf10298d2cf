"""Reference-informed 3D asset modelling: optimise the initial model with DSD (ThemeStation Sec. 3.2-3.3, app. A).

Each iteration renders the field from a random viewpoint over a random solid background, both the colour image and
the normal map, and steps the field's parameters along the DSD gradient (Eq. 5, :mod:`backend.losses.dsd`):
concept prior on the colour image at high noise, reference prior on colour and normal map at low noise.
A total-variation term on the colour grid stands in for the paper's texture regularisers (appendix A).

Simplifications (said in the report too):

- the paper converts the initial SDF into DMTet (192 grid, 512 px) and optimises a textured mesh; Stepstone
  optimises its common representation instead, a DVGO density grid + colour grid (Dream3D appendix D.1)
  initialised from the initial model's SDF with Dream3D Eq. 9, and extracts the mesh by marching cubes;
- normal maps come from finite differences of the density (differentiable w.r.t. the grid);
- the contextual loss against the augmented views (appendix A) is not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from backend.errors import InputError
from backend.events import CancelToken, Event, MeshUpdate, Progress
from backend.fields import DensityGridField, field_color_fn, field_grid
from backend.geometry import extract_mesh
from backend.losses.dsd import DSDConfig, ScorePrior, dsd_loss
from backend.render import normal_image, random_cameras, render

log = logging.getLogger(__name__)


@dataclass
class OptimizeConfig:
    """DSD optimisation schedule (ThemeStation appendix A unless noted)."""

    iterations: int = 5000  # appendix A: total optimisation steps
    resolution: int = 512  # appendix A: render resolution
    grid_resolution: int = 192  # appendix A: DMTet grid 192 -> DVGO grid of the same resolution
    n_samples: int = 128  # ray samples inside the unit cube
    views_per_step: int = 1
    elevation_range: tuple[float, float] = (0.0, 30.0)  # random viewpoints around the fixed render elevations
    lr_density: float = 0.05  # Adam on the raw density grid (DVGO uses 0.1 from scratch; we start from a shape)
    lr_color: float = 0.05  # Adam on the colour-grid logits
    tv_weight: float = 1e-3  # total variation of the colour grid (appendix A: "total variation loss")
    mesh_every: int = 250  # intermediate mesh every this many iterations (cheap, low resolution)
    preview_resolution: int = 64  # marching-cubes grid of the intermediate meshes
    target_faces: Optional[int] = 100_000  # final mesh decimation bound
    checkpoint: bool = True  # recompute render chunks in backward (bounds memory at 512 px x 128 samples)

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.resolution < 8 or self.grid_resolution < 8 or self.views_per_step < 1:
            raise InputError("DSD optimisation needs iterations >= 0, resolution >= 8, grid_resolution >= 8 and "
                             "views_per_step >= 1")
        if self.mesh_every < 1 or self.preview_resolution < 8:
            raise InputError("mesh_every must be >= 1 and preview_resolution >= 8")


def total_variation(grid: Tensor) -> Tensor:
    """Mean squared difference of neighbouring voxels of a (C, X, Y, Z) grid (Rudin et al. 1992, squared form)."""
    dx = (grid[:, 1:] - grid[:, :-1]).pow(2).mean()
    dy = (grid[:, :, 1:] - grid[:, :, :-1]).pow(2).mean()
    dz = (grid[:, :, :, 1:] - grid[:, :, :, :-1]).pow(2).mean()
    return dx + dy + dz


def surface_level(beta: float) -> float:
    """Density at the surface of an Eq. 9a field: ``sigmoid(0) / beta = 1 / (2 beta)``."""
    return 0.5 / float(beta)


def field_mesh(field, resolution: int, level: float, target_faces: Optional[int] = None, allow_empty: bool = False):
    """Marching cubes of the field's density at ``level`` with colours from the field (unit cube)."""
    dev = next(field.parameters()).device
    grid = field_grid(field, resolution, device=dev)
    return extract_mesh(grid, level=level, color_fn=field_color_fn(field, device=dev), inside="above",
                        target_faces=target_faces, allow_empty=allow_empty)


def optimize_dsd(
    field: DensityGridField,
    concept: ScorePrior,
    reference: ScorePrior,
    cfg: OptimizeConfig,
    dsd_cfg: DSDConfig,
    *,
    concept_conds: Optional[dict] = None,
    reference_conds: Optional[dict] = None,
    view_word=None,
    level: float = 10.0,
    name: str = "item",
    stage: str = "dsd",
    cancel: Optional[CancelToken] = None,
    generator: Optional[torch.Generator] = None,
    device: str = "cpu",
    world_scale: float = 1.0,
    normalization=None,
) -> Iterator[Event]:
    """Optimise ``field`` in place with DSD for ``cfg.iterations`` steps; yields Progress and preview meshes.

    ``concept_conds`` / ``reference_conds`` optionally map a view word ("front view", ...) to
    ``(cond, cond_normal)`` embeddings so each rendered view is scored with its view-dependent prompt; ``view_word``
    maps (azimuth, elevation) to such a word. Preview meshes are scaled by ``world_scale`` (see
    :func:`mesh_to_world`).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    color_params = list(field.color.parameters())
    opt = torch.optim.Adam(
        [{"params": [field.density], "lr": cfg.lr_density}, {"params": color_params, "lr": cfg.lr_color}],
        betas=(0.9, 0.99), eps=1e-15,
    )
    color_grid = getattr(field.color, "grid", None)
    res = int(cfg.resolution)
    for it in range(cfg.iterations):
        if cancel is not None:
            cancel.check()
        cams = random_cameras(cfg.views_per_step, elevation_range=tuple(cfg.elevation_range), generator=gen,
                              device=device)
        bg = torch.rand(cfg.views_per_step, 3, generator=gen).to(device)
        out = render(field, cams, res, res, n_samples=cfg.n_samples, background=bg, generator=gen, stratified=True,
                     normals="fd", checkpoint=cfg.checkpoint)
        rgb = out["rgb"].permute(0, 3, 1, 2)
        nrm = (normal_image(out["normal"], out["alpha"], background=0.0)
               + (1.0 - out["alpha"])[..., None] * bg[:, None, None, :]).clamp(0, 1).permute(0, 3, 1, 2)
        c_prior, r_prior = concept, reference
        if view_word is not None and (concept_conds or reference_conds):
            words = [view_word(float(a), float(e)) for a, e in zip(cams.azimuth.cpu(), cams.elevation.cpu())]
            if concept_conds:
                c_prior = ScorePrior(concept.bundle, torch.cat([concept_conds[w][0] for w in words]), concept.uncond,
                                     concept.adapter)
            if reference_conds:
                r_prior = ScorePrior(reference.bundle, torch.cat([reference_conds[w][0] for w in words]),
                                     reference.uncond, reference.adapter,
                                     torch.cat([reference_conds[w][1] for w in words]))
        res_dsd = dsd_loss(c_prior, r_prior, rgb, nrm, dsd_cfg, generator=gen)
        loss = res_dsd.loss
        if color_grid is not None and cfg.tv_weight > 0:
            loss = loss + cfg.tv_weight * total_variation(color_grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield Progress(stage, it + 1, cfg.iterations,
                       f"{name}: DSD {float(res_dsd.loss.detach()):.3f} (concept {float(res_dsd.concept.detach()):.3f}, "
                       f"reference {float(res_dsd.reference.detach()):.3f})")
        if (it + 1) % cfg.mesh_every == 0 and it + 1 < cfg.iterations:
            v, f, c = field_mesh(field, cfg.preview_resolution, level, allow_empty=True)
            if len(f):
                yield MeshUpdate(mesh_to_world(v, world_scale, normalization), f, c, final=False, name=name,
                                 info={"stage": stage, "iteration": it + 1})
    field.zero_grad(set_to_none=True)
    for p in field.parameters():
        p.requires_grad_(False)


def mesh_to_world(vertices: np.ndarray, scale: float, normalization=None) -> np.ndarray:
    """Scale unit-cube vertices to the exemplars' size (``scale`` = world units per unit-cube unit).

    ``normalization``: the fit that put the initial model into the optimised grid (``mesh_field``); its inverse
    first brings grid vertices back to the initial model's frame, so previews and the final mesh sit where the
    initial model was, at its size.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if normalization is not None:
        v = normalization.from_unit(v)
    return (v * float(scale)).astype(np.float32)
