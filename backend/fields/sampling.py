"""Evaluate fields on grids and points (for marching cubes and vertex colours), in chunks, without gradients."""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from backend.events import checkpoint as cancel_checkpoint
from backend.fields.grid import grid_points


@torch.no_grad()
def field_grid(field, resolution: int, chunk: int = 262_144, device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Density ``sigma`` of ``field`` at the samples of a resolution-R unit-cube grid -> numpy (R, R, R).

    The result goes straight to :func:`backend.geometry.extract_mesh` (``inside="above"``).
    """
    pts = grid_points(resolution, device=device).reshape(-1, 3)
    fn = getattr(field, "sigma", None)
    out = []
    for s in range(0, len(pts), chunk):
        cancel_checkpoint()
        p = pts[s : s + chunk]
        out.append((fn(p) if callable(fn) else field.query(p)[0]).float().cpu())
    return torch.cat(out).reshape(resolution, resolution, resolution).numpy()


def field_color_fn(field, chunk: int = 65_536, device: Union[str, torch.device] = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A ``color_fn`` for :func:`backend.geometry.extract_mesh`: the field's RGB at mesh vertices (float [0, 1])."""

    @torch.no_grad()
    def color_fn(points: np.ndarray) -> np.ndarray:
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32), device=device)
        out = []
        for s in range(0, len(pts), chunk):
            cancel_checkpoint()
            out.append(field.query(pts[s : s + chunk])[1].float().cpu())
        return torch.cat(out).clamp(0, 1).numpy() if out else np.zeros((0, 3), np.float32)

    return color_fn
