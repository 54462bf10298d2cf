"""Normalisation of a mesh into the renderer's unit cube, keeping the transform so results map back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.errors import InputError


@dataclass(frozen=True)
class Normalization:
    """``unit = (x - center) * scale`` and back; ``center`` (3,) and ``scale`` in the mesh's own units."""

    center: np.ndarray
    scale: float

    def to_unit(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.center) * self.scale

    def from_unit(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + self.center

    def matrix_from_unit(self) -> np.ndarray:
        """4x4 matrix taking unit-cube points back to the mesh's space (e.g. to set a Blender object's matrix)."""
        m = np.eye(4)
        m[:3, :3] /= self.scale
        m[:3, 3] = self.center
        return m

    def to_dict(self) -> dict:
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(np.asarray(d["center"], dtype=np.float64), float(d["scale"]))


def fit_normalization(vertices: np.ndarray, padding: float = 0.05) -> Normalization:
    """The transform that centres the bounding box at the origin and scales its longest side to ``1 - 2 padding``."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise InputError(f"vertices must have shape (N, 3) with N > 0, got {tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise InputError("mesh has NaN or infinite vertex coordinates; fix or delete them")
    if not 0.0 <= padding < 0.5:
        raise ValueError(f"padding must be in [0, 0.5), got {padding}")
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if not extent > 1e-8:
        raise InputError("mesh has zero size (all its vertices are at one point); scale it up or pick another object")
    return Normalization(center=(lo + hi) * 0.5, scale=(1.0 - 2.0 * padding) / extent)


def normalize_mesh(vertices: np.ndarray, padding: float = 0.05) -> tuple[np.ndarray, Normalization]:
    """Vertices moved into the unit cube [-0.5 + padding, 0.5 - padding]^3 (aspect kept) and the transform."""
    norm = fit_normalization(vertices, padding)
    return norm.to_unit(vertices), norm
