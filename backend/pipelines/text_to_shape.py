"""Workflow "text-to-shape": ISS++ two-stage alignment, diversity, SDS refinement, and the Dream3D route.

Paper 000 (ISS++): the CLIP text feature f_T goes through the stage-1 mapper M to an SVR shape latent; stage 2
fine-tunes a copy M' per prompt with the CLIP consistency loss (Eq. 4) and the background loss (Eq. 3) on m random
views (Sec. 3.3.2); N variants blend diffusion-prior samples into the target (Eq. 5, tau); quality "refined"
fine-tunes the decoder with score distillation (Sec. 3.4.2, Eq. 7); a colour pass then fine-tunes the decoder's colour
network D_c alone with the prompt (ISS++ texture stylization, Sec. 3.4.1; :mod:`backend.pipelines.iss_texture`,
``texture_iterations``, 0 = off). Paper 001 (Dream3D): ``method="dream3d"``
takes the stage-2 shape (or, with ``shape_prior="image"``, a text -> rendering-style image -> shape prior) as the
3D shape prior, initialises a density grid by Eq. 9 and optimises it with CLIP (Eq. 1), random backgrounds, the
transmittance loss and the shape-prior-preserving loss (Eq. 4). The stages live in
:mod:`backend.pipelines.iss_stages` and :mod:`backend.pipelines.dream3d`. On a profile with the Shap-E 3D prior
(``pretrained``) the default route is ``shape_prior="shap-e"`` (issue 13, :mod:`backend.pipelines.shap_e_route`):
Shap-E's shape is the Dream3D prior; :func:`resolve_route` picks the route when ``method`` / ``shape_prior`` are
not given.

Events: ``Progress`` every iteration (stages "align", "refine", "colour", "dream3d"), an intermediate ``MeshUpdate`` every
``preview_every`` iterations (marching cubes at ``preview_resolution``), one final ``MeshUpdate`` per variant
(name ``variant_<k>``) at ``resolution`` with vertex colours; ``ctx.cancel.check()`` at every iteration.

Prompts: surrounding whitespace and control characters are removed and the text is NFC-normalised; an empty prompt
is an :class:`InputError`; prompts longer than :data:`MAX_PROMPT_CHARS` characters are rejected with an
InputError that says so (a 10,000-character prompt is far beyond what CLIP reads); a prompt within the limit but
longer than CLIP's context (77 tokens) is truncated by the tokenizer, and the run says so in a Progress message
and in the final meshes' ``info`` ("prompt_truncated"). Non-ASCII text goes unchanged to open_clip's byte-level
BPE tokenizer, which encodes every Unicode character (no unknown tokens).
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import unicodedata
from dataclasses import replace
from typing import Any, Iterator, Optional

import torch

from backend.errors import InputError, ModelUnavailable
from backend.events import Event, Image, JobContext, MeshInput, MeshUpdate, Progress
from backend.fields import field_color_fn
from backend.losses.clip_consistency import blend_target
from backend.pipelines.dream3d import (
    Dream3DConfig,
    Dream3DOptimizer,
    density_mesh,
    image_shape_prior,
    init_density_grid,
    prior_sdf_from_decoder,
    surface_level,
)
from backend.pipelines.iss_stages import (
    SDSConfig,
    SDSRefiner,
    Stage2Aligner,
    Stage2Config,
    ViewConfig,
    decoder_mesh,
    sample_diversity_features,
    stage1_latent,
)
from backend.pipelines import uv_texture
from backend.pipelines.iss_texture import TextureAligner, TextureConfig

log = logging.getLogger(__name__)

NAME = "text-to-shape"
MAX_PROMPT_CHARS = 1000  # far more than CLIP's 77 tokens can read; longer input is almost surely a paste error
MAX_VARIANTS = 16
QUALITIES = ("fast", "refined")
METHODS = ("iss", "dream3d")
SHAPE_PRIORS = ("iss", "image", "shap-e")
STAGE2_TUNES = ("output", "mapper")

DEFAULTS: dict[str, Any] = {
    "variants": 1,
    "seed": None,  # None: the job context's seed
    "quality": "fast",
    "method": None,  # None: the profile's route (resolve_route): iss, or dream3d on a Shap-E profile
    "shape_prior": None,  # None: iss, or shap-e on a Shap-E profile
    "tau": 0.5,  # ISS++ Eq. 5, Sec. 4.2 (0: stage 2 follows f_T alone, Eq. 4)
    "iterations": None,  # stage-2 iterations (None: 20, Sec. 4.2)
    "refine_iterations": None,  # SDS iterations (None: SDSConfig default)
    "dream3d_iterations": None,  # Dream3D iterations (None: Dream3DConfig default)
    "texture_iterations": None,  # colour pass, ISS++ texture stylization with the prompt (None: TextureConfig's)
    "resolution": 128,  # marching cubes of the final mesh
    "preview_resolution": 32,  # marching cubes of intermediate meshes
    "preview_every": 5,  # iterations between intermediate meshes
    "views": None,  # m (None: 10, Sec. 4.2)
    "render_resolution": None,  # None: 90 (official ISS code)
    "field_grid": None,  # stage-2 rendering through a decoded grid of this size (None: 0 = direct; 32 on a CPU)
    "n_samples": None,  # samples per ray
    "lr": None,  # stage-2 Adam learning rate of tune "mapper" (None: 1e-4)
    "stage2_tune": None,  # what stage 2 fine-tunes (None: "mapper", all of M', ISS++ as published; "output": the
    # bias of M's last layer by normalised steps, ours); see Stage2Config.tune
    "latent_step": None,  # stage-2 step of tune "output" as a fraction of |M(f_T)| (None: 0.005)
    "clip_augments": None,  # random crops per stage-2 view for the CLIP loss (None: 0 = ISS++)
    "latent_subspace": None,  # stage 2 along the mapper's leading N latent directions (None/0: whole latent, ISS++)
    "grid_resolution": None,  # Dream3D density grid (None: 64)
    "prior_image_steps": None,  # DDIM steps of Dream3D's text -> image prior (None: 30)
    "prior_steps": None,  # Shap-E sampling steps (None: 64)
    "prior_guidance": None,  # Shap-E classifier-free guidance (None: 15)
    "prior_resolution": None,  # Shap-E decoding grid (None: 128 on a GPU, 64 on a CPU)
    # pipeline-ready finals (issue 16, backend.pipelines.uv_texture): decimate, unwrap UVs, bake a texture
    "uv_texture": False,
    "texture_size": None,  # None: the preset's (256 / 512 / 1024), else 512
    "texture_faces": None,  # None: the preset's (8k / 20k / 30k faces), else 20k
}

_INT_RANGES = {
    "variants": (1, MAX_VARIANTS),
    "iterations": (0, 1000),
    "refine_iterations": (0, 10000),
    "dream3d_iterations": (0, 20000),
    "texture_iterations": (0, 1000),
    "resolution": (16, 512),
    "preview_resolution": (8, 256),
    "preview_every": (1, 100000),
    "views": (1, 64),
    "latent_subspace": (0, 4096),
    "clip_augments": (0, 32),
    "render_resolution": (8, 512),
    "field_grid": (0, 128),
    "n_samples": (2, 512),
    "grid_resolution": (8, 256),
    "prior_image_steps": (1, 500),
    "prior_steps": (1, 1000),
    "prior_resolution": (16, 256),
}

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalize_prompt(prompt: Any) -> str:
    """NFC-normalised prompt without control characters and outer whitespace; raises InputError if unusable."""
    if not isinstance(prompt, str):
        raise InputError("the prompt must be text, e.g. \"a red swivel chair\"")
    text = unicodedata.normalize("NFC", prompt)
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        raise InputError("the prompt is empty; describe the shape to make, e.g. \"a red swivel chair\"")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"the prompt has {len(text):,} characters, more than the limit of {MAX_PROMPT_CHARS:,}; CLIP reads only "
            "about the first 50-70 words, so shorten it to the words that describe the shape"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help=f"what to make (at most {MAX_PROMPT_CHARS} characters)")
    parser.add_argument("--variants", type=int, default=1, help="number of different shapes (ISS++ Eq. 5)")
    parser.add_argument("--quality", choices=QUALITIES, default="fast",
                        help="fast: two-stage alignment; refined: + SDS refinement (needs a diffusion model)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="iss: ISS++; dream3d: a shape prior, then Dream3D CLIP optimisation of a grid "
                             "(default: the profile's route)")
    parser.add_argument("--shape-prior", choices=SHAPE_PRIORS, default=None,
                        help="Dream3D prior: iss (stage-2 shape), image (text -> image -> shape) or shap-e "
                             "(default: shap-e on the pretrained profile, else iss)")
    parser.add_argument("--tau", type=float, default=0.5, help="diversity vs. text consistency (Eq. 5), 0..1")
    parser.add_argument("--latent-subspace", type=int, default=None,
                        help="stage 2 moves the shape latent only along the mapper's leading N principal directions "
                             "(0 or unset: the whole latent, as ISS++)")
    parser.add_argument("--stage2-tune", choices=STAGE2_TUNES, default=None,
                        help="what stage 2 fine-tunes: mapper (every weight of M' with Adam, ISS++ as published, "
                             "default) or output (the mapper's output bias by normalised gradient steps)")
    parser.add_argument("--latent-step", type=float, default=None,
                        help="stage-2 step of --stage2-tune output, as a fraction of |M(f_T)| (default 0.005)")
    parser.add_argument("--clip-augments", type=int, default=None,
                        help="random crops per stage-2 view for the CLIP loss (default 0, ISS++)")
    parser.add_argument("--iterations", type=int, default=None, help="stage-2 iterations (default 20)")
    parser.add_argument("--refine-iterations", type=int, default=None, help="SDS refinement iterations")
    parser.add_argument("--dream3d-iterations", type=int, default=None, help="Dream3D optimisation iterations")
    parser.add_argument("--texture-iterations", type=int, default=None,
                        help="colour pass (ISS++ texture stylization with the prompt; 0 = off, default 15)")
    parser.add_argument("--resolution", type=int, default=128, help="marching-cubes resolution of the result")
    parser.add_argument("--preview-every", type=int, default=None,
                        help="iterations between intermediate meshes (default: none; `run` writes only the final ones)")
    parser.add_argument("--views", type=int, default=None, help="views per stage-2 iteration (m, default 10)")
    parser.add_argument("--render-resolution", type=int, default=None, help="render size for CLIP (default 90)")
    parser.add_argument("--grid-resolution", type=int, default=None, help="Dream3D density grid (default 64)")
    parser.add_argument("--prior-steps", type=int, default=None, help="Shap-E sampling steps (default 64)")
    parser.add_argument("--prior-resolution", type=int, default=None,
                        help="Shap-E decoding grid (default 128 on a GPU, 64 on a CPU)")
    uv_texture.add_arguments(parser)


def params_from_args(args: argparse.Namespace) -> tuple[dict, list[MeshInput]]:
    params = {
        "prompt": args.prompt,
        "variants": args.variants,
        "seed": getattr(args, "seed", None),
        "quality": args.quality,
        "method": args.method,
        "shape_prior": args.shape_prior,
        "tau": args.tau,
        "latent_subspace": getattr(args, "latent_subspace", None),
        "stage2_tune": getattr(args, "stage2_tune", None),
        "clip_augments": getattr(args, "clip_augments", None),
        "latent_step": getattr(args, "latent_step", None),
        "iterations": args.iterations,
        "refine_iterations": args.refine_iterations,
        "dream3d_iterations": args.dream3d_iterations,
        "texture_iterations": getattr(args, "texture_iterations", None),
        "resolution": args.resolution,
        "preview_every": args.preview_every or _INT_RANGES["preview_every"][1],  # no previews nobody sees
        "views": args.views,
        "render_resolution": args.render_resolution,
        "grid_resolution": getattr(args, "grid_resolution", None),
        "prior_steps": getattr(args, "prior_steps", None),
        "prior_resolution": getattr(args, "prior_resolution", None),
        **uv_texture.params_from_args(args),
    }
    return params, []


def _as_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise InputError(f"{name} must be a whole number, got {value!r}")
    lo, hi = _INT_RANGES.get(name, (-(2 ** 63), 2 ** 63 - 1))
    if not lo <= int(value) <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


def validate(params: dict, inputs: list[MeshInput], profile: Any = None) -> dict:
    """Normalise and check the job parameters (no models are loaded); unknown keys are an InputError.

    With ``profile`` also checks that the profile offers the chosen options (:func:`check_capabilities`).
    """
    if inputs:
        raise InputError("text-to-shape takes no input meshes; deselect the objects or use stylize")
    unknown = sorted(set(params) - set(DEFAULTS) - {"prompt"})
    if unknown:
        raise InputError(f"unknown text-to-shape option(s): {', '.join(unknown)}; known: prompt, "
                         + ", ".join(DEFAULTS))
    if "prompt" not in params:
        raise InputError("text-to-shape needs a prompt, e.g. \"a red swivel chair\"")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in params.items() if v is not None or k == "seed"})
    out["prompt"] = normalize_prompt(params["prompt"])
    for name in _INT_RANGES:
        out[name] = _as_int(name, out.get(name))
    out.update(uv_texture.check_options(out, NAME))
    if out["seed"] is not None:
        out["seed"] = _as_int("seed", out["seed"])
    for name, choices in (("quality", QUALITIES), ("method", METHODS), ("shape_prior", SHAPE_PRIORS)):
        if out[name] is None and name != "quality":
            continue  # the profile's route (resolve_route)
        if out[name] not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, got {out[name]!r}")
    try:
        tau = float(out["tau"])
    except (TypeError, ValueError):
        raise InputError(f"tau must be a number in [0, 1], got {out['tau']!r}") from None
    if not 0.0 <= tau <= 1.0:
        raise InputError(f"tau must lie in [0, 1] (0: follow the text only, 1: most diverse), got {tau}")
    out["tau"] = tau
    if out["lr"] is not None:
        lr = float(out["lr"])
        if not 0.0 < lr < 1.0:
            raise InputError(f"lr must lie in (0, 1), got {lr}")
        out["lr"] = lr
    if out["stage2_tune"] is not None and out["stage2_tune"] not in STAGE2_TUNES:
        raise InputError(f"stage2_tune must be one of {', '.join(STAGE2_TUNES)}, got {out['stage2_tune']!r}")
    if out["latent_step"] is not None:
        try:
            step = float(out["latent_step"])
        except (TypeError, ValueError):
            raise InputError(f"latent_step must be a number in (0, 1), got {out['latent_step']!r}") from None
        if not 0.0 < step < 1.0:
            raise InputError(f"latent_step must lie in (0, 1), got {step}")
        out["latent_step"] = step
    if out["prior_guidance"] is not None:
        g = float(out["prior_guidance"])
        if not 0.0 <= g <= 100.0:
            raise InputError(f"prior_guidance must lie in [0, 100], got {g}")
        out["prior_guidance"] = g
    if profile is not None:
        out = resolve_route(out, profile)
        check_capabilities(out, profile)
    return out


def resolve_route(params: dict, profile: Any) -> dict:
    """Fill ``method`` / ``shape_prior`` left open with the profile's route: Shap-E + Dream3D on a profile with the
    Shap-E 3D prior (issue 13), ISS++ elsewhere."""
    out = dict(params)
    shap = bool(getattr(profile, "has_3d_prior", lambda: False)())
    if out.get("shape_prior") is None:
        out["shape_prior"] = "shap-e" if shap and out.get("method") in (None, "dream3d") else "iss"
    if out.get("method") is None:
        out["method"] = "dream3d" if out["shape_prior"] in ("shap-e", "image") else "iss"
    if out["shape_prior"] == "shap-e" and out["method"] != "dream3d":
        raise InputError("the Shap-E shape prior is refined by Dream3D: use method \"dream3d\" (or leave it out)")
    return out


def check_capabilities(params: dict, profile: Any) -> None:
    """Raise :class:`ModelUnavailable` with the profile's own reason when it cannot run these options."""
    params = resolve_route(params, profile)
    if params["shape_prior"] == "shap-e":
        st = profile.component("shap-e")
        if not st.present:
            raise ModelUnavailable(f"text-to-shape with the Shap-E prior is not available with the "
                                   f"{profile.name!r} profile: {st.reason()}")
    elif getattr(profile, "has_3d_prior", lambda: False)():
        missing = [k for k in ("svr", "mapper") if not profile.component(k).present]
        if missing:
            raise ModelUnavailable(f"method {params['method']!r} with shape prior {params['shape_prior']!r} needs the "
                                   f"ISS models, which the {profile.name!r} profile does not have: "
                                   + "; ".join(profile.component(k).reason() for k in missing)
                                   + "; leave method and shape_prior out to use its Shap-E route")
    caps = profile.capabilities().get(NAME, {})
    if not caps.get("available", False):
        raise ModelUnavailable(f"text-to-shape is not available with the {profile.name!r} profile: "
                               f"{caps.get('reason', 'no reason given')}")
    q = caps.get("options", {}).get("quality", {}).get(params["quality"], {"available": True})
    if not q.get("available", True):
        raise ModelUnavailable(f"quality {params['quality']!r} is not available with the {profile.name!r} profile "
                               f"(it needs a text-to-image diffusion model for SDS): {q.get('reason', '')}")
    if params["method"] == "dream3d" and params["shape_prior"] == "image":
        missing = [k for k in ("diffusion", "svr") if not profile.component(k).present]
        if missing:
            reasons = "; ".join(profile.component(k).reason() for k in missing)
            raise ModelUnavailable(f"the Dream3D image shape prior needs a text-to-image model and the SVR encoder: "
                                   f"{reasons}")


# --------------------------------------------------------------------------------------------- configs from params


# Lighter stage-2 rendering when running on a CPU (the paper's 10 views x 90^2 x 48 samples are 3.9 M decoder
# queries per iteration: minutes per shape on a laptop): 4 views at the starter CLIP's 64 px, rendered through a
# decoded 32^3 grid (33 k decoder queries per iteration, see CachedDecoderField); explicit job options always win.
CPU_VIEW_DEFAULTS = {"views": 4, "render_resolution": 64, "n_samples": 32, "field_grid": 32}


# job option -> Stage2Config field, and whether 0 is a value (iterations 0 skips stage 2) rather than "the default"
_STAGE2_OPTIONS = (("iterations", "iterations", True), ("views", "views", False), ("lr", "lr", False),
                   ("latent_subspace", "latent_subspace", True), ("stage2_tune", "tune", False),
                   ("latent_step", "latent_step", False), ("clip_augments", "clip_augments", True))


def stage2_config(params: dict, device: str = "cuda") -> Stage2Config:
    """Stage2Config (Sec. 4.2 defaults; :data:`CPU_VIEW_DEFAULTS` on a CPU) with the job's overrides."""
    if device == "cpu":
        params = dict(params)
        for k, v in CPU_VIEW_DEFAULTS.items():
            if params.get(k) is None:
                params[k] = v
    cfg = Stage2Config()
    view = cfg.view
    if params.get("render_resolution"):
        view = replace(view, resolution=params["render_resolution"])
    if params.get("n_samples"):
        view = replace(view, n_samples=params["n_samples"])
    if params.get("field_grid") is not None:
        view = replace(view, field_grid=params["field_grid"])
    if device != "cpu":
        # issue 15: 32 k-ray checkpointed chunks on a GPU (4x fewer launches and recomputations than 8 k; memory
        # still bounded by one chunk: about 2 GB for the paper's 512-wide decoder at 64 samples)
        view = replace(view, chunk=max(view.chunk, 32768))
    cfg = replace(cfg, view=view)
    for key, name, zero_counts in _STAGE2_OPTIONS:
        value = params.get(key)
        if value is not None and (zero_counts or value):
            cfg = replace(cfg, **{name: value})
    return cfg


def texture_config(params: dict, s2: Optional[Stage2Config] = None) -> TextureConfig:
    """TextureConfig of the colour pass with the job's overrides; views, render size and samples per ray follow
    stage 2's (``s2``, e.g. the CPU view settings)."""
    cfg = TextureConfig()
    if s2 is not None:
        cfg = replace(cfg, views=s2.views, resolution=s2.view.resolution, n_samples=s2.view.n_samples)
    if params.get("texture_iterations") is not None:
        cfg = replace(cfg, iterations=params["texture_iterations"])
    return cfg


def sds_config(params: dict, view: ViewConfig) -> SDSConfig:
    cfg = SDSConfig(view=view)
    if params.get("refine_iterations") is not None:
        cfg = replace(cfg, iterations=params["refine_iterations"])
    if params.get("render_resolution"):
        cfg = replace(cfg, resolution=params["render_resolution"])
    if params.get("n_samples"):
        cfg = replace(cfg, n_samples=params["n_samples"])
    return cfg


def dream3d_config(params: dict, view: ViewConfig) -> Dream3DConfig:
    cfg = Dream3DConfig(view=view)
    if params.get("dream3d_iterations") is not None:
        cfg = replace(cfg, iterations=params["dream3d_iterations"])
    if params.get("grid_resolution"):
        cfg = replace(cfg, grid_resolution=params["grid_resolution"])
    if params.get("render_resolution"):
        cfg = replace(cfg, resolution=params["render_resolution"])
    if params.get("views"):
        cfg = replace(cfg, views=params["views"])
    if params.get("n_samples"):
        cfg = replace(cfg, n_samples=params["n_samples"])
    if params.get("prior_image_steps"):
        cfg = replace(cfg, image_steps=params["prior_image_steps"])
    return cfg


# --------------------------------------------------------------------------------------------- helpers


class _HFText:
    """encode/decode without special tokens, the interface of open_clip's SimpleTokenizer."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def prompt_truncation(clip: Any, prompt: str) -> Optional[str]:
    """The part of ``prompt`` CLIP actually reads when it is longer than the context, else None."""
    tok = getattr(clip, "_tokenizer", None)
    hf = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a Hugging Face tokenizer
    if hf is not None and hasattr(hf, "encode"):
        tok = _HFText(hf)
    if tok is None or not hasattr(tok, "encode"):
        return None
    ids = tok.encode(prompt)
    room = int(getattr(clip, "context_length", 77)) - 2  # start and end tokens
    if len(ids) <= room:
        return None
    return tok.decode(ids[:room]).strip()


def decoder_color_fn(decoder: Any, z: torch.Tensor, device: str, chunk: int = 16384):
    """The SVR decoder's colour D_c at points (N, 3) of the unit cube -> (N, 3) float in [0, 1] (the colours
    :func:`decoder_mesh` gives the vertices): what a UV texture bakes (:mod:`backend.pipelines.uv_texture`)."""
    import numpy as np

    from backend.events import checkpoint as cancel_checkpoint

    zz = z.reshape(1, -1).to(device)

    @torch.no_grad()
    def color_fn(points):
        p = torch.as_tensor(np.asarray(points, dtype=np.float32), device=device)[None]
        cols = []
        for s in range(0, p.shape[1], chunk):
            cancel_checkpoint()
            cols.append(decoder(p[:, s:s + chunk], zz)[1][0].float().cpu())
        return torch.cat(cols).clamp(0, 1).numpy() if cols else np.zeros((0, 3), np.float32)

    return color_fn


def _mesh_event(mesh, name: str, final: bool, info: dict) -> Optional[MeshUpdate]:
    v, f, c = mesh
    if len(f) == 0:
        return None
    return MeshUpdate(vertices=v, faces=f, colors=c, final=final, name=name, info=dict(info))


def _iterate(ctx: JobContext, stage: str, iterations: int, step: Any, preview: Any, every: int):
    """Run an optimiser's ``step()`` ``iterations`` times as a job does: a cancellation check before each, a
    ``Progress`` with its loss terms after each, and ``preview(i)`` (a MeshUpdate or None) every ``every`` iterations
    but the last. Returns the last step's terms (use with ``yield from``)."""
    terms: dict[str, float] = {}
    for i in range(iterations):
        ctx.cancel.check()
        with ctx.autocast():  # bf16 autocast on CUDA by default (issue 15); float32 on a CPU
            terms = step()
        yield Progress(stage, i + 1, iterations, " ".join(f"{a}={b:.4f}" for a, b in terms.items()))
        if (i + 1) % every == 0 and i + 1 < iterations:
            ev = preview(i + 1)
            if ev is not None:
                yield ev
    return terms


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image as PILImage

    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


UNFAMILIAR_BELOW = 0.3  # cosine of f_T with the closest "a <subject>"; synonyms and sentences score 0.4-0.8


def unfamiliar_prompt(profile: Any, clip: Any, f_text: torch.Tensor) -> str:
    """A warning when the prompt is far from every subject the profile's shape models know ("" otherwise).

    The starter models know 13 kinds of object; a prompt in a language or about a thing they never saw still gives
    a shape, so the artist is told what the models understood instead of getting an unrelated blob in silence.
    """
    subjects = profile.subjects() if hasattr(profile, "subjects") else None
    if not subjects:
        return ""
    with torch.no_grad():
        known = clip.encode_text([f"a {s}" for s in subjects]).to(f_text.device)
        sims = (known @ f_text.reshape(-1, 1)).flatten()
    best = int(sims.argmax())
    if float(sims[best]) >= UNFAMILIAR_BELOW:
        return ""
    return (f"the {profile.name} models may not understand this prompt: the closest thing they know is "
            f"\"{subjects[best]}\" (similarity {float(sims[best]):.2f}); they know {', '.join(subjects)}, in English")


def consistency_targets(profile: Any, f_text: torch.Tensor, n: int, tau: float,
                        seed: int) -> tuple[list[torch.Tensor], list[int], str]:
    """Stage-2 targets of ``n`` variants (ISS++ Eq. 5), the seed of each variant's random views, and a note.

    With a diffusion prior each variant blends its own prior sample f_{T->I} into f_T with weight ``tau``; without
    one, variants differ only by their random views (the note says so).
    """
    targets = [f_text[0]] * n
    view_seeds = [seed] * n
    if tau <= 0:
        return targets, view_seeds, ""
    prior_cap = profile.capabilities()[NAME]["options"].get("diversity", {}).get("prior", {})
    if n > 1 and not prior_cap.get("available", False):
        return targets, [seed + k for k in range(n)], ("no diffusion prior in this profile: variants differ only by "
                                                       f"their random views ({prior_cap.get('reason', '')})")
    if n > 1 or profile.component("prior").present:
        f_ti = sample_diversity_features(profile.prior(), f_text[0], n, seed)
        targets = [blend_target(f_text[0], f_ti[k], tau) for k in range(n)]
        return targets, view_seeds, "sampled the diffusion prior (ISS++ Eq. 5)" if n > 1 else ""
    return targets, view_seeds, ""


def colour_targets(profile: Any, f_text: torch.Tensor, n: int, tau: float, targets: list[torch.Tensor],
                   tc: TextureConfig, seed: int) -> list[torch.Tensor]:
    """The colour pass's CLIP target per variant (:attr:`TextureConfig.target`).

    "blend": Eq. 5's blend, which colours better than f_T (see TextureConfig): for one shape whose stage 2 followed
    f_T alone (Eq. 4, ``tau = 0``) the blend at ``tc.tau`` with the prior sample of the shape's seed; otherwise the
    stage-2 targets (variants keep the job's tau: 0 makes them identical, more makes them diverse). "text": f_T.
    """
    if tc.target == "text":
        return [f_text[0]] * n
    if tau > 0 or n > 1 or tc.tau <= 0:
        return targets
    return consistency_targets(profile, f_text, n, tc.tau, seed)[0]


# --------------------------------------------------------------------------------------------- run


def run(params: dict, inputs: list[MeshInput], ctx: JobContext) -> Iterator[Event]:
    """Generate ``variants`` shapes for the prompt; see the module docstring for the events."""
    params = validate(params, inputs)
    profile, device = ctx.profile, ctx.device
    params = resolve_route(params, profile)
    check_capabilities(params, profile)
    seed = int(params["seed"] if params["seed"] is not None else ctx.seed)
    if params["shape_prior"] == "shap-e":  # issue 13: Shap-E prior + Dream3D
        from backend.pipelines import shap_e_route

        yield from shap_e_route.run(params, ctx, seed)
        return
    n = params["variants"]
    prompt = params["prompt"]
    s2 = stage2_config(params, device)
    total_align = s2.iterations

    yield Progress("load", 0, 1, f"loading models ({profile.name})")
    clip, mapper, svr = profile.clip(), profile.mapper(), profile.svr()
    ctx.cancel.check()

    info_base: dict[str, Any] = {"prompt": prompt, "seed": seed, "quality": params["quality"],
                                 "method": params["method"], "tau": params["tau"]}
    kept = prompt_truncation(clip, prompt)
    if kept is not None:
        info_base["prompt_truncated"] = True
        msg = f"prompt longer than CLIP's {clip.context_length} tokens; it reads only: \"{kept}\""
        log.warning(msg)
        yield Progress("load", 0, 1, msg)
    with torch.no_grad():
        f_text = clip.encode_text([prompt]).to(device)
    warning = unfamiliar_prompt(profile, clip, f_text)
    if warning:
        info_base["prompt_unfamiliar"] = warning
        log.warning(warning)
        yield Progress("load", 0, 1, warning)

    targets, view_seeds, note = consistency_targets(profile, f_text, n, params["tau"], seed)
    if note:
        yield Progress("diversity", 0, 1, note)
    tc = texture_config(params, s2)
    tex_targets = (colour_targets(profile, f_text, n, params["tau"], targets, tc, seed)
                   if params["method"] != "dream3d" and tc.iterations > 0 else targets)

    bundle = None
    if params["quality"] == "refined" or (params["method"] == "dream3d" and params["shape_prior"] == "image"):
        yield Progress("load", 0, 1, "loading the text-to-image model")
        bundle = profile.diffusion()

    every = params["preview_every"]
    tex_opts = uv_texture.options(params)
    for k in range(n):
        name = f"variant_{k}"
        gen = torch.Generator().manual_seed(view_seeds[k])
        info = dict(info_base, variant=k)
        decoder = svr.decoder
        z = stage1_latent(mapper, f_text)
        ctx.cancel.check()
        preview = _mesh_event(decoder_mesh(decoder, z, params["preview_resolution"], device, allow_empty=True),
                              name, False, dict(info, stage="stage-1"))
        if preview is not None:
            yield preview

        # ---- stage 2 (ISS++ Sec. 3.3.2)
        aligner = Stage2Aligner(mapper, decoder, clip, f_text, targets[k], s2, gen, device)
        stage = f"align {k + 1}/{n}" if n > 1 else "align"

        def stage2_preview(i: int) -> Optional[MeshUpdate]:
            with torch.no_grad():
                z2 = aligner.latent()
            return _mesh_event(decoder_mesh(decoder, z2, params["preview_resolution"], device, allow_empty=True),
                               name, False, dict(info, stage="stage-2", iteration=i))

        terms = yield from _iterate(ctx, stage, total_align, aligner.step, stage2_preview, every)
        with torch.no_grad():
            z = aligner.latent().detach()
        info.update({f"align_{a}": b for a, b in terms.items() if a in ("clip", "bg")})
        if aligner.stopped:
            info["align_stopped"] = aligner.stopped
            yield Progress(stage, total_align, total_align, aligner.stopped)

        # ---- SDS refinement (ISS++ Sec. 3.4.2)
        if params["quality"] == "refined":
            sc = sds_config(params, s2.view)
            refiner = SDSRefiner(decoder, z, bundle, prompt, sc, gen, device)
            stage = f"refine {k + 1}/{n}" if n > 1 else "refine"
            yield from _iterate(ctx, stage, sc.iterations, refiner.step, lambda i: _mesh_event(
                decoder_mesh(refiner.decoder, z, params["preview_resolution"], device, allow_empty=True), name, False,
                dict(info, stage="refine")), every)
            decoder = refiner.decoder

        # ---- colour pass: ISS++ texture stylization (Sec. 3.4.1) with the prompt (backend.pipelines.iss_texture)
        if params["method"] != "dream3d" and tc.iterations > 0:
            ctx.cancel.check()
            tex = TextureAligner(decoder, z, clip, tex_targets[k], tc, gen, device)
            stage = f"colour {k + 1}/{n}" if n > 1 else "colour"
            t = yield from _iterate(ctx, stage, tc.iterations, tex.step, lambda i: _mesh_event(
                decoder_mesh(tex.decoder, z, params["preview_resolution"], device, allow_empty=True), name, False,
                dict(info, stage="colour")), every)
            decoder = tex.decoder
            info["texture_clip"] = t["texture_clip"]

        if params["method"] != "dream3d":
            ctx.cancel.check()
            mesh = decoder_mesh(decoder, z, params["resolution"], device)
            yield from uv_texture.finish(
                MeshUpdate(vertices=mesh[0], faces=mesh[1], colors=mesh[2], final=True, name=name, info=info),
                tex_opts, decoder_color_fn(decoder, z, device))
            continue

        # ---- Dream3D route (paper 001, Sec. 3.1, appendix D)
        dc = dream3d_config(params, s2.view)
        if params["shape_prior"] == "image":
            yield Progress("dream3d", 0, dc.iterations, "drawing a rendering-style image for the shape prior")
            z, image = image_shape_prior(bundle, svr, prompt, gen, dc.style_template, dc.image_steps,
                                         dc.image_guidance)
            yield Image(_png(image[0]), f"{name} shape prior image")
            decoder = svr.decoder
        ctx.cancel.check()
        sdf = prior_sdf_from_decoder(decoder, z, dc.grid_resolution, device)
        grid_field = init_density_grid(sdf, dc, device)
        opt = Dream3DOptimizer(grid_field, sdf, clip, f_text, dc, gen, device)
        stage = f"dream3d {k + 1}/{n}" if n > 1 else "dream3d"
        yield from _iterate(ctx, stage, dc.iterations, opt.step, lambda i: _mesh_event(
            density_mesh(grid_field, params["preview_resolution"], surface_level(grid_field, dc), device,
                         allow_empty=True), name, False, dict(info, stage="dream3d")), every)
        ctx.cancel.check()
        mesh = density_mesh(grid_field, params["resolution"], surface_level(grid_field, dc), device)
        yield from uv_texture.finish(
            MeshUpdate(vertices=mesh[0], faces=mesh[1], colors=mesh[2], final=True, name=name, info=info),
            tex_opts, field_color_fn(grid_field, device=device))
