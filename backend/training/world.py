"""The procedural shape world of the starter profile (issue 9).

Thirteen object categories are composed from analytic primitives (:mod:`backend.training.sdf`) with parametric
variation. Each shape has a named main colour from :data:`PALETTE` and discrete attributes that a caption can name
(tall/short, wide/narrow, round/square, three/four legs, armrests, backrest, chimney ...); continuous parameters
vary inside each attribute value. Everything is deterministic from a seed: ``sample_shape(seed)`` always gives the
same shape. Shapes are Z-up, stand on the floor plane ``z = FLOOR`` and fit inside [-0.45, 0.45]^3.

The held-out split (:mod:`backend.training.split`) names category/colour and category/attribute combinations that
training data never contains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backend.errors import InputError
from backend.training.sdf import CompositeSDF, Part

FLOOR = -0.42

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.86, 0.14),
    "green": (0.14, 0.64, 0.22),
    "blue": (0.14, 0.30, 0.86),
    "purple": (0.56, 0.20, 0.76),
    "pink": (0.96, 0.52, 0.72),
    "brown": (0.50, 0.30, 0.14),
    "black": (0.09, 0.09, 0.10),
}
COLOURS = list(PALETTE)

DARK = (0.22, 0.22, 0.24)  # wheels, lamp poles, roofs
TRUNK = (0.36, 0.21, 0.09)

# category -> attribute name -> allowed values (the caption vocabulary of each category)
ATTRIBUTES: dict[str, dict[str, tuple]] = {
    "chair": {"height": ("tall", "short"), "armrests": (True, False)},
    "table": {"height": ("tall", "short"), "shape": ("round", "square"), "legs": (3, 4)},
    "stool": {"height": ("tall", "short"), "shape": ("round", "square"), "legs": (3, 4)},
    "bench": {"width": ("wide", "narrow"), "backrest": (True, False)},
    "lamp": {"height": ("tall", "short"), "shape": ("round", "square")},
    "shelf": {"height": ("tall", "short"), "width": ("wide", "narrow")},
    "mug": {"height": ("tall", "short"), "width": ("wide", "narrow")},
    "vase": {"height": ("tall", "short"), "shape": ("round", "square")},
    "bottle": {"height": ("tall", "short"), "width": ("wide", "narrow")},
    "car": {"height": ("tall", "short"), "width": ("wide", "narrow")},
    "airplane": {"width": ("wide", "narrow")},
    "tree": {"height": ("tall", "short"), "shape": ("round", "pointy")},
    "house": {"height": ("tall", "short"), "chimney": (True, False)},
}
CATEGORIES = list(ATTRIBUTES)


@dataclass
class ShapeSpec:
    """A shape of the world: its category, main colour, attributes, the seed that made it and its parts."""

    category: str
    colour: str
    attrs: dict
    seed: int
    parts: list[Part] = field(default_factory=list, repr=False)

    @property
    def sdf(self) -> CompositeSDF:
        return CompositeSDF(self.parts)

    def key(self) -> tuple:
        """Hashable identity of the discrete description (category, colour, sorted attributes)."""
        return (self.category, self.colour, tuple(sorted(self.attrs.items())))


# --------------------------------------------------------------------------------------------------- helpers
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _legs(n: int, rx: float, ry: float, z_top: float, radius: float, col, round_layout: bool) -> list[Part]:
    """``n`` vertical cylinder legs from the floor to ``z_top`` at the corners (square) or on a circle (round)."""
    parts = []
    hh = (z_top - FLOOR) / 2.0
    zc = FLOOR + hh
    if n == 4 and not round_layout:
        pos = [(sx * rx, sy * ry) for sx in (-1, 1) for sy in (-1, 1)]
    else:
        start = np.pi / 4 if n == 4 else np.pi / 2
        pos = [(rx * np.cos(start + 2 * np.pi * k / n), ry * np.sin(start + 2 * np.pi * k / n)) for k in range(n)]
    for x, y in pos:
        parts.append(Part("cylinder", dict(center=(x, y, zc), radius=radius, half_height=hh), col, "leg"))
    return parts


def _top(shape: str, half_x: float, half_y: float, z: float, thick: float, col, role="top") -> Part:
    if shape == "round":
        r = min(half_x, half_y)
        return Part("cylinder", dict(center=(0, 0, z), radius=r, half_height=thick), col, role)
    return Part("box", dict(center=(0, 0, z), half=(half_x, half_y, thick), radius=0.01), col, role)


# --------------------------------------------------------------------------------------------------- categories
def _chair(rng, a, col):
    seat_z = FLOOR + _u(rng, 0.28, 0.36)
    w = _u(rng, 0.15, 0.2)
    back_h = _u(rng, 0.38, 0.46) if a["height"] == "tall" else _u(rng, 0.14, 0.2)
    t = 0.025
    parts = [Part("box", dict(center=(0, 0, seat_z), half=(w, w, t), radius=0.008), col, "seat")]
    parts += _legs(4, w - 0.025, w - 0.025, seat_z - t, 0.018, col, False)
    parts.append(Part("box", dict(center=(-w + t, 0, seat_z + back_h / 2), half=(t, w, back_h / 2), radius=0.008),
                      col, "back"))
    if a["armrests"]:
        arm_z = seat_z + _u(rng, 0.1, 0.13)
        for s in (-1, 1):
            parts.append(Part("box", dict(center=(0, s * (w - 0.015), arm_z), half=(w, 0.018, 0.015)), col, "arm"))
            parts.append(Part("cylinder", dict(center=(w - 0.03, s * (w - 0.015), (seat_z + arm_z) / 2),
                                               radius=0.014, half_height=(arm_z - seat_z) / 2), col, "arm"))
    return parts


def _table(rng, a, col):
    top_z = FLOOR + (_u(rng, 0.5, 0.6) if a["height"] == "tall" else _u(rng, 0.22, 0.3))
    hx = _u(rng, 0.28, 0.4)
    hy = hx if a["shape"] == "round" else _u(rng, 0.2, 0.32)
    t = 0.025
    parts = [_top(a["shape"], hx, hy, top_z, t, col)]
    inset = 0.7 if a["shape"] == "round" else 0.85
    parts += _legs(a["legs"], hx * inset, hy * inset, top_z - t, 0.022, col, a["shape"] == "round")
    return parts


def _stool(rng, a, col):
    top_z = FLOOR + (_u(rng, 0.5, 0.62) if a["height"] == "tall" else _u(rng, 0.2, 0.28))
    r = _u(rng, 0.12, 0.17)
    t = 0.03
    parts = [_top(a["shape"], r, r, top_z, t, col, "seat")]
    parts += _legs(a["legs"], r * 0.8, r * 0.8, top_z - t, 0.02, col, a["shape"] == "round")
    return parts


def _bench(rng, a, col):
    half_len = _u(rng, 0.36, 0.44) if a["width"] == "wide" else _u(rng, 0.18, 0.24)
    depth = _u(rng, 0.1, 0.13)
    seat_z = FLOOR + _u(rng, 0.2, 0.26)
    t = 0.025
    parts = [Part("box", dict(center=(0, 0, seat_z), half=(depth, half_len, t), radius=0.008), col, "seat")]
    for sy in (-1, 1):
        parts.append(Part("box", dict(center=(0, sy * (half_len - 0.04), (seat_z - t + FLOOR) / 2),
                                      half=(depth * 0.9, 0.02, (seat_z - t - FLOOR) / 2)), col, "leg"))
    if a["backrest"]:
        bh = _u(rng, 0.14, 0.2)
        parts.append(Part("box", dict(center=(-depth + 0.02, 0, seat_z + t + bh / 2), half=(0.02, half_len, bh / 2),
                                      radius=0.006), col, "back"))
    return parts


def _lamp(rng, a, col):
    h = _u(rng, 0.62, 0.78) if a["height"] == "tall" else _u(rng, 0.3, 0.4)
    base_r = _u(rng, 0.1, 0.14)
    parts = [Part("cylinder", dict(center=(0, 0, FLOOR + 0.02), radius=base_r, half_height=0.02), DARK, "base")]
    top = FLOOR + h
    parts.append(Part("capsule", dict(a=(0, 0, FLOOR + 0.03), b=(0, 0, top - 0.05), radius=0.016), DARK, "pole"))
    sr = _u(rng, 0.11, 0.15)
    if a["shape"] == "round":
        parts.append(Part("sphere", dict(center=(0, 0, top), radius=sr), col, "shade"))
    else:
        parts.append(Part("box", dict(center=(0, 0, top), half=(sr, sr, sr * 0.9), radius=0.01), col, "shade"))
    return parts


def _shelf(rng, a, col):
    h = _u(rng, 0.72, 0.84) if a["height"] == "tall" else _u(rng, 0.34, 0.44)
    hw = _u(rng, 0.32, 0.4) if a["width"] == "wide" else _u(rng, 0.14, 0.19)
    d = _u(rng, 0.1, 0.14)
    t = 0.018
    zc = FLOOR + h / 2
    parts = [Part("box", dict(center=(0, s * hw, zc), half=(d, t, h / 2)), col, "side") for s in (-1, 1)]
    parts.append(Part("box", dict(center=(-d + t, 0, zc), half=(t, hw, h / 2)), col, "back"))
    n = max(2, int(round(h / 0.2)))
    for k in range(n + 1):
        z = FLOOR + t + k * (h - 2 * t) / n
        parts.append(Part("box", dict(center=(0, 0, z), half=(d, hw, t)), col, "board"))
    return parts


def _mug(rng, a, col):
    h = _u(rng, 0.42, 0.52) if a["height"] == "tall" else _u(rng, 0.22, 0.3)
    r = _u(rng, 0.2, 0.25) if a["width"] == "wide" else _u(rng, 0.11, 0.14)
    zc = FLOOR + h / 2
    parts = [Part("cylinder", dict(center=(0, 0, zc), radius=r, half_height=h / 2), col, "body")]
    parts.append(Part("cylinder", dict(center=(0, 0, zc + 0.04), radius=r - 0.025, half_height=h / 2), col, "hole",
                      subtract=True))
    hr = min(0.3 * h, 0.12)
    parts.append(Part("torus", dict(center=(r, 0, zc), major=hr, minor=0.022, axis="y"), col, "handle"))
    return parts


def _vase(rng, a, col):
    h = _u(rng, 0.6, 0.8) if a["height"] == "tall" else _u(rng, 0.3, 0.4)
    w = _u(rng, 0.13, 0.2)
    body_h = h * 0.7
    zb = FLOOR + body_h / 2
    if a["shape"] == "round":
        body = Part("ellipsoid", dict(center=(0, 0, zb), radii=(w, w, body_h / 2)), col, "body")
    else:
        body = Part("box", dict(center=(0, 0, zb), half=(w * 0.85, w * 0.85, body_h / 2), radius=0.02), col, "body")
    neck_r = w * _u(rng, 0.35, 0.5)
    parts = [body, Part("cone", dict(center=(0, 0, FLOOR + body_h + (h - body_h) / 2 - 0.03), r_bottom=neck_r,
                                     r_top=neck_r * 1.5, half_height=(h - body_h) / 2 + 0.03), col, "neck")]
    return parts


def _bottle(rng, a, col):
    h = _u(rng, 0.7, 0.84) if a["height"] == "tall" else _u(rng, 0.36, 0.46)
    r = _u(rng, 0.15, 0.2) if a["width"] == "wide" else _u(rng, 0.07, 0.1)
    body_h = h * 0.6
    parts = [Part("cylinder", dict(center=(0, 0, FLOOR + body_h / 2), radius=r, half_height=body_h / 2), col, "body")]
    sh = h * 0.15
    parts.append(Part("cone", dict(center=(0, 0, FLOOR + body_h + sh / 2), r_bottom=r, r_top=0.035,
                                   half_height=sh / 2), col, "shoulder"))
    nh = h - body_h - sh
    parts.append(Part("cylinder", dict(center=(0, 0, FLOOR + body_h + sh + nh / 2), radius=0.035,
                                       half_height=nh / 2), col, "neck"))
    return parts


def _car(rng, a, col):
    half_len = _u(rng, 0.36, 0.43)
    hw = _u(rng, 0.19, 0.23) if a["width"] == "wide" else _u(rng, 0.12, 0.15)
    wheel_r = _u(rng, 0.06, 0.075)
    body_h = _u(rng, 0.09, 0.12)
    z_body = FLOOR + wheel_r + body_h / 2
    parts = [Part("box", dict(center=(0, 0, z_body), half=(half_len, hw, body_h / 2), radius=0.03), col, "body")]
    cab_h = _u(rng, 0.14, 0.2) if a["height"] == "tall" else _u(rng, 0.05, 0.08)
    cab_len = half_len * (0.75 if a["height"] == "tall" else 0.5)
    parts.append(Part("box", dict(center=(-0.04, 0, z_body + body_h / 2 + cab_h / 2),
                                  half=(cab_len, hw * 0.9, cab_h / 2), radius=0.03), col, "cabin"))
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(Part("cylinder", dict(center=(sx * half_len * 0.65, sy * hw, FLOOR + wheel_r),
                                               radius=wheel_r, half_height=0.03, axis="y"), DARK, "wheel"))
    return parts


def _airplane(rng, a, col):
    L = _u(rng, 0.38, 0.44)
    fr = _u(rng, 0.045, 0.06)
    z = _u(rng, -0.05, 0.05)
    parts = [Part("capsule", dict(a=(-L, 0, z), b=(L, 0, z), radius=fr), col, "fuselage")]
    span = _u(rng, 0.38, 0.44) if a["width"] == "wide" else _u(rng, 0.2, 0.26)
    chord = _u(rng, 0.08, 0.12)
    parts.append(Part("box", dict(center=(0.02, 0, z), half=(chord, span, 0.012), radius=0.005), col, "wing"))
    parts.append(Part("box", dict(center=(-L + 0.04, 0, z), half=(0.04, span * 0.35, 0.01)), col, "tail"))
    parts.append(Part("box", dict(center=(-L + 0.05, 0, z + 0.07), half=(0.04, 0.01, 0.07)), col, "fin"))
    return parts


def _tree(rng, a, col):
    h = _u(rng, 0.74, 0.84) if a["height"] == "tall" else _u(rng, 0.4, 0.5)
    trunk_h = h * _u(rng, 0.3, 0.4)
    parts = [Part("cylinder", dict(center=(0, 0, FLOOR + trunk_h / 2), radius=_u(rng, 0.03, 0.045),
                                   half_height=trunk_h / 2 + 0.02), TRUNK, "trunk")]
    crown_h = h - trunk_h
    cr = _u(rng, 0.16, 0.22)
    if a["shape"] == "round":
        parts.append(Part("ellipsoid", dict(center=(0, 0, FLOOR + trunk_h + crown_h / 2), radii=(cr, cr, crown_h / 2)),
                          col, "crown"))
    else:
        parts.append(Part("cone", dict(center=(0, 0, FLOOR + trunk_h + crown_h / 2), r_bottom=cr, r_top=0.005,
                                       half_height=crown_h / 2), col, "crown"))
    return parts


def _house(rng, a, col):
    hx = _u(rng, 0.25, 0.33)
    hy = _u(rng, 0.2, 0.27)
    wall_h = _u(rng, 0.42, 0.52) if a["height"] == "tall" else _u(rng, 0.2, 0.26)
    zc = FLOOR + wall_h / 2
    parts = [Part("box", dict(center=(0, 0, zc), half=(hx, hy, wall_h / 2)), col, "walls")]
    roof_h = _u(rng, 0.14, 0.2)
    # a pyramid-like roof: a square frustum approximated by a four-sided cone (capped cone with tiny top)
    parts.append(Part("cone", dict(center=(0, 0, FLOOR + wall_h + roof_h / 2), r_bottom=max(hx, hy) * 1.05,
                                   r_top=0.01, half_height=roof_h / 2), DARK, "roof"))
    if a["chimney"]:
        parts.append(Part("box", dict(center=(hx * 0.5, hy * 0.3, FLOOR + wall_h + roof_h * 0.6),
                                      half=(0.035, 0.035, roof_h * 0.6)), DARK, "chimney"))
    return parts


GENERATORS: dict[str, Callable] = {
    "chair": _chair,
    "table": _table,
    "stool": _stool,
    "bench": _bench,
    "lamp": _lamp,
    "shelf": _shelf,
    "mug": _mug,
    "vase": _vase,
    "bottle": _bottle,
    "car": _car,
    "airplane": _airplane,
    "tree": _tree,
    "house": _house,
}


def validate_description(category: str, colour: str, attrs: dict) -> None:
    """Raise :class:`InputError` unless the category, colour and attributes exist in the world."""
    if category not in ATTRIBUTES:
        raise InputError(f"unknown category {category!r}; the starter world has: {', '.join(CATEGORIES)}")
    if colour not in PALETTE:
        raise InputError(f"unknown colour {colour!r}; the starter palette has: {', '.join(COLOURS)}")
    space = ATTRIBUTES[category]
    for k, v in attrs.items():
        if k not in space:
            raise InputError(f"{category} has no attribute {k!r}; it has: {', '.join(space)}")
        if v not in space[k]:
            raise InputError(f"{category} attribute {k!r} must be one of {space[k]}, got {v!r}")
    missing = set(space) - set(attrs)
    if missing:
        raise InputError(f"{category} needs values for: {', '.join(sorted(missing))}")


def build_shape(category: str, colour: str, attrs: dict, seed: int = 0) -> ShapeSpec:
    """The shape with this description; ``seed`` draws the continuous parameters (sizes, proportions)."""
    validate_description(category, colour, attrs)
    rng = np.random.default_rng([seed, CATEGORIES.index(category), 7919])
    parts = GENERATORS[category](rng, dict(attrs), PALETTE[colour])
    return ShapeSpec(category, colour, dict(attrs), seed, parts)


def sample_description(rng: np.random.Generator) -> tuple[str, str, dict]:
    """Draw a category, a colour and one value per attribute uniformly."""
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    attrs = {k: vals[int(rng.integers(len(vals)))] for k, vals in ATTRIBUTES[category].items()}
    return category, colour, attrs


def all_descriptions() -> list[tuple[str, str, dict]]:
    """Every discrete (category, colour, attributes) combination of the world, in a fixed order."""
    import itertools

    out = []
    for cat in CATEGORIES:
        names = list(ATTRIBUTES[cat])
        for colour in COLOURS:
            for values in itertools.product(*(ATTRIBUTES[cat][n] for n in names)):
                out.append((cat, colour, dict(zip(names, values))))
    return out
