"""A level-set grid evaluated only where the surface can be: coarse-to-fine, exact near the iso-surface.

Marching cubes reads a grid's values only in cells whose corners straddle the level; everywhere else it only needs
the side (inside / outside). Decoding an implicit decoder densely at 128^3 costs 2.1 M decoder queries, nearly all
of them far from the surface. Occupancy Networks (Mescheder et al. 2019, Sec. 3.3 "Multiresolution IsoSurface
Extraction", MISE), which DVR and so ISS inherit, therefore evaluate a coarse grid first and refine only the
voxels where the occupancy changes sign. :func:`sparse_level_grid` does the same on Stepstone's grid convention
(:mod:`backend.fields.grid`: R samples per axis, the first and last on the cube's faces), with one difference to
MISE: the fine grid is not a dyadic refinement of the coarse one (127 is not a power of two), so the coarse values
are trilinearly interpolated to the fine grid as an *estimate*, and then

1. every fine sample in or next to a cell where the estimate straddles the level is evaluated exactly, and
2. while some fine cell straddles the level (with exact and estimated values mixed) and has an estimated corner,
   that cell's corners and their neighbours are evaluated exactly too (a flood fill along the surface).

When it stops, every cell that marching cubes turns into triangles has eight exact corners, so the mesh equals the
dense grid's mesh (up to float noise of the batched matrix products). What it can miss, like MISE, is a part that
the coarse grid does not see at all and that touches no exactly evaluated sample: a blob thinner than the coarse
spacing (``coarse_step`` fine voxels, 3 by default: with 4, a free 45-voxel blob of a random latent was missed,
which marching cubes then drops anyway as a part under 2% of the largest) floating free of the rest. Parts connected to the seen surface (a thin leg
under a seat) are followed by step 2.

The cube's outside (marching cubes pads the grid with "outside") counts as outside here, so samples on the faces
that are inside are exact as well.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.fields.grid import grid_points


def _pair(m: Tensor, op) -> Tensor:
    """``op`` of neighbouring samples along each of the three axes (a 2x2x2 window, separably): size - 1 per axis."""
    m = op(m[:-1], m[1:])
    m = op(m[:, :-1], m[:, 1:])
    return op(m[:, :, :-1], m[:, :, 1:])


def _pad(m: Tensor) -> Tensor:
    return F.pad(m[None, None].to(torch.uint8), (1, 1, 1, 1, 1, 1), value=0)[0, 0].bool()


def _cells_mixed(inside: Tensor) -> Tensor:
    """(R+1)^3 cells of the grid padded by one outside layer: True where the 8 corners are not all on one side."""
    s = _pad(inside)
    return _pair(s, torch.logical_or) & ~_pair(s, torch.logical_and)


def _cells_any(mask: Tensor) -> Tensor:
    """(R+1)^3 cells of the padded grid: True where any corner is set (padding counts as unset)."""
    return _pair(_pad(mask), torch.logical_or)


def _dilate(m: Tensor, d: int) -> Tensor:
    """Grow a boolean volume by ``d`` samples in every direction (a (2d+1)^3 box, separably)."""
    for axis in range(3):
        out = m.clone()
        n = m.shape[axis]
        for k in range(1, min(d, n - 1) + 1):
            out.narrow(axis, k, n - k).logical_or_(m.narrow(axis, 0, n - k))
            out.narrow(axis, 0, n - k).logical_or_(m.narrow(axis, k, n - k))
        m = out
    return m


def _corners(cells: Tensor, dilate: int) -> Tensor:
    """R^3 samples that are a corner of a marked padded cell, grown by ``dilate`` samples in every direction."""
    pts = _pair(cells, torch.logical_or)  # real sample j is a corner of padded cells j and j + 1
    return _dilate(pts, dilate) if dilate > 0 else pts


@torch.no_grad()
def sparse_level_grid(fn: Callable[[Tensor], Tensor], resolution: int, level: float = 0.0, coarse_step: int = 3,
                      margin: int = 1, device="cpu", chunk: int = 16384,
                      stats: Optional[dict] = None) -> Tensor:
    """Values of ``fn`` on the resolution-R grid, exact wherever marching cubes at ``level`` reads them.

    Args:
        fn: points (N, 3) on ``device`` -> values (N,) (e.g. occupancy logits); "inside" is ``value > level``.
        resolution: R samples per axis (:func:`backend.fields.grid.grid_points`).
        level: the iso-value.
        coarse_step: the coarse grid has about one sample every ``coarse_step`` fine voxels.
        margin: fine samples added around every straddling cell (beyond its corners).
        device: where ``fn`` runs.
        chunk: points per call of ``fn`` (small chunks keep the decoder's temporaries in the allocator's cache
            instead of mapping and unmapping fresh pages for every call).
        stats: if given, receives ``evaluated`` (exact samples), ``dense`` (R^3) and ``rounds``.

    Returns:
        float32 tensor (R, R, R) on the CPU: exact values near the surface, trilinear estimates elsewhere (on the
        right side of the level).
    """
    r = int(resolution)
    if r < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")

    def run(points: Tensor) -> Tensor:
        out = [fn(points[s:s + chunk].to(device)).reshape(-1).float().cpu() for s in range(0, points.shape[0], chunk)]
        return torch.cat(out) if out else torch.zeros(0)

    rc = max(17, (r - 1) // max(1, int(coarse_step)) + 1)
    if rc * 2 >= r:  # small grids (previews at 32^3) are cheap: dense
        values = run(grid_points(r).reshape(-1, 3)).reshape(r, r, r)
        if stats is not None:
            stats.update(evaluated=r ** 3, dense=r ** 3, rounds=0)
        return values
    coarse = run(grid_points(rc).reshape(-1, 3)).reshape(rc, rc, rc)
    values = F.interpolate(coarse[None, None], size=(r, r, r), mode="trilinear", align_corners=True)[0, 0]
    exact = torch.zeros(r, r, r, dtype=torch.bool)
    pts = grid_points(r)
    # Seed: every cell the estimate says straddles the level, its corners and a margin (a coarse cell's worth:
    # the estimate's crossing may sit up to one coarse cell away from the true one).
    todo = _corners(_cells_mixed(values > level), margin + int(coarse_step))
    evaluated, rounds = 0, 0
    while True:
        todo &= ~exact
        n = int(todo.sum())
        if n == 0:
            break
        rounds += 1
        evaluated += n
        values[todo] = run(pts[todo])
        exact |= todo
        # cells that straddle the level with an estimated corner: evaluate their corners (and a margin) too
        grow = _cells_mixed(values > level) & _cells_any(~exact)
        todo = _corners(grow, margin)
    if stats is not None:
        stats.update(evaluated=evaluated + rc ** 3, dense=r ** 3, rounds=rounds)
    return values
