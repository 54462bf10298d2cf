"""Workflow ``diagnostic``: a real, quick job that needs no models, for installation checks and transport tests.

It morphs a signed distance field from a sphere into a wobbly torus over ``steps`` steps; each step is meshed
with marching cubes (scikit-image) at ``resolution``^3 and coloured from its normals, streamed as an intermediate
mesh, and the last one is sent again as the final mesh. With ``faces > 0`` it instead builds a parametric
(u, v) torus with about that many triangles each step (cheap, any size up to the wire limit), which the transport
benchmark uses to move 100k and 1M-face meshes.
"""

from __future__ import annotations

import argparse
import time
from typing import Iterator

import numpy as np
from skimage.measure import marching_cubes

from backend.errors import InputError
from backend.events import Event, JobContext, MeshInput, MeshUpdate, Progress
from shared.mesh import MAX_FACES

NAME = "diagnostic"

DEFAULTS = {"steps": 8, "resolution": 40, "delay": 0.0, "faces": 0}
LIMITS = {"steps": (1, 1000), "resolution": (8, 256), "delay": (0.0, 10.0), "faces": (0, MAX_FACES)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="intermediate meshes to stream")
    parser.add_argument("--resolution", type=int, default=DEFAULTS["resolution"], help="marching-cubes grid size")
    parser.add_argument("--delay", type=float, default=DEFAULTS["delay"], help="seconds to wait between steps")
    parser.add_argument("--faces", type=int, default=DEFAULTS["faces"],
                        help="if > 0: a parametric torus with about this many faces instead of marching cubes")


def params_from_args(args: argparse.Namespace) -> tuple[dict, list[MeshInput]]:
    return {k: getattr(args, k) for k in DEFAULTS}, []


def validate(params: dict, inputs: list[MeshInput], profile: object = None) -> dict:
    """Fill defaults, check types and ranges; unknown keys are an error (a typo should not pass silently)."""
    unknown = set(params) - set(DEFAULTS) - {"seed"}
    if unknown:
        raise InputError(f"diagnostic: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    for k, v in params.items():
        if k == "seed":
            continue
        kind = type(DEFAULTS[k])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and float(v) != int(v)):
            raise InputError(f"diagnostic: {k} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        lo, hi = LIMITS[k]
        if not lo <= v <= hi:
            raise InputError(f"diagnostic: {k} must be between {lo} and {hi}, got {v}")
        out[k] = kind(v)
    if inputs:
        raise InputError("diagnostic takes no input meshes; deselect the objects or use another workflow")
    return out


def morph_sdf(points: np.ndarray, t: float) -> np.ndarray:
    """SDF-like field blending a sphere (t=0) into a torus with a sinusoidal wobble (t=1); negative inside."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    sphere = np.sqrt(x * x + y * y + z * z) - 0.32
    q = np.sqrt(x * x + y * y) - 0.26
    torus = np.sqrt(q * q + z * z) - 0.11
    wobble = 0.025 * np.sin(9 * x) * np.sin(9 * y) * np.sin(9 * z)
    return (1 - t) * sphere + t * (torus + wobble)


def _normal_colors(normals: np.ndarray, t: float) -> np.ndarray:
    base = np.clip(normals * 0.5 + 0.5, 0, 1)
    tint = np.array([1.0 - 0.5 * t, 0.6 + 0.3 * t, 0.4 + 0.6 * t])
    rgb = np.clip(0.35 * base + 0.65 * base * tint, 0, 1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def marching_cubes_mesh(t: float, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mesh the zero level set of :func:`morph_sdf` at ``t`` in the unit cube [-0.5, 0.5]^3."""
    lin = np.linspace(-0.5, 0.5, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), axis=-1)
    vol = morph_sdf(grid, t)
    step = 1.0 / (resolution - 1)
    # skimage treats larger values as outside with "descent": triangles face outwards (positive volume)
    verts, faces, normals, _ = marching_cubes(vol, level=0.0, spacing=(step, step, step), gradient_direction="descent")
    verts = (verts - 0.5).astype(np.float32)
    normals = -normals  # skimage's normals follow the descent; the SDF's outward normal is its gradient
    return verts, faces.astype(np.uint32), normals.astype(np.float32), _normal_colors(normals, t)


def torus_mesh(t: float, faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A closed (u, v) torus with about ``faces`` triangles, bumps growing with ``t``; colours from (u, v)."""
    nv = max(3, int(np.sqrt(max(faces, 18) / 4)))
    nu = max(3, max(faces, 18) // (2 * nv))
    u = np.linspace(0, 2 * np.pi, nu, endpoint=False, dtype=np.float32)
    v = np.linspace(0, 2 * np.pi, nv, endpoint=False, dtype=np.float32)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    r = 0.11 * (1 + 0.25 * t * np.sin(5 * uu) * np.sin(3 * vv))
    ring = 0.28 + r * np.cos(vv)
    verts = np.stack([ring * np.cos(uu), ring * np.sin(uu), r * np.sin(vv)], axis=-1).reshape(-1, 3)
    i = np.arange(nu, dtype=np.uint32)[:, None]
    j = np.arange(nv, dtype=np.uint32)[None, :]
    a = i * nv + j
    b = ((i + 1) % nu) * nv + j
    c = ((i + 1) % nu) * nv + (j + 1) % nv
    d = i * nv + (j + 1) % nv
    tri = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    normals = np.stack([np.cos(vv) * np.cos(uu), np.cos(vv) * np.sin(uu), np.sin(vv)], -1).reshape(-1, 3)
    colors = np.empty((len(verts), 3), np.uint8)
    colors[:, 0] = (127 + 127 * np.cos(uu)).reshape(-1)
    colors[:, 1] = (127 + 127 * np.sin(vv)).reshape(-1)
    colors[:, 2] = int(255 * t)
    return verts.astype(np.float32), tri, normals.astype(np.float32), colors


def _sleep(seconds: float, ctx: JobContext) -> None:
    end = time.monotonic() + seconds
    while True:
        ctx.cancel.check()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.02))


def run(params: dict, inputs: list[MeshInput], ctx: JobContext) -> Iterator[Event]:
    """Stream ``steps`` intermediate meshes of the morph, then the final mesh (see the module docstring)."""
    steps, res, delay, nfaces = params["steps"], params["resolution"], params["delay"], params["faces"]
    mesh = None
    for k in range(steps):
        ctx.cancel.check()
        t = k / max(steps - 1, 1)
        mesh = torus_mesh(t, nfaces) if nfaces > 0 else marching_cubes_mesh(t, res)
        v, f, n, c = mesh
        yield Progress("diagnostic", k + 1, steps, f"step {k + 1}/{steps}: {len(f):,} faces")
        yield MeshUpdate(v, f, c, final=False, name="diagnostic", normals=n,
                         info={"step": k + 1, "t": t, "t_created": time.time()})
        if delay > 0 and k < steps - 1:
            _sleep(delay, ctx)
    assert mesh is not None
    v, f, n, c = mesh
    yield MeshUpdate(v, f, c, final=True, name="diagnostic", normals=n,
                     info={"steps": steps, "t_created": time.time()})
