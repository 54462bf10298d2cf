"""Analytic signed distance functions of primitives and their union, for the procedural shape world.

Every function takes points ``p`` of shape ``(..., 3)`` as a numpy array or a torch tensor and returns the signed
distance ``(...)`` in the same library (negative inside), so the same shape definition gives exact numpy occupancy
and voxel grids and a torch field for the project's renderer. Formulas are the standard exact (or, for the capped
cone, exact-up-to-rounding) SDFs of Inigo Quilez's primitive list. The world is Z-up, inside the unit cube
[-0.5, 0.5]^3 that the renderer uses as world space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

AXES = {"x": 0, "y": 1, "z": 2}


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def _relu(a):
    return a.clamp(min=0) if _is_torch(a) else np.maximum(a, 0.0)


def _min0(a):
    return a.clamp(max=0) if _is_torch(a) else np.minimum(a, 0.0)


def _length(v):
    return (v * v).sum(-1).sqrt() if _is_torch(v) else np.sqrt((v * v).sum(-1))


def _abs(a):
    return a.abs() if _is_torch(a) else np.abs(a)


def _max2(a, b):
    if _is_torch(a):
        import torch

        return torch.maximum(a, b)
    return np.maximum(a, b)


def _min2(a, b):
    if _is_torch(a):
        import torch

        return torch.minimum(a, b)
    return np.minimum(a, b)


def _stack(xs):
    if _is_torch(xs[0]):
        import torch

        return torch.stack(xs, -1)
    return np.stack(xs, -1)


def _const(like, values):
    """A constant vector in the library and dtype of ``like``."""
    if _is_torch(like):
        import torch

        return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=like.dtype)


def sd_box(p, center: Sequence[float], half: Sequence[float], radius: float = 0.0):
    """Axis-aligned (optionally rounded) box: ``|max(q,0)| + min(max(q.x,q.y,q.z),0) - r``, ``q = |p-c| - h + r``."""
    q = _abs(p - _const(p, center)) - _const(p, half) + radius
    outside = _length(_relu(q))
    inside = _min0(_max2(q[..., 0], _max2(q[..., 1], q[..., 2])))
    return outside + inside - radius


def sd_sphere(p, center: Sequence[float], radius: float):
    return _length(p - _const(p, center)) - radius


def _split_axis(p, center, axis: str):
    d = p - _const(p, center)
    a = AXES[axis]
    others = [i for i in range(3) if i != a]
    return d[..., a], _stack([d[..., others[0]], d[..., others[1]]])


def sd_cylinder(p, center: Sequence[float], radius: float, half_height: float, axis: str = "z"):
    """Capped cylinder along ``axis``: exact SDF from the radial and axial distances."""
    h, r2 = _split_axis(p, center, axis)
    dr = _length(r2) - radius
    dh = _abs(h) - half_height
    d = _stack([dr, dh])
    return _min0(_max2(dr, dh)) + _length(_relu(d))


def sd_capped_cone(p, center: Sequence[float], r_bottom: float, r_top: float, half_height: float, axis: str = "z"):
    """Capped cone (frustum) along ``axis`` with radius ``r_bottom`` at -h and ``r_top`` at +h (IQ's exact SDF)."""
    y, r2 = _split_axis(p, center, axis)
    x = _length(r2)
    h = half_height
    k2x, k2y = r_top - r_bottom, 2.0 * h
    ca_r = _min2(x, _where_lt(y, 0.0, x * 0 + r_bottom, x * 0 + r_top))
    cax = x - ca_r
    cay = _abs(y) - h
    k2dot = k2x * k2x + k2y * k2y
    t = ((r_top - x) * k2x + (h - y) * k2y) / k2dot
    t = _clip01(t)
    cbx = x - r_top + k2x * t
    cby = y - h + k2y * t
    s = _where_both_neg(cbx, cay)
    d2 = _min2(cax * cax + cay * cay, cbx * cbx + cby * cby)
    return s * d2.sqrt() if _is_torch(d2) else s * np.sqrt(d2)


def _where_lt(a, v, x, y):
    if _is_torch(a):
        import torch

        return torch.where(a < v, x, y)
    return np.where(a < v, x, y)


def _clip01(a):
    return a.clamp(0.0, 1.0) if _is_torch(a) else np.clip(a, 0.0, 1.0)


def _where_both_neg(a, b):
    if _is_torch(a):
        import torch

        return torch.where((a < 0) & (b < 0), -torch.ones_like(a), torch.ones_like(a))
    return np.where((a < 0) & (b < 0), -1.0, 1.0).astype(a.dtype)


def sd_torus(p, center: Sequence[float], major: float, minor: float, axis: str = "z"):
    """Torus around ``axis`` (the axis pierces the hole)."""
    h, r2 = _split_axis(p, center, axis)
    q = _stack([_length(r2) - major, h])
    return _length(q) - minor


def sd_capsule(p, a: Sequence[float], b: Sequence[float], radius: float):
    """Capsule: distance to the segment ab minus the radius."""
    av, bv = _const(p, a), _const(p, b)
    pa, ba = p - av, bv - av
    t = (pa * ba).sum(-1) / float(np.dot(np.asarray(b) - np.asarray(a), np.asarray(b) - np.asarray(a)) + 1e-12)
    t = _clip01(t)
    return _length(pa - ba * t[..., None]) - radius


def sd_ellipsoid(p, center: Sequence[float], radii: Sequence[float]):
    """Ellipsoid (IQ's bound: ``k0 (k0 - 1) / k1``), exact sign, close distance near the surface."""
    d = p - _const(p, center)
    r = _const(p, radii)
    k0 = _length(d / r)
    k1 = _length(d / (r * r))
    return k0 * (k0 - 1.0) / (k1 + 1e-9)


PRIMITIVES = {
    "box": sd_box,
    "sphere": sd_sphere,
    "cylinder": sd_cylinder,
    "cone": sd_capped_cone,
    "torus": sd_torus,
    "capsule": sd_capsule,
    "ellipsoid": sd_ellipsoid,
}


@dataclass
class Part:
    """One primitive of a shape with its colour (RGB in [0, 1]) and the name of its role (seat, leg, ...)."""

    kind: str
    params: dict
    color: tuple[float, float, float]
    role: str = "body"
    subtract: bool = False  # carve this primitive out of the union of the earlier parts

    def sdf(self, p):
        return PRIMITIVES[self.kind](p, **self.params)


@dataclass
class CompositeSDF:
    """Union of parts (with optional carved parts); colour of a point is the colour of its nearest solid part."""

    parts: list[Part] = field(default_factory=list)

    def sdf_and_part(self, p):
        """Signed distance ``(...)`` and the index of the nearest solid part ``(...)`` for points ``(..., 3)``."""
        solid = [(i, part) for i, part in enumerate(self.parts) if not part.subtract]
        if not solid:
            raise ValueError("a shape needs at least one solid part")
        ds = [part.sdf(p) for _, part in solid]
        if _is_torch(p):
            import torch

            stack = torch.stack(ds, -1)
            d, idx = stack.min(-1)
        else:
            stack = np.stack(ds, -1)
            idx = stack.argmin(-1)
            d = np.take_along_axis(stack, idx[..., None], -1)[..., 0]
        for part in self.parts:
            if part.subtract:
                d = _max2(d, -part.sdf(p))
        ids = np.asarray([i for i, _ in solid])
        if _is_torch(p):
            import torch

            idx = torch.as_tensor(ids, device=p.device)[idx]
        else:
            idx = ids[idx]
        return d, idx

    def sdf(self, p):
        return self.sdf_and_part(p)[0]

    def color(self, p):
        """RGB ``(..., 3)`` in [0, 1]: the colour of the nearest solid part."""
        _, idx = self.sdf_and_part(p)
        table = np.asarray([part.color for part in self.parts], dtype=np.float32)
        if _is_torch(p):
            import torch

            return torch.as_tensor(table, dtype=p.dtype, device=p.device)[idx]
        return table[idx].astype(p.dtype if p.dtype.kind == "f" else np.float32)
