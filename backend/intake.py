"""The server's door (DESIGN.md, "One parser at the door"): every client message and every job parameter is parsed
here, once, into typed values with limits, so nothing reaches a pipeline, numpy or PIL unchecked.

* :func:`parse_request` turns a decoded :class:`shared.protocol.Message` (the decoder has already bounded the
  header: finite numbers, 19-digit integers, nesting depth, array shapes computed without overflow) into one of
  the typed requests below, or raises :class:`InputError`;
* :func:`parse_params` bounds a job's parameters before its workflow's own ``validate`` sees them: a JSON object
  of at most ``MAX_PARAM_DEPTH`` levels, finite numbers, integers within +-2**53, bounded strings and lists, and
  images whose pixel size is checked from their header before anything decodes them (decompression bombs);
* :func:`check_resources` refuses requests the backend's device and memory cannot hold, and says what to lower.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from backend.errors import InputError
from backend.events import MeshInput
from shared import protocol as P
from shared.mesh import MeshError, validate_mesh

MAX_PARAM_DEPTH = 6
MAX_PARAM_KEYS = 256  # keys in one params object
MAX_STRING = 10_000  # characters of one text parameter (a prompt is far shorter)
MAX_LIST = 1_000  # items of one list parameter
MAX_INT = 2**53  # integers beyond this cannot be meant (and lose precision as floats)
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_MESHES = 64
MAX_ID = 128
MAX_GALLERY_ITEMS = 64  # each gallery item is a full generation


@dataclass(frozen=True)
class Hello:
    client: str
    name: str
    credit: Optional[int]


@dataclass(frozen=True)
class Submit:
    workflow: str
    params: dict
    inputs: list


@dataclass(frozen=True)
class JobRequest:  # cancel, fetch
    job: str


@dataclass(frozen=True)
class Credit:
    nbytes: int


@dataclass(frozen=True)
class Plain:  # ping, list_jobs, heartbeat, shutdown, bye: no fields that matter
    kind: str


Request = Union[Hello, Submit, JobRequest, Credit, Plain]


def _text(value: Any, what: str, *, max_len: int, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise InputError(f"{what} must be {'text' if empty else 'non-empty text'}")
    if len(value) > max_len:
        raise InputError(f"{what} is {len(value):,} characters long; at most {max_len:,}")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InputError(f"{what} must be between {lo} and {hi}")
    return value


def parse_request(msg: P.Message) -> Request:
    """The typed request of a decoded client message (raises InputError with what is wrong)."""
    k, f = msg.kind, msg.fields
    if k == P.HELLO:
        client = _text(f.get("client"), "hello's client id", max_len=MAX_ID)
        name = f.get("name", "client")
        credit = f.get("credit")
        return Hello(client=client, name=(name if isinstance(name, str) else "client")[:64],
                     credit=credit if isinstance(credit, int) and not isinstance(credit, bool) else None)
    if k == P.SUBMIT:
        workflow = _text(f.get("workflow"), "submit's 'workflow' name", max_len=64)
        params = f.get("params")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise InputError("'params' must be a JSON object")
        return Submit(workflow=workflow, params=params, inputs=parse_meshes(f.get("meshes"), msg.arrays))
    if k in (P.CANCEL, P.FETCH):
        return JobRequest(job=_text(f.get("job"), f"{k} needs a 'job' id; it", max_len=MAX_ID))
    if k == P.CREDIT:
        n = f.get("bytes", 0)
        return Credit(nbytes=n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**62 else 0)
    return Plain(kind=k)


def parse_meshes(descs: Any, arrays: dict) -> list[MeshInput]:
    """The input meshes of a submit: descriptions in ``meshes``, arrays ``mesh<i>.vertices|faces|colors``."""
    descs = descs or []
    if not isinstance(descs, list):
        raise InputError("'meshes' must be a list")
    if len(descs) > MAX_MESHES:
        raise InputError(f"{len(descs)} input meshes; at most {MAX_MESHES}")
    inputs = []
    for i, d in enumerate(descs):
        if not isinstance(d, dict):
            raise InputError(f"mesh {i}: description must be an object")
        name = d.get("name")
        name = name[:128] if isinstance(name, str) and name else f"mesh{i}"
        v = arrays.get(f"mesh{i}.vertices")
        f = arrays.get(f"mesh{i}.faces")
        c = arrays.get(f"mesh{i}.colors")
        if v is None or f is None:
            raise InputError(f"mesh {name!r}: vertices or faces missing from the message")
        try:
            validate_mesh(v, f, c, what=f"mesh {name!r}")
        except MeshError as exc:
            raise InputError(str(exc)) from None
        mw = d.get("matrix_world")
        if mw is not None:
            if not isinstance(mw, list) or len(mw) != 16 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in mw):
                raise InputError(f"mesh {name!r}: matrix_world must be 16 numbers (row-major 4x4)")
            mw = np.asarray(mw, dtype=np.float64).reshape(4, 4)
            if not np.isfinite(mw).all():
                raise InputError(f"mesh {name!r}: matrix_world has NaN or infinite entries")
        uv = arrays.get(f"mesh{i}.uvs")
        if uv is not None:
            uv = np.asarray(uv)
            if uv.dtype != np.float32 or uv.shape != (len(f), 3, 2):
                raise InputError(f"mesh {name!r}: uvs must be float32 of shape ({len(f)}, 3, 2), one UV per face "
                                 f"corner; got {uv.dtype} {tuple(uv.shape)}")
            if not np.isfinite(uv).all():
                raise InputError(f"mesh {name!r}: its UV map has NaN or infinite coordinates")
        # copy out of the ZeroMQ frame: the job outlives the message
        inputs.append(MeshInput(name=name, vertices=np.array(v, np.float32), faces=np.array(f, np.uint32),
                                colors=None if c is None else np.array(c, np.uint8), matrix_world=mw,
                                uvs=None if uv is None else np.array(uv, np.float32)))
    return inputs


# ------------------------------------------------------------------------------------------------ parameters
def parse_params(workflow: str, params: Any) -> dict:
    """Bound a job's parameters (see the module docstring); returns them unchanged or raises InputError."""
    if not isinstance(params, dict):
        raise InputError(f"{workflow}: params must be a JSON object")
    stack: list[tuple[Any, str, int]] = [(params, "params", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_PARAM_DEPTH:
                raise InputError(f"{workflow}: {where} nests deeper than {MAX_PARAM_DEPTH} levels")
            if len(value) > MAX_PARAM_KEYS:
                raise InputError(f"{workflow}: {where} has {len(value)} keys; at most {MAX_PARAM_KEYS}")
            for key, v in value.items():
                if not isinstance(key, str) or len(key) > 64:
                    raise InputError(f"{workflow}: {where} has a key that is not a short name")
                if isinstance(v, str) and key.endswith("_png"):
                    check_image_b64(v, f"{workflow}: {key}")
                    continue
                stack.append((v, f"{where}.{key}" if where != "params" else key, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_PARAM_DEPTH:
                raise InputError(f"{workflow}: {where} nests deeper than {MAX_PARAM_DEPTH} levels")
            if len(value) > MAX_LIST:
                raise InputError(f"{workflow}: {where} has {len(value):,} items; at most {MAX_LIST:,}")
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise InputError(f"{workflow}: {where} = {str(value)[:30]} is out of range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InputError(f"{workflow}: {where} must be a finite number, got {value}")
        elif isinstance(value, str):
            if len(value) > MAX_STRING:
                raise InputError(f"{workflow}: {where} is {len(value):,} characters long; at most {MAX_STRING:,}")
        else:
            raise InputError(f"{workflow}: {where} has a value of type {type(value).__name__}, not JSON")
    return params


def image_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels (PNG read directly; other
    formats through PIL's lazy open, its own bomb check turned into an InputError)."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        if len(raw) < 24 or raw[12:16] != b"IHDR":
            raise InputError("the PNG is truncated (no IHDR header)")
        return struct.unpack(">II", raw[16:24])
    import warnings

    from PIL import Image as PILImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(raw)) as im:
                return im.size
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise InputError(f"the image is larger than {MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as exc:
        raise InputError("the image cannot be read: it is not a PNG, JPEG, WebP or BMP file the backend can decode "
                         "(or it is damaged); save it as PNG and try again") from None


def check_image_b64(data: str, what: str) -> None:
    """A base64 image parameter: decodable, and at most MAX_IMAGE_SIDE per side and MAX_IMAGE_PIXELS in all."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} must be base64-encoded image bytes") from None
    w, h = image_size(raw)
    if w < 1 or h < 1 or w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{what}: a {w}x{h} image is too large; at most {MAX_IMAGE_SIDE} pixels per side and "
                         f"{MAX_IMAGE_PIXELS:,} pixels in all (scale it down first)")


# ------------------------------------------------------------------------------------------------ resources
def device_memory_bytes(device: str) -> tuple[int, str]:
    """Memory a job may use on ``device`` and its description: the GPU's total memory for CUDA, else the
    machine's RAM."""
    if device.startswith("cuda"):
        import torch

        total = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        return total, f"the GPU's {total / 2**30:.1f} GiB"
    import psutil

    total = int(psutil.virtual_memory().total)
    return total, f"this machine's {total / 2**30:.1f} GiB of memory (CPU)"


def _find(params: dict, key: str) -> Any:
    """A numeric option at the top level or in a nested ``config`` object (first one found)."""
    v = params.get(key)
    if v is None and isinstance(params.get("config"), dict):
        v = params["config"].get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


BYTES_PER_SAMPLE = 16  # a volume-render sample kept for the backward pass (density, colour; chunked renders)


def estimate_peak_bytes(params: dict) -> tuple[int, str]:
    """A rough upper bound of a job's peak memory from its normalised params (renders dominate): samples held
    for one optimisation step = views x render_resolution^2 x n_samples, plus the density grid."""
    views = _find(params, "views") or 1
    res = _find(params, "render_resolution") or 0
    samples = _find(params, "n_samples") or 0
    grid = _find(params, "grid_resolution") or 0
    render = int(views) * int(res) ** 2 * int(samples) * BYTES_PER_SAMPLE
    grid_bytes = int(grid) ** 3 * 4 * 4 * 3  # density + colour grids, their grads and Adam state
    parts = []
    if render:
        parts.append(f"{int(views)} views x {int(res)}^2 pixels x {int(samples)} samples")
    if grid_bytes:
        parts.append(f"a {int(grid)}^3 grid")
    return render + grid_bytes, " and ".join(parts)


def check_resources(workflow: str, params: dict, device: str, budget: Optional[tuple[int, str]] = None) -> None:
    """Refuse a request that the device's memory cannot hold (or a gallery too large for one job)."""
    for key in ("count", "variants"):
        n = _find(params, key)
        if n is not None and n > MAX_GALLERY_ITEMS:
            raise InputError(f"{workflow}: {key} = {n} is more than one job can make; at most {MAX_GALLERY_ITEMS}")
    subjects = params.get("subjects")
    if isinstance(subjects, list) and len(subjects) > MAX_GALLERY_ITEMS:
        raise InputError(f"{workflow}: {len(subjects):,} subjects; at most {MAX_GALLERY_ITEMS} per job")
    from backend.presets import WORKFLOWS as PRESET_WORKFLOWS

    if workflow in PRESET_WORKFLOWS:  # a calibrated estimate per preset: backend.presets.check_memory
        return
    need, what = estimate_peak_bytes(params)
    if not need:
        return
    have, where = budget or device_memory_bytes(device)
    if need > 0.8 * have:
        raise InputError(f"{workflow}: rendering {what} needs about {need / 2**30:.1f} GiB at once, more than "
                         f"{where} can hold; lower views, render_resolution or n_samples (or use a smaller preset)")
