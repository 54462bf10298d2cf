"""Fields: density grids, SDF-derived density and the latent-conditioned implicit decoder.

A *field* is any object with ``query(points (..., 3)) -> (sigma (...), rgb (..., 3))`` in the unit cube
[-0.5, 0.5]^3; fields may also offer ``sigma(points)`` (density only, used for finite-difference normals).
"""

from backend.fields.adapters import DecoderField, SphereField
from backend.fields.decoder import ImplicitDecoder, positional_encoding
from backend.fields.grid import (
    ColorGrid,
    ColorMLP,
    DensityGridField,
    SDFGridField,
    density_shift,
    grid_points,
    sample_grid,
)
from backend.fields.sampling import field_color_fn, field_grid
from backend.fields.sdf import DEFAULT_BETA, density_to_raw, inverse_softplus, sdf_to_density, sdf_to_raw_density

__all__ = [
    "DEFAULT_BETA",
    "ColorGrid",
    "ColorMLP",
    "DecoderField",
    "DensityGridField",
    "ImplicitDecoder",
    "SDFGridField",
    "SphereField",
    "density_shift",
    "field_color_fn",
    "field_grid",
    "density_to_raw",
    "grid_points",
    "inverse_softplus",
    "positional_encoding",
    "sample_grid",
    "sdf_to_density",
    "sdf_to_raw_density",
]
