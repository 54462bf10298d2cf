"""Per-asset gallery scores: theme consistency with the exemplars and diversity within the gallery.

ThemeStation (paper 003, Sec. 4) judges *unity* (theme consistency with the exemplars) and *diversity* (the assets
differ from each other). Stepstone measures both with embeddings:

- theme consistency (CLIP): cosine similarity between the mean CLIP image embedding of an asset's renders and
  the mean embedding of each exemplar's renders, averaged over exemplars;
- theme consistency (CISP, paper 002): the same in CISP's joint space with the 3D shape encoder ``E_c`` on
  occupancy voxels of the meshes (a 3D-aware similarity, CISP's motivation);
- diversity: ``1 - cosine`` between the asset's CLIP embedding and each other asset's, averaged (pairwise).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.fields.grid import sample_grid


@torch.no_grad()
def clip_embedding(clip: Any, images: Tensor) -> Tensor:
    """Unit-norm mean CLIP image embedding (D,) of renders (V, 3, H, W) in [0, 1]."""
    emb = clip.encode_image(images.float())
    return F.normalize(emb.float().mean(0), dim=-1).cpu()


def cell_center_occupancy(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> Tensor:
    """Occupancy (R, R, R) at cell centres ``-0.5 + (i + 0.5) / R`` (the voxel convention of the CISP data)."""
    from backend.geometry.sdf import mesh_to_sdf

    sdf, _ = mesh_to_sdf(vertices, faces, resolution=max(16, 2 * int(resolution)))
    u = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution - 0.5
    pts = torch.stack(torch.meshgrid(u, u, u, indexing="ij"), -1)
    vals = sample_grid(torch.from_numpy(sdf)[None], pts)[..., 0]
    return (vals < 0).float()


@torch.no_grad()
def cisp_embedding(cisp: Any, vertices: np.ndarray, faces: np.ndarray) -> Tensor:
    """Unit-norm CISP shape embedding (E,) of a mesh (voxelised at the model's resolution, 3D-DeiT encoder)."""
    r = int(cisp.config.voxel_res)
    occ = cell_center_occupancy(vertices, faces, r).to(next(cisp.parameters()).device)
    return F.normalize(cisp.encode_voxels(occ[None]).float()[0], dim=-1).cpu()


def theme_consistency(asset: Tensor, exemplars: Sequence[Tensor]) -> float:
    """Mean cosine similarity of an asset embedding to each exemplar embedding (higher = closer to the theme)."""
    if not len(exemplars):
        return float("nan")
    ex = torch.stack([F.normalize(e.float(), dim=-1) for e in exemplars])
    return float((ex @ F.normalize(asset.float(), dim=-1)).mean())


def diversity(asset: Tensor, others: Sequence[Tensor]) -> Optional[float]:
    """Mean ``1 - cosine`` between an asset embedding and every other asset's (None when there is no other)."""
    if not len(others):
        return None
    o = torch.stack([F.normalize(e.float(), dim=-1) for e in others])
    return float((1.0 - o @ F.normalize(asset.float(), dim=-1)).mean())


def pairwise_diversity(embeddings: Sequence[Tensor]) -> Optional[float]:
    """Mean ``1 - cosine`` over all pairs of a gallery (None for fewer than two assets)."""
    if len(embeddings) < 2:
        return None
    e = torch.stack([F.normalize(x.float(), dim=-1) for x in embeddings])
    sim = e @ e.t()
    n = len(e)
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return float((1.0 - off).mean())
