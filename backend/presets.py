"""Quality presets per workflow, chosen to fit the backend's device and memory (issue 16).

Every workflow the sidebar offers has three presets:

- ``draft``: the smallest settings that still give a recognisable result; seconds to a minute or two on a CPU;
- ``standard``: what the workflow's paper does, scaled to a CPU (the default on a CPU);
- ``paper``: the papers' own settings (ISS++ Sec. 4.2, ThemeStation appendix A); the default on a GPU that holds
  it, hours on a CPU.

A job names its preset with the ``preset`` parameter (``auto`` or absent: :func:`default_preset` picks the largest
one whose memory estimate fits and whose time suits the device). Options the job sets explicitly always win over
the preset's values. Before a job is queued :func:`check_memory` compares :func:`estimate_peak_bytes` (a
deliberate upper bound, calibrated against peak RSS measured on this project's CPU; ``tests/test_presets.py``
checks that it stays above what a real backend process reaches) with :func:`memory_budget`, and refuses a job that
would not fit with a message that names the preset that fits.

Nothing here imports torch: the server calls it on its socket thread for every ``hello``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

from backend.errors import InputError

PRESET_NAMES = ("draft", "standard", "paper")
AUTO = "auto"

# ------------------------------------------------------------------------------------------------ the presets
# stylize: explicit StylizeConfig values. ``chunk`` keeps each render chunk (and so each cancellation check) short;
# the paper preset recomputes chunks in backward (``checkpoint``): 10 views x 224^2 x 64 samples would otherwise
# keep ~55 GB of activations alive (the 22.9 GB out-of-memory of issue 16).
STYLIZE = {
    "draft": {"iterations": 16, "views": 2, "render_resolution": 48, "n_samples": 24, "grid_resolution": 48,
              "eval_views": 2, "preview_every": 4, "preview_resolution": 32, "chunk": 2048, "texture_size": 256},
    "standard": {"iterations": 30, "views": 4, "render_resolution": 64, "n_samples": 32, "grid_resolution": 64,
                 "eval_views": 4, "preview_every": 5, "preview_resolution": 48, "chunk": 4096, "texture_size": 512},
    "paper": {"checkpoint": True, "chunk": 4096},  # StylizeConfig's defaults are ISS++ Sec. 4.2
}

# text-to-shape: job options of backend.pipelines.text_to_shape (stage 2 renders with checkpointed chunks).
# ``texture_size`` / ``texture_faces``: the baked texture and face budget of a result with ``uv_texture`` on (off by
# default; backend.pipelines.uv_texture): unwrapping 8k / 20k / 30k faces takes about 0.6 / 2-4 / 5-10 s on a CPU.
TEXT_TO_SHAPE = {
    "draft": {"iterations": 10, "views": 2, "render_resolution": 48, "n_samples": 24, "field_grid": 32,
              "resolution": 96, "preview_resolution": 24, "texture_iterations": 8,
              "texture_size": 256, "texture_faces": 8000},
    # the CPU view settings of text_to_shape.CPU_VIEW_DEFAULTS, 20 iterations (ISS++ Sec. 4.2)
    "standard": {"iterations": 20, "views": 4, "render_resolution": 64, "n_samples": 32, "field_grid": 32,
                 "resolution": 128, "texture_size": 512, "texture_faces": 20000},
    # ISS++ Sec. 4.2 / the official code: 10 views at 90^2, 48 samples, the decoder queried at every sample
    "paper": {"iterations": 20, "views": 10, "render_resolution": 90, "n_samples": 48, "field_grid": 0,
              "resolution": 128, "texture_size": 1024, "texture_faces": 30000},
}

# gallery: (the workflow's own preset, config overrides on top of it)
GALLERY = {
    "draft": ("preview", {
        "render": {"views": 6, "resolution": 64, "sdf_resolution": 48, "n_samples": 32},
        "reference_views": 6,
        "finetune": {"iterations_single": 20, "iterations_multi": 30, "batch_size": 2},
        "concept": {"steps": 10},
        "lift": {"mesh_resolution": 32},
        "concept_prior": {"augmented_views": 2, "iterations": 10, "augment_steps": 6},
        "optimize": {"iterations": 30, "resolution": 64, "grid_resolution": 48, "n_samples": 32, "mesh_every": 10,
                     "preview_resolution": 32, "target_faces": 20000},
        "score_views": 2,
        "score_resolution": 64,
    }),
    "standard": ("preview", {}),
    "paper": ("paper", {}),
}

WORKFLOWS = ("text-to-shape", "stylize", "gallery")

# Measured on this project's 2-core CPU (one busy thread), ``tests/test_presets.py`` and the README: rough seconds
# of a default job per preset, shown in the panel next to the preset (``None``: not measured; hours).
CPU_SECONDS = {
    "text-to-shape": {"draft": 12, "standard": 20, "paper": None},  # measured (issue 15, `bench speed` + the colour
    # pass): standard 8-22 s command to GLB on 2 busy cores, ~16 s when stage 2 runs all 20 iterations, +3 s colour
    "stylize": {"draft": 20, "standard": 45, "paper": None},  # measured: standard 37-45 s (starter, 1k faces)
    "gallery": {"draft": 40, "standard": None, "paper": None},  # measured: draft 37 s (tiny, 3 items)
}

# ------------------------------------------------------------------------------------------------ memory model
GIB = 2**30
BASE_BYTES = 1.0 * GIB  # a backend process with torch and the small (starter/tiny) models loaded: ~0.8 GiB measured
SAMPLE_BYTES = 2048  # autograd state per volume-render sample of a colour MLP (measured 1.6-1.9 KiB on the CPU)
DECODER_SAMPLE_BYTES = 12 * 1024  # per sample of a 512-wide implicit decoder queried directly (ISS, field_grid 0)
VIEW_BYTES = 48 * 2**20  # per rendered view kept for the CLIP image tower's backward (ViT-B/32 at 224 px)
GRID_BYTES_PER_CELL = 384  # SDF construction (float64 distances, EDT indices, KD-tree queries), density grid + Adam: 0.68 GiB measured at 128^3


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _num(params: dict, key: str, default: float) -> float:
    v = params.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float(default)


def preset_params(workflow: str, preset: str) -> dict:
    """The job options a preset stands for (for the gallery: ``{"preset": ..., "config": ...}``)."""
    if preset not in PRESET_NAMES:
        raise InputError(f"{workflow}: unknown preset {preset!r}; choose draft, standard or paper")
    if workflow == "stylize":
        return dict(STYLIZE[preset])
    if workflow == "text-to-shape":
        return dict(TEXT_TO_SHAPE[preset])
    if workflow == "gallery":
        base, config = GALLERY[preset]
        return {"preset": base, "config": copy.deepcopy(config)}
    return {}


def apply_preset(workflow: str, params: dict, device: str,
                 budget: Optional[tuple[int, str]] = None) -> tuple[dict, Optional[str]]:
    """``params`` with the preset's values filled in under the job's own, and the preset's name.

    ``params["preset"]`` may be draft / standard / paper, ``auto`` or absent (the device's default); for the gallery
    its own preset names (``preview``, ``smoke``) pass through unchanged. Workflows without presets are returned
    as they are (a ``preset`` key is then refused)."""
    params = dict(params)
    if workflow not in WORKFLOWS:
        if "preset" in params:
            raise InputError(f"{workflow} has no quality presets; leave 'preset' out")
        return params, None
    name = params.get("preset", AUTO)
    if name is None:
        name = AUTO
    if not isinstance(name, str):
        raise InputError(f"{workflow}: preset must be draft, standard, paper or auto, got {name!r}")
    if workflow == "gallery" and name not in PRESET_NAMES and name != AUTO:
        return params, name  # the gallery's own presets (preview, smoke) and its own error for unknown ones
    params.pop("preset", None)
    if name == AUTO:
        name = default_preset(workflow, device, params, budget)
    base = preset_params(workflow, name)
    if workflow == "gallery":
        user_cfg = params.get("config")
        if user_cfg is not None and not isinstance(user_cfg, dict):
            raise InputError(f"gallery: config must be a mapping of stage sizes, got {type(user_cfg).__name__}")
        params["preset"] = base["preset"]
        params["config"] = _deep_merge(base["config"], user_cfg or {})
        return params, name
    for k, v in base.items():
        if params.get(k) is None:
            params[k] = v
    return params, name


# ------------------------------------------------------------------------------------------------ estimates
def estimate_peak_bytes(workflow: str, params: dict, base_bytes: float = BASE_BYTES) -> tuple[int, str]:
    """An upper bound of the backend's peak memory for a job with these (preset-filled) params, and what
    dominates it, in words."""
    if workflow == "stylize":
        d = STYLIZE_DEFAULTS
        views = _num(params, "views", d["views"])
        res = _num(params, "render_resolution", d["render_resolution"])
        samples = _num(params, "n_samples", d["n_samples"])
        grid = _num(params, "grid_resolution", d["grid_resolution"])
        chunk = _num(params, "chunk", d["chunk"])
        ckpt = bool(params.get("checkpoint", d["checkpoint"]))
        if params.get("mode") == "sds":
            views = _num(params, "sds_views", d["sds_views"])
        rays = views * res * res
        live = min(rays, chunk) if ckpt else rays
        render = live * samples * SAMPLE_BYTES + rays * 64  # + per-ray outputs kept for the loss
        what = f"{int(views)} views x {int(res)}^2 pixels x {int(samples)} samples"
        if ckpt:
            what += f" (recomputed in chunks of {int(chunk)} rays)"
        grid_b = grid**3 * GRID_BYTES_PER_CELL
        total = base_bytes + render + views * VIEW_BYTES + grid_b
        return int(total), f"{what} and a {int(grid)}^3 grid"
    if workflow == "text-to-shape":
        views = _num(params, "views", 4)
        res = _num(params, "render_resolution", 64)
        samples = _num(params, "n_samples", 32)
        fgrid = _num(params, "field_grid", 32)
        rays = views * res * res
        variants = _num(params, "variants", 1)
        if fgrid > 0:
            dec = fgrid**3 * DECODER_SAMPLE_BYTES
        else:  # the decoder at every sample, chunks of 8192 rays recomputed in backward
            dec = min(rays, 8192) * samples * DECODER_SAMPLE_BYTES
        render = rays * samples * 64
        total = base_bytes + dec + render + views * VIEW_BYTES + _num(params, "resolution", 128) ** 3 * 16
        total += (variants - 1) * 32 * 2**20
        total += 512 * 2**20  # SVR decoder, mapper and prior, stage-1 batches: measured 1.46 GiB peak at standard
        return int(total), f"{int(views)} views x {int(res)}^2 pixels x {int(samples)} samples"
    if workflow == "gallery":
        cfg = _gallery_sizes(params)
        o, r = cfg["optimize"], cfg["render"]
        rays = o["views_per_step"] * o["resolution"] ** 2
        live = min(rays, 8192) if o.get("checkpoint", True) else rays
        dsd = live * o["n_samples"] * SAMPLE_BYTES * 2 + rays * 256  # colour and normal renders
        renders = min(r["views_per_batch"], r["views"]) * r["resolution"] ** 2 * r["n_samples"] * 64
        kept = (max(r["views"], cfg["reference_views"]) * 2 * 3 * r["resolution"] ** 2 * 4
                * max(1, _num(params, "exemplars", 1)))
        grid = max(o["grid_resolution"], r["sdf_resolution"]) ** 3 * GRID_BYTES_PER_CELL
        total = base_bytes + dsd + renders + kept + grid + 512 * 2**20  # + the diffusion model's activations
        return int(total), (f"dual score distillation at {o['resolution']}^2 pixels x {o['n_samples']} samples and "
                            f"a {o['grid_resolution']}^3 grid")
    return int(base_bytes), "the models"


# The gallery's stage sizes that the estimate reads, as theme_gallery.GalleryConfig has them, and its own presets
# (copied so that a ``hello`` never imports torch; tests/test_presets.py checks they match the dataclasses).
GALLERY_DEFAULTS = {
    "render": {"views": 20, "resolution": 512, "sdf_resolution": 128, "n_samples": 128, "views_per_batch": 4},
    "reference_views": 30,
    "optimize": {"iterations": 5000, "resolution": 512, "grid_resolution": 192, "n_samples": 128,
                 "views_per_step": 1, "checkpoint": True},
}
GALLERY_OWN_PRESETS = {
    "paper": {},
    "preview": {"render": {"views": 8, "resolution": 128, "sdf_resolution": 64, "n_samples": 64},
                "reference_views": 8,
                "optimize": {"iterations": 200, "resolution": 128, "grid_resolution": 64, "n_samples": 64}},
    "smoke": {"render": {"views": 3, "resolution": 16, "sdf_resolution": 16, "n_samples": 12},
              "reference_views": 3,
              "optimize": {"iterations": 2, "resolution": 16, "grid_resolution": 16, "n_samples": 12}},
}


# StylizeConfig's defaults that the estimate reads (checked against the dataclass in tests/test_presets.py)
STYLIZE_DEFAULTS = {"views": 10, "render_resolution": 224, "n_samples": 64, "grid_resolution": 128, "chunk": 32768,
                    "checkpoint": False, "sds_views": 1}


def _gallery_sizes(params: dict) -> dict:
    """The gallery's stage sizes (the part the estimate reads) for its ``preset`` and ``config``."""
    sizes = _deep_merge(GALLERY_DEFAULTS, GALLERY_OWN_PRESETS.get(params.get("preset") or "paper", {}))
    cfg = params.get("config") if isinstance(params.get("config"), dict) else {}
    for k in ("render", "optimize"):
        if isinstance(cfg.get(k), dict):
            sizes[k].update({kk: v for kk, v in cfg[k].items() if kk in sizes[k]})
    if isinstance(cfg.get("reference_views"), int):
        sizes["reference_views"] = cfg["reference_views"]
    return sizes


# ------------------------------------------------------------------------------------------------ memory budget
def _cgroup_limit() -> Optional[int]:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def process_rss() -> int:
    """This process's resident memory (``VmRSS`` of /proc/self/status; 0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_budget(device: str) -> tuple[int, str]:
    """Bytes a job may take on ``device``, and a description of them.

    CUDA: the GPU's total memory. CPU: the smallest of the machine's RAM, the cgroup limit and what is free now plus
    what this backend already holds; ``STEPSTONE_MEMORY_LIMIT_GB`` caps it (for a shared machine, and tests)."""
    env = os.environ.get("STEPSTONE_MEMORY_LIMIT_GB")
    if device.startswith("cuda"):
        import torch

        total = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        if env:
            total = min(total, int(float(env) * GIB))
        return total, f"the GPU's {total / GIB:.1f} GiB"
    import psutil

    vm = psutil.virtual_memory()
    have = min(int(vm.total), int(vm.available) + process_rss())
    cg = _cgroup_limit()
    where = "this machine's free memory"
    if cg is not None and cg < have:
        have, where = cg, "the memory limit of this backend's container"
    if env:
        lim = int(float(env) * GIB)
        if lim < have:
            have, where = lim, "STEPSTONE_MEMORY_LIMIT_GB"
    return have, f"{where} ({have / GIB:.1f} GiB, CPU)"


USABLE = 0.85  # leave room for the rest of the process and the system


def fits(workflow: str, params: dict, budget: tuple[int, str]) -> bool:
    need, _ = estimate_peak_bytes(workflow, params)
    return need <= USABLE * budget[0]


def default_preset(workflow: str, device: str, params: Optional[dict] = None,
                   budget: Optional[tuple[int, str]] = None) -> str:
    """The preset a job gets when it names none: ``paper`` on a GPU when it fits, else ``standard`` (the CPU
    default; the gallery's paper preset takes over an hour per item even on an H100, so the gallery stays at
    ``standard`` on a GPU and ``draft`` on a CPU); smaller when the memory estimate does not fit."""
    budget = budget or memory_budget(device)
    gpu = device.startswith("cuda")
    if workflow == "gallery":
        order = ["standard", "draft"] if gpu else ["draft"]
    else:
        order = ["paper", "standard", "draft"] if gpu else ["standard", "draft"]
    for name in order:
        p, _ = apply_preset(workflow, {**(params or {}), "preset": name}, device, budget)
        if fits(workflow, p, budget):
            return name
    return "draft"


def check_memory(workflow: str, params: dict, preset: Optional[str], device: str,
                 budget: Optional[tuple[int, str]] = None) -> None:
    """Refuse (InputError) a job whose memory estimate does not fit, naming the preset that does."""
    if workflow not in WORKFLOWS:
        return
    budget = budget or memory_budget(device)
    need, what = estimate_peak_bytes(workflow, params)
    if need <= USABLE * budget[0]:
        return
    hint = ""
    for name in reversed(PRESET_NAMES):
        if name == preset:
            continue
        base = {k: v for k, v in params.items() if k in ("mode", "variants", "style", "prompt", "strength")}
        p, _ = apply_preset(workflow, {**base, "preset": name}, device, budget)
        n, _ = estimate_peak_bytes(workflow, p)
        if n <= USABLE * budget[0] and PRESET_NAMES.index(name) < PRESET_NAMES.index(preset or "paper"):
            hint = f" Choose the {name.capitalize()} preset (about {n / GIB:.1f} GiB), which fits."
            break
    if not hint:
        hint = " Lower views, render_resolution or n_samples, or free memory on the backend's machine."
    label = f"the {preset.capitalize()} preset" if preset in PRESET_NAMES else "these settings"
    raise InputError(f"{workflow} at {label} needs about {need / GIB:.1f} GiB ({what}), more than "
                     f"{budget[1]} can hold, so it was not started.{hint}", code="too_large")


def describe(device: str, budget: Optional[tuple[int, str]] = None, timings: Optional[dict] = None,
             timing_key=None) -> dict:
    """What the ``welcome`` tells clients: per workflow the presets, the default, and for each its memory
    estimate, whether it fits and its expected seconds on this backend: ``measured`` when a job at that preset
    finished here before (``timings[timing_key(workflow, preset)]``), else the CPU estimate (``None``: unknown)."""
    budget = budget or memory_budget(device)
    out: dict[str, Any] = {"memory_gib": round(budget[0] / GIB, 1), "memory": budget[1]}
    gpu = device.startswith("cuda")
    for wf in WORKFLOWS:
        entry: dict[str, Any] = {"names": list(PRESET_NAMES), "default": default_preset(wf, device, None, budget),
                                 "presets": {}}
        for name in PRESET_NAMES:
            p, _ = apply_preset(wf, {"preset": name}, device, budget)
            need, what = estimate_peak_bytes(wf, p)
            measured = (timings or {}).get(timing_key(wf, name)) if timing_key is not None else None
            entry["presets"][name] = {
                "peak_gib": round(need / GIB, 1),
                "fits": need <= USABLE * budget[0],
                "seconds": round(measured, 1) if measured is not None else
                (None if gpu else CPU_SECONDS.get(wf, {}).get(name)),
                "measured": measured is not None,
                "what": what,
            }
        out[wf] = entry
    return out
