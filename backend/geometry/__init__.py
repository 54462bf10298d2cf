"""Geometry: mesh IO, normalisation, mesh <-> SDF grid, marching cubes, metrics."""
