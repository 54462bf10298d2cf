"""Geometry: mesh IO, normalisation into the unit cube, mesh <-> SDF grid, marching cubes, metrics.

Submodules import torch-free (numpy, scipy, scikit-image, trimesh); ``io`` is imported lazily by the CLI.
"""

from backend.geometry.marching import decimate, extract_mesh, remove_small_components
from backend.geometry.metrics import chamfer_distance, f_score, mesh_iou, precision_recall, sample_surface, volumetric_iou
from backend.geometry.normalize import Normalization, fit_normalization, normalize_mesh
from backend.geometry.sdf import mesh_occupancy, mesh_to_sdf, unsigned_distance_grid
from backend.geometry.validate import check_mesh

__all__ = [
    "Normalization",
    "chamfer_distance",
    "check_mesh",
    "decimate",
    "extract_mesh",
    "f_score",
    "fit_normalization",
    "mesh_iou",
    "mesh_occupancy",
    "mesh_to_sdf",
    "normalize_mesh",
    "precision_recall",
    "remove_small_components",
    "sample_surface",
    "unsigned_distance_grid",
    "volumetric_iou",
]
