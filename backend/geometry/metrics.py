"""Shape metrics: volumetric IoU, Chamfer distance and F-score exactly as ShapeClipper (paper 004) Eq. 8 defines.

Chamfer distance (Eq. 8, "average of accuracy and completeness", plain not squared Euclidean distances):

    d(S1, S2) = 1 / (2|S1|) sum_{x in S1} min_{y in S2} ||x - y||_2 + 1 / (2|S2|) sum_{y in S2} min_{x in S1} ||x - y||_2

F-score at d (FS@d): precision@d = fraction of predicted points with a ground-truth point within d, recall@d =
fraction of ground-truth points with a predicted point within d, FS@d = harmonic mean of the two (0 when both are
0). "Within d" is taken as distance <= d.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from backend.geometry.normalize import Normalization, fit_normalization
from backend.geometry.validate import check_mesh


def _points(p: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
        raise ValueError(f"{what} must be a non-empty (N, 3) point set, got {tuple(a.shape)}")
    return a


def _nn_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every point of ``a`` the distance to its nearest point of ``b``."""
    return cKDTree(b).query(a, k=1, workers=-1)[0]


def chamfer_distance(s1: np.ndarray, s2: np.ndarray) -> float:
    """ShapeClipper Eq. 8 Chamfer distance between point sets (N, 3) and (M, 3)."""
    a, b = _points(s1, "s1"), _points(s2, "s2")
    return float(0.5 * _nn_dist(a, b).mean() + 0.5 * _nn_dist(b, a).mean())


def precision_recall(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[float, float]:
    """precision@d and recall@d of ShapeClipper Sec. 5 (see module docstring)."""
    a, b = _points(pred, "pred"), _points(gt, "gt")
    return float((_nn_dist(a, b) <= threshold).mean()), float((_nn_dist(b, a) <= threshold).mean())


def f_score(pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """FS@d: harmonic mean of precision@d and recall@d."""
    p, r = precision_recall(pred, gt, threshold)
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def volumetric_iou(occ_a: np.ndarray, occ_b: np.ndarray) -> float:
    """|A and B| / |A or B| of two boolean occupancy grids (or point labels) of one shape; 1.0 if both empty."""
    a, b = np.asarray(occ_a), np.asarray(occ_b)
    if a.shape != b.shape:
        raise ValueError(f"occupancies must have one shape, got {a.shape} and {b.shape}")
    if a.dtype != bool or b.dtype != bool:
        raise ValueError("occupancies must be boolean arrays (e.g. sdf < 0 or density > level)")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniformly on the mesh surface (area-weighted), reproducible for ``seed``."""
    v, f = check_mesh(vertices, faces, require_extent=False)
    pts, _ = trimesh.sample.sample_surface(trimesh.Trimesh(v, f, process=False), int(count), seed=seed)
    return np.asarray(pts)


def mesh_iou(
    vertices_a: np.ndarray,
    faces_a: np.ndarray,
    vertices_b: np.ndarray,
    faces_b: np.ndarray,
    resolution: int = 64,
    normalization: Optional[Normalization] = None,
) -> float:
    """Volumetric IoU of two meshes voxelised on one grid (inside test of :func:`mesh_to_sdf`)."""
    from backend.geometry.sdf import mesh_to_sdf

    if normalization is None:
        both = np.concatenate([np.asarray(vertices_a, np.float64), np.asarray(vertices_b, np.float64)])
        normalization = fit_normalization(both, padding=max(0.05, 3.0 / (resolution - 1)))
    sa, _ = mesh_to_sdf(vertices_a, faces_a, resolution, normalization=normalization)
    sb, _ = mesh_to_sdf(vertices_b, faces_b, resolution, normalization=normalization)
    return volumetric_iou(sa < 0, sb < 0)
