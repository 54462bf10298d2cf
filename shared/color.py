"""Colour transfer functions shared by both sides: the wire carries sRGB, Blender and glTF store linear.

Vertex colours travel as sRGB (uint8, or float in [0, 1]); Blender's FLOAT_COLOR attributes and glTF's
``COLOR_0`` hold linear values. Both the add-on's streaming path and the backend's GLB writer/reader convert with
these functions (IEC 61966-2-1), so a result has the same colour whichever way it reaches Blender.
Alpha is never gamma-encoded, only rescaled.
"""

from __future__ import annotations

import numpy as np


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted (IEC 61966-2-1), elementwise on values in [0, 1]."""
    c = np.asarray(c, dtype=np.float32)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function (IEC 61966-2-1), elementwise on linear values in [0, 1] (clipped)."""
    c = np.clip(np.nan_to_num(np.asarray(c, dtype=np.float64)), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055).astype(np.float32)


_SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)


def colors_to_linear_rgba(colors: np.ndarray) -> np.ndarray:
    """uint8 or float (N, 3|4) sRGB colours (the wire's convention) -> linear float32 (N*4,), alpha 1 if absent.

    Alpha is not gamma-encoded, so it is only rescaled.
    """
    c = np.asarray(colors)
    n, k = c.shape[0], c.shape[1]
    out = np.ones((n, 4), dtype=np.float32)
    if c.dtype.kind == "f":
        cf = np.clip(np.nan_to_num(c), 0.0, 1.0)
        out[:, :3] = srgb_to_linear(cf[:, :3])
        if k == 4:
            out[:, 3] = cf[:, 3]
    else:
        out[:, :3] = _SRGB8_TO_LINEAR[c[:, :3]]
        if k == 4:
            out[:, 3] = c[:, 3].astype(np.float32) * np.float32(1.0 / 255.0)
    return out.reshape(-1)


def linear_rgba_to_srgb8(linear: np.ndarray) -> np.ndarray:
    """Linear float (N, 3|4) in [0, 1] -> sRGB uint8 RGBA (N, 4) (alpha 255 if absent), rounded to nearest."""
    c = np.asarray(linear, dtype=np.float64)
    n, k = c.shape[0], c.shape[1]
    out = np.full((n, 4), 255, dtype=np.uint8)
    out[:, :3] = np.floor(linear_to_srgb(c[:, :3]).astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    if k == 4:
        out[:, 3] = np.floor(np.clip(np.nan_to_num(c[:, 3]), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out
