"""DVGO-style voxel grids (Dream3D appendix D.1, Eq. 6a-6c and Eq. 8) and trilinear sampling.

Convention used by every grid in Stepstone: an array ``grid[..., ix, iy, iz]`` of resolution R samples the unit
cube [-0.5, 0.5]^3 with the first and last samples *on* the faces of the cube: the sample ``(ix, iy, iz)`` sits at
``-0.5 + (ix, iy, iz) / (R - 1)``; voxel size ``s = 1 / (R - 1)``. This is ``grid_sample(align_corners=True)`` and
also what :func:`backend.geometry.extract_mesh` assumes, so a grid goes to marching cubes without resampling.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.fields.decoder import positional_encoding
from backend.fields.sdf import DEFAULT_BETA, sdf_to_raw_density

BBOX_MIN = -0.5
BBOX_MAX = 0.5


def sample_grid(grid: Tensor, points: Tensor) -> Tensor:
    """Trilinear interpolation (Dream3D Eq. 6a ``interp``) of ``grid`` (C, R, R, R) at ``points`` (..., 3).

    Returns (..., C). Points outside the cube take the value on the cube's faces (border padding).
    """
    if grid.ndim != 4:
        raise ValueError(f"grid must have shape (C, X, Y, Z), got {tuple(grid.shape)}")
    lead = points.shape[:-1]
    pts = points.reshape(1, 1, 1, -1, 3).to(grid.dtype)
    # world [-0.5, 0.5] -> [-1, 1]; grid_sample wants (x, y, z) = (W, H, D) = our (iz, iy, ix): flip the axes.
    coords = (pts - BBOX_MIN) / (BBOX_MAX - BBOX_MIN) * 2.0 - 1.0
    out = F.grid_sample(grid[None], coords.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(grid.shape[0], -1).transpose(0, 1).reshape(*lead, grid.shape[0])


def grid_points(resolution: int, device: Union[str, torch.device] = "cpu", dtype=torch.float32) -> Tensor:
    """World coordinates (R, R, R, 3) of the samples of a resolution-R grid (``indexing='ij'``)."""
    lin = torch.linspace(BBOX_MIN, BBOX_MAX, resolution, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1)


def density_shift(alpha_init: float, voxel_size: float) -> float:
    """DVGO bias ``b = log((1 - alpha_init)^(-1/s) - 1)`` (Dream3D Eq. 8): a ray crossing one voxel of a zero
    raw grid keeps transmittance ``1 - alpha_init``; ``s`` is the voxel size in world units."""
    if not 0.0 < alpha_init < 1.0:
        raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
    return math.log(math.expm1(-math.log1p(-alpha_init) / voxel_size))


class ColorGrid(nn.Module):
    """Explicit colour grid (3, R, R, R) of logits; ``rgb = sigmoid(interp(x))``."""

    def __init__(self, resolution: int = 64, init: Optional[Tensor] = None) -> None:
        super().__init__()
        self.resolution = int(resolution)
        data = torch.zeros(3, resolution, resolution, resolution) if init is None else init.detach().clone()
        self.grid = nn.Parameter(data)

    def forward(self, points: Tensor) -> Tensor:
        return torch.sigmoid(sample_grid(self.grid, points))


class ColorMLP(nn.Module):
    """Shallow colour MLP on positionally encoded positions, ``c = f_rgb(gamma(x))`` (Dream3D Eq. 6c).

    Dream3D does not give the sizes; width 128 and 3 layers follow DVGO's ``rgbnet`` (128 wide), 6 frequencies
    are our choice.
    """

    def __init__(self, pe_freqs: int = 6, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.pe_freqs = int(pe_freqs)
        dims = [3 + 6 * pe_freqs] + [hidden] * (layers - 1)
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(dims[-1], 3))
        self.net = nn.Sequential(*mods)

    def forward(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self.net(positional_encoding(points, self.pe_freqs)))


class DensityGridField(nn.Module):
    """DVGO density grid + colour (Dream3D appendix D.1), a field in the unit cube.

    ``sigma = softplus(interp(x, V_density) + b)`` (Eq. 6a/6b, "post-activation": interpolate raw values, then
    activate), ``b`` from ``alpha_init`` by Eq. 8 (DVGO/Dream3D default 1e-6), raw grid initialised to 0;
    colour from a :class:`ColorMLP` (Eq. 6c, default) or a :class:`ColorGrid`.
    """

    def __init__(
        self,
        resolution: int = 128,
        color: Union[str, nn.Module] = "mlp",
        alpha_init: float = 1e-6,
        color_resolution: Optional[int] = None,
        pe_freqs: int = 6,
    ) -> None:
        super().__init__()
        if resolution < 2:
            raise ValueError("resolution must be >= 2")
        self.resolution = int(resolution)
        self.alpha_init = float(alpha_init)
        self.voxel_size = (BBOX_MAX - BBOX_MIN) / (resolution - 1)
        self.shift = density_shift(alpha_init, self.voxel_size)
        self.density = nn.Parameter(torch.zeros(1, resolution, resolution, resolution))
        if isinstance(color, nn.Module):
            self.color = color
        elif color == "mlp":
            self.color = ColorMLP(pe_freqs=pe_freqs)
        elif color == "grid":
            self.color = ColorGrid(color_resolution or max(2, resolution // 2))
        else:
            raise ValueError(f"color must be 'mlp', 'grid' or a module, got {color!r}")

    @classmethod
    def from_sdf(
        cls, sdf: Union[Tensor, "numpy.ndarray"], beta: float = DEFAULT_BETA, **kwargs  # noqa: F821
    ) -> "DensityGridField":
        """Initialise the raw density from an SDF grid (R, R, R) with Dream3D Eq. 9a/9b (shape prior init).

        See :func:`backend.fields.sdf.density_to_raw` for how the DVGO shift is compensated.
        """
        sdf_t = torch.as_tensor(sdf, dtype=torch.float32)
        if sdf_t.ndim != 3 or len(set(sdf_t.shape)) != 1:
            raise ValueError(f"sdf grid must be cubic (R, R, R), got {tuple(sdf_t.shape)}")
        field = cls(resolution=sdf_t.shape[0], **kwargs)
        with torch.no_grad():
            field.density.copy_(sdf_to_raw_density(sdf_t, beta, field.shift)[None])
        return field

    def raw_density(self, points: Tensor) -> Tensor:
        """Interpolated raw density (Eq. 6a)."""
        return sample_grid(self.density, points)[..., 0]

    def sigma(self, points: Tensor) -> Tensor:
        """Activated density (Eq. 6b), per world unit."""
        return F.softplus(self.raw_density(points) + self.shift)

    def rgb(self, points: Tensor) -> Tensor:
        """Colour (Eq. 6c or the colour grid), in [0, 1]."""
        return self.color(points)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        return self.sigma(points), self.color(points)

    def density_grid(self) -> Tensor:
        """Activated density at the grid samples (R, R, R), e.g. for marching cubes or the prior loss."""
        return F.softplus(self.density[0] + self.shift)


class SDFGridField(nn.Module):
    """A field from an SDF grid: ``sigma = Eq. 9a(interp(x, sdf))``; colour constant or from a colour module.

    The SDF is an ``nn.Parameter`` (``trainable=False`` by default) so a pipeline may optimise it directly.
    """

    def __init__(
        self,
        sdf: Union[Tensor, "numpy.ndarray"],  # noqa: F821
        beta: float = DEFAULT_BETA,
        color: Union[None, tuple, nn.Module] = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        sdf_t = torch.as_tensor(sdf, dtype=torch.float32)
        if sdf_t.ndim != 3:
            raise ValueError(f"sdf grid must have shape (X, Y, Z), got {tuple(sdf_t.shape)}")
        self.sdf = nn.Parameter(sdf_t.clone()[None], requires_grad=trainable)
        self.beta = float(beta)
        if isinstance(color, nn.Module):
            self.color = color
            self.register_buffer("constant_color", None)
        else:
            self.color = None
            rgb = (0.8, 0.8, 0.8) if color is None else color
            self.register_buffer("constant_color", torch.tensor(rgb, dtype=torch.float32))

    def signed_distance(self, points: Tensor) -> Tensor:
        return sample_grid(self.sdf, points)[..., 0]

    def sigma(self, points: Tensor) -> Tensor:
        from backend.fields.sdf import sdf_to_density

        return sdf_to_density(self.signed_distance(points), self.beta)

    def rgb(self, points: Tensor) -> Tensor:
        if self.color is not None:
            return self.color(points)
        return self.constant_color.to(points.dtype).expand(*points.shape[:-1], 3)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        return self.sigma(points), self.rgb(points)
