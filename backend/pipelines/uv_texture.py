"""Meshes ready for a pipeline (issue 16): a generated result with a UV map and a baked image texture.

With the job option ``uv_texture`` (off by default), a workflow's final mesh goes through :func:`finish`:

1. decimation to ``texture_faces`` (quadric edge collapse, :func:`backend.geometry.marching.decimate`);
2. a UV atlas (xatlas in a child process, :func:`backend.geometry.uv.unwrap`; a crash there costs the texture,
   never the result or the backend);
3. a ``texture_size``^2 bake of the result's colours into the atlas (:func:`backend.geometry.texture.bake_image`,
   the bake stylize uses for the artist's UV map): the workflow's colour function at each texel's surface point
   when it has one (the ISS decoder's colour network, the Dream3D grid's colour), else the full mesh's vertex
   colours near it (so decimation does not cost colour detail).

It then yields ``Image(png, "<slot> texture")`` and the final ``MeshUpdate`` with ``uvs`` (per face corner) and
``info["texture"]`` naming that image: the transport stylize uses for its baked texture. The job store and
``run --out`` write the GLB with ``TEXCOORD_0`` and the image as ``baseColorTexture``; the add-on gives the object a
UV map and a material with the image as Base Color (the vertex colours stay, as the ``Col`` attribute).

``texture_size`` / ``texture_faces`` default to the quality preset's (draft 256^2 / 8k faces, standard 512^2 / 20k,
paper 1024^2 / 30k, :mod:`backend.presets`), or :data:`FALLBACK` without a preset. The face limit stays under
xatlas's known crashes on large meshes (an 80k-face sphere).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from backend.errors import InputError
from backend.events import Event, Image, MeshUpdate, Progress
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {"uv_texture": False, "texture_size": None, "texture_faces": None}
FALLBACK = {"texture_size": 512, "texture_faces": 20_000}
RANGES = {"texture_size": (16, 4096), "texture_faces": (100, 50_000)}
STAGE = "texture"
ColorFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TextureOptions:
    size: int
    faces: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--uv-texture``, ``--texture-size``, ``--texture-faces`` (``run text-to-shape`` / ``image-to-shape``)."""
    parser.add_argument("--uv-texture", action="store_true",
                        help="decimate the result, unwrap UVs and bake its colours into an image texture "
                             "(GLB: TEXCOORD_0 + baseColorTexture)")
    parser.add_argument("--texture-size", type=int, default=None,
                        help=f"side of the baked texture in pixels (default {FALLBACK['texture_size']}; "
                             "presets: draft 256, standard 512, paper 1024)")
    parser.add_argument("--texture-faces", type=int, default=None,
                        help=f"face budget of the textured mesh (default {FALLBACK['texture_faces']:,}, at most "
                             f"{RANGES['texture_faces'][1]:,})")


def params_from_args(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {}
    if getattr(args, "uv_texture", False):
        out["uv_texture"] = True
    for k in ("texture_size", "texture_faces"):
        if getattr(args, k, None) is not None:
            out[k] = getattr(args, k)
    return out


def check_options(params: dict, workflow: str) -> dict:
    """The three options of ``params`` checked and normalised (absent ones at their defaults); raises InputError."""
    out = dict(OPTIONS)
    for k in OPTIONS:
        if params.get(k) is not None:
            out[k] = params[k]
    if not isinstance(out["uv_texture"], bool):
        raise InputError(f"{workflow}: uv_texture must be true or false, got {out['uv_texture']!r}")
    for k, (lo, hi) in RANGES.items():
        v = out[k]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise InputError(f"{workflow}: {k} must be a whole number, got {v!r}")
        if not lo <= int(v) <= hi:
            extra = " (the UV unwrapper is unreliable on larger meshes)" if k == "texture_faces" else ""
            raise InputError(f"{workflow}: {k} must be between {lo:,} and {hi:,}, got {int(v):,}{extra}")
        out[k] = int(v)
    return out


def options(params: dict) -> Optional[TextureOptions]:
    """The texture settings of a validated job, or None when ``uv_texture`` is off."""
    if not params.get("uv_texture"):
        return None
    return TextureOptions(size=int(params.get("texture_size") or FALLBACK["texture_size"]),
                          faces=int(params.get("texture_faces") or FALLBACK["texture_faces"]))


def _colors_at(color_fn: ColorFn, points: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    from backend.geometry.texture import to_u8

    parts = []
    for s in range(0, len(points), chunk):
        cancel_checkpoint()
        c = np.asarray(color_fn(np.ascontiguousarray(points[s : s + chunk], dtype=np.float32)))
        parts.append(to_u8(c if c.dtype == np.uint8 else np.clip(c, 0.0, 1.0))[:, :3])
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def finish(ev: MeshUpdate, opts: Optional[TextureOptions], color_fn: Optional[ColorFn] = None
           ) -> Iterator[Event]:
    """Yield ``ev`` as it is (``opts`` None, not final, empty), or textured (module docstring): Progress events of
    stage ``texture``, ``Image(png, "<name> texture")``, then the final MeshUpdate with ``uvs``.

    If the unwrapper fails the result still comes, decimated, with its vertex colours only, and
    ``info["uv_texture_error"]`` (and a Progress message) says why."""
    if opts is None or not ev.final or len(ev.faces) == 0:
        yield ev
        return
    from backend.geometry.marching import decimate
    from backend.geometry.texture import bake_image, field_sampler, nearest_color_sampler, png_bytes
    from backend.geometry.texture import vertex_color_sampler
    from backend.geometry.uv import UnwrapError, unwrap

    t0 = time.perf_counter()
    name = ev.name
    n0 = len(ev.faces)
    yield Progress(STAGE, 0, 3, f"{name}: {n0:,} faces, budget {opts.faces:,}")
    v, f, c = decimate(ev.vertices, ev.faces, opts.faces, ev.colors)
    decimated = len(f) < n0
    v = np.ascontiguousarray(v, dtype=np.float32)
    f = np.ascontiguousarray(f, dtype=np.uint32)
    if decimated and color_fn is not None:
        c = _colors_at(color_fn, v)  # the colour at the new vertices (decimation moved them)
    info = dict(ev.info)
    if decimated:
        info["faces_before_decimation"] = n0
    normals = None if decimated else ev.normals
    cancel_checkpoint()
    yield Progress(STAGE, 1, 3, f"{name}: unwrapping UVs ({len(f):,} faces)")
    try:
        atlas = unwrap(v, f, opts.size)
    except UnwrapError as exc:
        log.warning("%s: %s", name, exc.message)
        info["uv_texture_error"] = exc.message
        yield Progress(STAGE, 3, 3, f"{name}: {exc.message}. The result keeps its vertex colours only.")
        yield MeshUpdate(v, f, c, final=True, name=name, normals=normals, info=info)
        return
    t1 = time.perf_counter()
    if color_fn is not None:
        sampler = field_sampler(v, f, color_fn)
        source = "colour field"
    elif ev.colors is not None and decimated:
        sampler = nearest_color_sampler(v, f, ev.vertices, ev.colors)
        source = "vertex colours before decimation"
    elif c is not None:
        sampler = vertex_color_sampler(f, c)
        source = "vertex colours"
    else:
        sampler = None
        source = ""
    info.update(uv_charts=atlas.charts, uv_seconds=round(atlas.seconds, 3))
    if sampler is None:  # nothing to bake: UVs only
        yield Progress(STAGE, 3, 3, f"{name}: UV map with {atlas.charts} charts (no colours to bake)")
        yield MeshUpdate(v, f, c, final=True, name=name, normals=normals, info=info, uvs=atlas.uvs)
        return
    yield Progress(STAGE, 2, 3, f"{name}: baking a {opts.size}^2 texture from the {source} "
                                f"({atlas.charts} charts)")
    rgba = bake_image(atlas.uvs, opts.size, sampler)
    label = f"{name} texture"
    yield Image(png_bytes(rgba), label)
    info.update(texture=label, texture_size=opts.size, texture_source=source,
                bake_seconds=round(time.perf_counter() - t1, 3),
                texture_seconds=round(time.perf_counter() - t0, 3))
    yield Progress(STAGE, 3, 3, f"{name}: textured in {time.perf_counter() - t0:.1f} s")
    yield MeshUpdate(v, f, c, final=True, name=name, normals=normals, info=info, uvs=atlas.uvs)
