"""The starter data set: multi-view renders, masks, depth, normals, voxels and occupancy samples of world shapes.

One ``.npz`` file per split (no pickle: attributes travel as a JSON string) holds, for ``N`` shapes and ``V`` views:

=============  =======================  ==============================================================
``rgb``        uint8 (N, V, H, W, 3)     colour on a white background (ISS++ renders, Eq. 3's white)
``mask``       uint8 (N, V, H, W)        alpha * 255
``depth``      float16 (N, V, H, W)      expected ray depth (0 where empty)
``normal``     int8 (N, V, H, W, 3)      world-space unit normal * 127
``cameras``    float32 (N, V, 3)         azimuth (deg), elevation (deg), distance of each view
``voxels``     uint8 (N, R^3 / 8)        packed occupancy of an R^3 grid over [-0.5, 0.5]^3 (cell centres)
``points``     float16 (N, P, 3)         occupancy samples (half uniform, half near the surface)
``inside``     uint8 (N, P / 8)          packed occupancy labels of ``points``
``category``   int16 (N,)                index into :data:`backend.training.world.CATEGORIES`
``colour``     int16 (N,)                index into :data:`backend.training.world.COLOURS`
``seed``       int64 (N,)                the shape's seed (``sample_shape(seed, split)`` rebuilds it)
``attrs``      JSON list of dicts        the shape's attributes
=============  =======================  ==============================================================

Renders come from the project's own volume renderer (:mod:`backend.render`) over the analytic SDF turned into
density (Dream3D Eq. 9), see :mod:`backend.training.render_world`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from backend.errors import InputError
from backend.training.split import sample_shape
from backend.training.world import CATEGORIES, COLOURS, ShapeSpec, build_shape

log = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    n_shapes: int = 1300  # 100 per category on average
    views: int = 4
    resolution: int = 64  # renders are 64^2 (issue 9), 128^2 with --resolution 128
    voxel_res: int = 32
    n_points: int = 4096
    near_surface_sigma: float = 0.02
    elevation: tuple[float, float] = (10.0, 40.0)  # degrees, views from above like the ISS/DVR renders
    distance: float = 1.6
    split: str = "train"
    seed: int = 0


@dataclass
class StarterDataset:
    rgb: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    normal: np.ndarray
    cameras: np.ndarray
    voxels: np.ndarray
    points: np.ndarray
    inside: np.ndarray
    category: np.ndarray
    colour: np.ndarray
    seed: np.ndarray
    attrs: list[dict]
    split: str = "train"
    voxel_res: int = 32

    def __len__(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.rgb.shape[1])

    def shape(self, i: int) -> ShapeSpec:
        """Rebuild shape ``i`` from its description and seed (exact ground truth)."""
        return build_shape(CATEGORIES[int(self.category[i])], COLOURS[int(self.colour[i])], self.attrs[i],
                           seed=int(self.seed[i]))

    def voxel_grid(self, i: int) -> np.ndarray:
        r = self.voxel_res
        return np.unpackbits(self.voxels[i])[: r**3].reshape(r, r, r).astype(bool)

    def occupancy(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.points[i].astype(np.float32)
        return p, np.unpackbits(self.inside[i])[: len(p)].astype(bool)

    def images(self, dtype=np.float32) -> np.ndarray:
        """All renders as floats in [0, 1], (N, V, H, W, 3)."""
        return self.rgb.astype(dtype) / 255.0

    def save(self, path: str | Path, slim: bool = False) -> Path:
        """``slim`` leaves out depth and normals (they read back as zeros; see :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if slim else {"depth": self.depth, "normal": self.normal}
        np.savez_compressed(
            path, rgb=self.rgb, mask=self.mask, **extra, cameras=self.cameras,
            voxels=self.voxels, points=self.points, inside=self.inside, category=self.category, colour=self.colour,
            seed=self.seed, attrs=np.asarray(json.dumps(self.attrs)), split=np.asarray(self.split),
            voxel_res=np.asarray(self.voxel_res),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StarterDataset":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"data set {path} not found; make it with `python -m backend train dataset --out {path}`")
        with np.load(path, allow_pickle=False) as z:
            rgb = z["rgb"]
            # A copy saved without depth and normals (``slim``: what 3D-supervised trainers need, half the size)
            # reads back with zeros there; only ShapeClipper's image-loss SVR uses them.
            depth = z["depth"] if "depth" in z.files else np.zeros(rgb.shape[:-1], np.float16)
            normal = z["normal"] if "normal" in z.files else np.zeros(rgb.shape, np.int8)
            return cls(
                rgb=rgb, mask=z["mask"], depth=depth, normal=normal, cameras=z["cameras"],
                voxels=z["voxels"], points=z["points"], inside=z["inside"], category=z["category"],
                colour=z["colour"], seed=z["seed"], attrs=json.loads(str(z["attrs"])), split=str(z["split"]),
                voxel_res=int(z["voxel_res"]),
            )


def grid_points(res: int) -> np.ndarray:
    """Cell centres of a ``res^3`` grid over [-0.5, 0.5]^3, (res^3, 3) float32, x-major ("ij")."""
    u = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    return np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)


def voxelize(shape: ShapeSpec, res: int = 32) -> np.ndarray:
    """Exact occupancy of the cell centres, (res, res, res) bool."""
    return (shape.sdf.sdf(grid_points(res)) < 0).reshape(res, res, res)


def occupancy_samples(shape: ShapeSpec, n: int, rng: np.random.Generator, sigma: float = 0.02):
    """``n`` points (half uniform in the cube, half jittered around the surface) and their occupancy labels."""
    n_uni = n // 2
    uni = rng.uniform(-0.5, 0.5, size=(n_uni, 3)).astype(np.float32)
    # surface samples: project dense random points onto the surface along the SDF gradient, then jitter
    cand = rng.uniform(-0.5, 0.5, size=(n * 4, 3)).astype(np.float32)
    d = shape.sdf.sdf(cand)
    near = cand[np.argsort(np.abs(d))[: n - n_uni]]
    near = near + rng.normal(0, sigma, size=near.shape).astype(np.float32)
    pts = np.clip(np.concatenate([uni, near]), -0.5, 0.5).astype(np.float32)
    return pts, shape.sdf.sdf(pts) < 0


def sample_cameras(rng: np.random.Generator, views: int, cfg: DatasetConfig) -> np.ndarray:
    """``views`` cameras (azimuth, elevation, distance): azimuths spread evenly from a random start."""
    start = rng.uniform(0, 360)
    az = (start + 360.0 * np.arange(views) / views + rng.uniform(-20, 20, size=views)) % 360
    el = rng.uniform(*cfg.elevation, size=views)
    return np.stack([az, el, np.full(views, cfg.distance)], -1).astype(np.float32)


def build_dataset(cfg: DatasetConfig, shapes: Optional[Iterable[ShapeSpec]] = None, progress=None) -> StarterDataset:
    """Render and voxelise ``cfg.n_shapes`` shapes of ``cfg.split`` (shape ``i`` has seed ``cfg.seed * 10^6 + i``)."""
    from backend.training.render_world import render_shape

    if shapes is None:
        shapes = [sample_shape(cfg.seed * 1_000_000 + i, cfg.split) for i in range(cfg.n_shapes)]
    shapes = list(shapes)
    rng = np.random.default_rng([cfg.seed, 2718])
    n, v, r = len(shapes), cfg.views, cfg.resolution
    out = dict(
        rgb=np.zeros((n, v, r, r, 3), np.uint8), mask=np.zeros((n, v, r, r), np.uint8),
        depth=np.zeros((n, v, r, r), np.float16), normal=np.zeros((n, v, r, r, 3), np.int8),
        cameras=np.zeros((n, v, 3), np.float32),
        voxels=np.zeros((n, (cfg.voxel_res**3 + 7) // 8), np.uint8),
        points=np.zeros((n, cfg.n_points, 3), np.float16), inside=np.zeros((n, (cfg.n_points + 7) // 8), np.uint8),
    )
    for i, shape in enumerate(shapes):
        cams = sample_cameras(rng, v, cfg)
        views = render_shape(shape, cams, r)
        out["rgb"][i] = np.clip(views["rgb"] * 255 + 0.5, 0, 255).astype(np.uint8)
        out["mask"][i] = np.clip(views["alpha"] * 255 + 0.5, 0, 255).astype(np.uint8)
        out["depth"][i] = views["depth"].astype(np.float16)
        out["normal"][i] = np.clip(np.round(views["normal"] * 127), -127, 127).astype(np.int8)
        out["cameras"][i] = cams
        out["voxels"][i] = np.packbits(voxelize(shape, cfg.voxel_res).ravel())
        pts, ins = occupancy_samples(shape, cfg.n_points, rng, cfg.near_surface_sigma)
        out["points"][i] = pts.astype(np.float16)
        out["inside"][i] = np.packbits(ins)
        if progress is not None:
            progress(i, n)
    return StarterDataset(
        **out,
        category=np.asarray([CATEGORIES.index(s.category) for s in shapes], np.int16),
        colour=np.asarray([COLOURS.index(s.colour) for s in shapes], np.int16),
        seed=np.asarray([s.seed for s in shapes], np.int64),
        attrs=[dict(s.attrs) for s in shapes], split=cfg.split, voxel_res=cfg.voxel_res,
    )
