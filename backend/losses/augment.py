"""Image augmentations applied to renders before they go to CLIP (stylization and CLIP-guided optimisation).

- Background augmentation (ISS++ paper 000, Sec. 3.4.1, Fig. 7): the background behind the rendered object is a
  random RGB colour, drawn anew for every training iteration, so that a white or black object never melts into its
  background and CLIP sees the object's silhouette.
- Random crops and perspective (Text2Mesh, as an option): every view gets a random resized crop and, with
  probability ``perspective_p``, a random perspective warp, both differentiable (torchvision's tensor
  functionals, which use ``interpolate``/``grid_sample``).

Images are channels-first ``(B, 3, H, W)`` floats in [0, 1]; alpha is ``(B, 1, H, W)`` or ``(B, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["AugmentConfig", "random_background_color", "composite_background", "random_crop_perspective", "augment"]


@dataclass
class AugmentConfig:
    random_background: bool = True  # ISS++ Sec. 3.4.1: random RGB background per iteration
    per_view_background: bool = False  # the paper draws one colour per iteration; True draws one per view
    crops: bool = False  # Text2Mesh-style random resized crops (option)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction kept by a crop
    perspective_p: float = 0.8  # Text2Mesh: RandomPerspective(p=0.8, distortion_scale=0.5)
    distortion_scale: float = 0.5


def random_background_color(
    n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """``n`` random RGB colours in [0, 1], shape (n, 3) (ISS++ Sec. 3.4.1 background augmentation)."""
    return torch.rand(n, 3, device=device, generator=generator)


def _alpha_nchw(alpha: Tensor, like: Tensor) -> Tensor:
    if alpha.dim() == 3:
        alpha = alpha[:, None]
    elif alpha.dim() == 4 and alpha.shape[1] != 1 and alpha.shape[-1] == 1:
        alpha = alpha.permute(0, 3, 1, 2)
    if alpha.shape[0] != like.shape[0] or alpha.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not match images {tuple(like.shape)}")
    return alpha


def composite_background(rgb: Tensor, alpha: Tensor, color: Tensor, *, premultiplied: bool = True) -> Tensor:
    """Put the rendered object over a flat background: ``rgb + (1 - alpha) * color``.

    Args:
        rgb: (B, 3, H, W) render; ``premultiplied`` (default, the volume renderer's ``sum_i w_i c_i``) or straight.
        alpha: (B, 1, H, W) or (B, H, W) accumulated opacity ``sum_i w_i``.
        color: (3,) one colour for all views, or (B, 3) one per view.
    """
    a = _alpha_nchw(alpha, rgb)
    c = color.to(rgb)
    c = c.view(1, 3, 1, 1) if c.dim() == 1 else c.view(-1, 3, 1, 1)
    fg = rgb if premultiplied else rgb * a
    return fg + (1.0 - a) * c


def _perspective_points(h: int, w: int, scale: float, generator: torch.Generator | None) -> tuple[list, list]:
    """Start/end corner points of a random perspective warp (the sampling of torchvision's RandomPerspective)."""
    hh, hw = int(scale * h / 2), int(scale * w / 2)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, max(hi, lo) + 1, (1,), generator=generator).item())

    tl = [r(0, hw), r(0, hh)]
    tr = [w - 1 - r(0, hw), r(0, hh)]
    br = [w - 1 - r(0, hw), h - 1 - r(0, hh)]
    bl = [r(0, hw), h - 1 - r(0, hh)]
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    return start, [tl, tr, br, bl]


def random_crop_perspective(
    images: Tensor, cfg: AugmentConfig, *, generator: torch.Generator | None = None, fill: Tensor | None = None
) -> Tensor:
    """Per view: a random resized crop (area in ``cfg.crop_scale``, output size unchanged), then with probability
    ``cfg.perspective_p`` a random perspective warp; differentiable with respect to ``images`` (B, 3, H, W).

    ``fill`` (3,) colours the area a warp uncovers (the background colour, so no new edges appear).
    """
    b, _, h, w = images.shape
    fill_list = [float(x) for x in fill.tolist()] if fill is not None else [1.0, 1.0, 1.0]
    out = []
    lo, hi = cfg.crop_scale
    for i in range(b):
        img = images[i : i + 1]
        scale = lo + (hi - lo) * float(torch.rand(1, generator=generator).item())
        ch, cw = max(1, int(round(h * scale**0.5))), max(1, int(round(w * scale**0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator).item())
        img = TF.resized_crop(img, top, left, ch, cw, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=False)
        if cfg.perspective_p > 0 and float(torch.rand(1, generator=generator).item()) < cfg.perspective_p:
            start, end = _perspective_points(h, w, cfg.distortion_scale, generator)
            # warp (img - fill) with zero fill and add fill back: uncovered pixels get ``fill`` and the op stays
            # out-of-place (torchvision's own ``fill`` blends in place, which breaks autograd)
            f = img.new_tensor(fill_list).view(1, 3, 1, 1)
            img = TF.perspective(img - f, start, end, interpolation=InterpolationMode.BILINEAR, fill=None) + f
        out.append(img)
    return torch.cat(out, dim=0)


def augment(
    rgb: Tensor,
    alpha: Tensor,
    cfg: AugmentConfig,
    *,
    generator: torch.Generator | None = None,
    background: Tensor | None = None,
    premultiplied: bool = True,
) -> tuple[Tensor, Tensor]:
    """Background augmentation then (optionally) crops/perspective; returns ``(images, background colours (B,3))``.

    Without ``cfg.random_background`` the background is white (or ``background`` if given).
    """
    b = rgb.shape[0]
    if background is not None:
        bg = background.to(rgb).reshape(-1, 3).expand(b, 3)
    elif cfg.random_background:
        n = b if cfg.per_view_background else 1
        bg = random_background_color(n, generator=generator).to(rgb).expand(b, 3)
    else:
        bg = torch.ones(b, 3, dtype=rgb.dtype, device=rgb.device)
    img = composite_background(rgb, alpha, bg, premultiplied=premultiplied)
    if cfg.crops:
        if cfg.per_view_background:
            img = torch.cat(
                [random_crop_perspective(img[i : i + 1], cfg, generator=generator, fill=bg[i]) for i in range(b)]
            )
        else:
            img = random_crop_perspective(img, cfg, generator=generator, fill=bg[0])
    return img.clamp(0.0, 1.0), bg
