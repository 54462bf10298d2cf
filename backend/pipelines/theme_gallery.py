"""Workflow ``gallery``: a theme-consistent gallery of new assets from a few exemplar meshes (ThemeStation, paper 003).

Stages (each sized by a config dataclass with the paper's defaults; appendix A):

1. **Exemplar renders** (:mod:`backend.pipelines.theme.renders`): each exemplar -> SDF grid -> density (Dream3D
   Eq. 9) -> colour images and normal maps from 30 views at fixed elevations (0, 20 deg), random azimuths, random
   solid backgrounds; the first 20 views of each train the theme model, all 30 the reference prior.
2. **Theme fine-tuning** (Sec. 3.1, :mod:`backend.pipelines.theme.finetune`): the text-to-image model learns the
   theme from the renders with the shared prompt "a 3D model of <subject>, in the style of [V]" (200 iterations
   for one exemplar, 400 for several; LoRA by default, full fine-tuning as an option).
3. **Concept images** (Sec. 3.1): N samples of the theme model for new subjects, streamed as images.
4. **Initial model** (Sec. 3.2): each concept image lifted to 3D by :mod:`backend.pipelines.image_to_shape`
   (CISP voxel diffusion or the ISS SVR model), streamed as an intermediate mesh.
5. **Concept prior** (Sec. 3.3.2): the model fine-tuned on the concept image and SDEdit-augmented renders of the
   initial model with "a 3D model of [V] <subject>".
6. **Dual score distillation** (Sec. 3.3, Eq. 3-5, :mod:`backend.losses.dsd`): the initial model, as a DVGO
   density + colour grid, refined by the concept prior at t in [0.5, 0.75] (alpha 0.2) and the reference prior on
   colour and normal renders at t in [0.1, 0.25] (beta 1.0); intermediate meshes every ``mesh_every`` steps.
7. **Final meshes** with vertex colours, streamed as each asset finishes, with scores in ``info``: theme
   consistency (CLIP and CISP embedding similarity to the exemplars) and diversity (pairwise, CLIP).

Simplifications (each also in its module's docstring): plain SDS per prior instead of VSD; one fine-tune serves as
both the theme model and the reference prior (``shared_reference_prior``, the prompts y_x / y_n keep colour and
normal maps apart; set it False for two separate fine-tunes as in the paper); camera pose enters the prompts as a
view word instead of an extra condition; a DVGO grid instead of DMTet; no contextual loss.

CLI: ``python -m backend run gallery --exemplar a.glb [--exemplar b.glb ...] [--subject "..."]... --count N
--out DIR``. ``--preset preview`` shrinks every stage for a quick look on a CPU; ``--preset starter`` (the default on
the ``starter`` profile) sizes every stage for its small pixel-space text-to-image model (32^2, minutes on a CPU);
``--preset smoke`` (seconds, tiny profile) only checks the path end to end; ``--config JSON`` overrides any stage
size. Without a preset, the ``starter`` profile runs ``starter`` and the others ``paper``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Optional

import numpy as np
import torch

from backend.errors import InputError, ModelUnavailable
from backend.events import Event, Image, JobContext, MeshInput, MeshUpdate, Progress
from backend.losses.dsd import DSDConfig, ScorePrior
from backend.pipelines import image_to_shape as i2s
from backend.pipelines import uv_texture
from backend.pipelines.theme import concepts as cpt
from backend.pipelines.theme import scores as sc
from backend.pipelines.theme.finetune import FinetuneConfig, TunedPrior, finetune, view_word
from backend.pipelines.theme.optimize import OptimizeConfig, field_mesh, mesh_to_world, optimize_dsd, surface_level
from backend.pipelines.theme.renders import RenderConfig, Renders, check_exemplar, mesh_field, random_viewpoints
from backend.pipelines.theme.renders import render_views, world_vertices
from shared.mesh import MAX_FACES

log = logging.getLogger(__name__)

NAME = "gallery"
MAX_EXEMPLARS = 16
MAX_COUNT = 64
MAX_SUBJECT_CHARS = 200
VIEW_WORDS = ("front view", "side view", "back view", "overhead view")


@dataclass
class GalleryConfig:
    """Every stage's size, with ThemeStation's defaults (appendix A)."""

    render: RenderConfig = field(default_factory=RenderConfig)
    reference_views: int = 30  # appendix A: 30 colour renders + 30 normal maps per exemplar for the reference prior
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    shared_reference_prior: bool = True  # one fine-tune = theme model + reference prior (see module docstring)
    concept: cpt.ConceptConfig = field(default_factory=cpt.ConceptConfig)
    lift: i2s.ImageToShapeConfig = field(default_factory=i2s.ImageToShapeConfig)
    concept_prior: cpt.ConceptPriorConfig = field(default_factory=cpt.ConceptPriorConfig)
    dsd: DSDConfig = field(default_factory=DSDConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    score_views: int = 8  # renders of each final asset for the CLIP scores
    score_resolution: int = 224  # CLIP's input size


PRESETS: dict[str, dict] = {
    "paper": {},
    # A quick look on a CPU or a small GPU: every stage shrunk (not the paper's quality).
    "preview": {
        "render": {"views": 8, "resolution": 128, "sdf_resolution": 64, "n_samples": 64},
        "reference_views": 8,
        "finetune": {"iterations_single": 50, "iterations_multi": 80, "batch_size": 4},
        "concept": {"steps": 20},
        "concept_prior": {"augmented_views": 4, "iterations": 40, "augment_steps": 10},
        "optimize": {"iterations": 200, "resolution": 128, "grid_resolution": 64, "n_samples": 64,
                     "mesh_every": 50, "preview_resolution": 48},
        "score_views": 4,
    },
    # The starter profile's own text-to-image model (issue 14: pixel space, 32^2, a 2 M-parameter UNet): renders at
    # its resolution, a few minutes per item on a CPU. Ours, not the paper's: LoRA learning rate 1e-3 (the small
    # model needs more than SD's 1e-4 in 100 steps), lifting through the SVR model (its held-out IoU is far above
    # CISP's on this world, see README), DSD at 48^2 on a 48^3 grid.
    "starter": {
        "render": {"views": 8, "resolution": 32, "sdf_resolution": 64, "n_samples": 48},
        "reference_views": 8,
        "finetune": {"iterations_single": 60, "iterations_multi": 100, "batch_size": 8, "lr_lora": 1e-3},
        "concept": {"steps": 30},
        "lift": {"method": "svr", "mesh_resolution": 48},
        "concept_prior": {"augmented_views": 4, "iterations": 40, "augment_steps": 10},
        "optimize": {"iterations": 150, "resolution": 48, "grid_resolution": 48, "n_samples": 48, "mesh_every": 50,
                     "preview_resolution": 32, "checkpoint": False},
        "score_views": 4,
        "score_resolution": 64,
    },
    # Seconds on a CPU with the tiny profile: checks the whole path end to end (tests, smoke runs), nothing more.
    "smoke": {
        "render": {"views": 3, "resolution": 16, "sdf_resolution": 16, "n_samples": 12},
        "reference_views": 3,
        "finetune": {"iterations_single": 2, "iterations_multi": 3, "batch_size": 2},
        "concept": {"steps": 2},
        "lift": {"steps": 2, "voxel_upsample": 2, "mesh_resolution": 16},
        "concept_prior": {"augmented_views": 2, "iterations": 2, "augment_steps": 4},
        "optimize": {"iterations": 2, "resolution": 16, "grid_resolution": 16, "n_samples": 12, "mesh_every": 1,
                     "preview_resolution": 16},
        "score_views": 2,
        "score_resolution": 16,
    },
}


# --------------------------------------------------------------------------------------------- config


def _merge(dc: Any, overrides: dict, path: str) -> Any:
    """A copy of dataclass ``dc`` with ``overrides`` applied (nested dicts into nested dataclasses)."""
    if not isinstance(overrides, dict):
        raise InputError(f"gallery config {path or 'root'} must be a mapping, got {type(overrides).__name__}")
    names = {f.name: f for f in fields(dc)}
    kwargs = {}
    for k, v in overrides.items():
        if k not in names:
            raise InputError(f"unknown gallery config key {path + k!r}; known: {', '.join(names)}")
        cur = getattr(dc, k)
        if dataclasses.is_dataclass(cur):
            kwargs[k] = _merge(cur, v, f"{path}{k}.")
        else:
            if isinstance(v, list) and isinstance(cur, tuple):
                v = tuple(v)
            kwargs[k] = v
    try:
        return dataclasses.replace(dc, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad gallery config {path or 'value'}: {exc}") from None


def build_config(preset: str = "paper", overrides: Optional[dict] = None) -> GalleryConfig:
    """The preset's config with ``overrides`` (nested dict, e.g. ``{"optimize": {"iterations": 10}}``) applied."""
    if preset not in PRESETS:
        raise InputError(f"unknown gallery preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = _merge(GalleryConfig(), PRESETS[preset], "")
    return _merge(cfg, overrides or {}, "")


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exemplar", action="append", required=True, metavar="MESH",
                        help="exemplar mesh file (GLB/OBJ/PLY); repeat for several")
    parser.add_argument("--subject", action="append", default=[], help="subject of a new asset; repeat for several")
    parser.add_argument("--theme-subject", default=None,
                        help='what the exemplars are ("a building"); default: from their file names')
    parser.add_argument("--count", type=int, default=3, help="number of new assets N")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="stage sizes (default: starter on the starter profile, else paper)")
    parser.add_argument("--lift", default="auto", choices=i2s.METHODS, help="image-to-shape model for the initial model")
    parser.add_argument("--finetune", default="lora", choices=("lora", "full"), help="theme fine-tuning method")
    parser.add_argument("--iterations", type=int, default=None, help="DSD iterations (overrides the preset)")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help='stage sizes as JSON, e.g. \'{"optimize": {"resolution": 256}}\' (see GalleryConfig)')
    uv_texture.add_arguments(parser)


def params_from_args(args: argparse.Namespace) -> tuple[dict, list[MeshInput]]:
    from backend.geometry.io import load_mesh

    inputs = [load_mesh(p) for p in args.exemplar]
    config: dict = {}
    if args.config:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as exc:
            raise InputError(f"--config is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InputError("--config must be a JSON object")
    if args.lift != "auto":  # "auto": the preset's (or --config's) choice
        config.setdefault("lift", {})["method"] = args.lift
    config.setdefault("finetune", {})["method"] = args.finetune
    if args.iterations is not None:
        config.setdefault("optimize", {})["iterations"] = args.iterations
    params = {"count": args.count, "subjects": list(args.subject), "theme_subject": args.theme_subject,
              "preset": args.preset, "config": config, **uv_texture.params_from_args(args)}
    return params, inputs


# --------------------------------------------------------------------------------------------- validation


def validate(params: dict, inputs: list, profile: Any = None) -> dict:
    """Check exemplars (1..16 usable meshes under the face limit), count, subjects and the config."""
    if not isinstance(params, dict):
        raise InputError("gallery: params must be a mapping")
    known = {"count", "subjects", "theme_subject", "preset", "config", "max_faces", "seed", *uv_texture.OPTIONS}
    unknown = set(params) - known
    if unknown:
        raise InputError(f"gallery: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if not inputs:
        raise InputError("gallery needs at least one exemplar mesh: select one to a few objects (or pass --exemplar)")
    if len(inputs) > MAX_EXEMPLARS:
        raise InputError(f"gallery takes at most {MAX_EXEMPLARS} exemplars, got {len(inputs)}; select fewer")
    max_faces = params.get("max_faces", MAX_FACES)
    if not isinstance(max_faces, int) or isinstance(max_faces, bool) or max_faces < 1:
        raise InputError(f"gallery: max_faces must be a positive integer, got {max_faces!r}")
    for i, m in enumerate(inputs):
        what = f"exemplar {i + 1} ({getattr(m, 'name', '?')!r})"
        check_exemplar(m, max_faces=max_faces, what=what)
    count = params.get("count", 3)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise InputError(f"gallery: count must be an integer from 1 to {MAX_COUNT}, got {count!r}")
    subjects = params.get("subjects") or []
    if isinstance(subjects, str):
        subjects = [subjects]
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise InputError("gallery: subjects must be a list of texts")
    subjects = [" ".join(s.split()) for s in subjects if s.strip()]
    for s in subjects:
        if len(s) > MAX_SUBJECT_CHARS:
            raise InputError(f"gallery: subject {s[:40]!r}... is longer than {MAX_SUBJECT_CHARS} characters")
    theme = params.get("theme_subject")
    if theme is not None and (not isinstance(theme, str) or len(theme) > MAX_SUBJECT_CHARS):
        raise InputError(f"gallery: theme_subject must be a text under {MAX_SUBJECT_CHARS} characters")
    preset = params.get("preset") or None
    if preset is None and profile is not None:
        preset = default_preset(profile)
    overrides = params.get("config") or {}
    cfg = build_config(preset or "paper", overrides)  # raises InputError on a bad key or value
    if profile is not None:
        _check_profile(profile, cfg)
    return {"count": count, "subjects": subjects, "theme_subject": (theme or "").strip() or None, "preset": preset,
            "config": overrides, "max_faces": max_faces, **uv_texture.check_options(params, "gallery")}


def default_preset(profile: Any) -> str:
    """``starter`` on the starter profile (its small text-to-image model), ``paper`` elsewhere."""
    return "starter" if getattr(profile, "name", "") == "starter" else "paper"


# --------------------------------------------------------------------------------------------- run


def _check_profile(profile: Any, cfg: GalleryConfig) -> str:
    """Raise :class:`ModelUnavailable` with the profile's reason unless it can run the gallery; returns the lift
    method."""
    caps = profile.capabilities().get(NAME, {})
    if not caps.get("available", False):
        raise ModelUnavailable(f"the theme gallery cannot run with the {profile.name!r} profile: {caps.get('reason')}")
    return i2s.choose_method(profile, cfg.lift.method)


def _render_exemplars(inputs: list[MeshInput], cfg: GalleryConfig, gen: torch.Generator, device: str, cancel
                      ) -> Iterator[Any]:
    """Stage 1: renders of every exemplar (max(views, reference_views) each). Returns (renders, mean size of the
    exemplars in world units: the longest side of their bounding boxes)."""
    n_views = max(cfg.render.views, cfg.reference_views)
    out: list[Renders] = []
    scales = []
    for i, m in enumerate(inputs):
        cancel.check()
        yield Progress("renders", i, len(inputs), f"rendering exemplar {m.name}")
        fld, _ = mesh_field(m, cfg.render.sdf_resolution, cfg.render.beta, device)
        az, el, bg = random_viewpoints(n_views, cfg.render.elevations, gen, device)
        rgb, nrm = render_views(fld, az, el, cfg.render.resolution, bg, cfg.render.n_samples,
                                cfg.render.views_per_batch, gen)
        out.append(Renders(m.name, rgb.detach(), nrm.detach(), az.cpu(), el.cpu(), bg.cpu()))
        scales.append(_extent(world_vertices(m)[np.unique(np.asarray(m.faces, dtype=np.int64))]))
        del fld
    yield Progress("renders", len(inputs), len(inputs), "exemplar renders done")
    return out, float(np.mean(scales))


def _view_conds(bundle: Any, prompt_fn) -> dict:
    """``{view word: (cond, cond_normal)}`` embeddings of ``prompt_fn(view, normal)`` for every view word."""
    conds = {}
    for w in VIEW_WORDS:
        conds[w] = (bundle.encode_prompt([prompt_fn(w, False)]), bundle.encode_prompt([prompt_fn(w, True)]))
    return conds


def run(params: dict, inputs: list, ctx: JobContext) -> Iterator[Event]:
    params = validate(params, inputs, profile=None)
    if params["preset"] is None:
        params["preset"] = default_preset(ctx.profile)
    cfg = build_config(params["preset"], params["config"])
    profile, device, cancel = ctx.profile, ctx.device, ctx.cancel
    lift_method = _check_profile(profile, cfg)
    cfg = dataclasses.replace(cfg, lift=dataclasses.replace(cfg.lift, method=lift_method))
    gen = torch.Generator().manual_seed(int(ctx.seed))
    count = params["count"]
    exemplar_subjects = [cpt.subject_from_name(m.name) for m in inputs]
    theme_subject = params["theme_subject"]
    subjects = cpt.subjects_for(count, params["subjects"], [theme_subject] if theme_subject else exemplar_subjects)

    bundle = profile.diffusion()
    priors: list[TunedPrior] = []
    try:
        # 1. exemplar renders
        renders, world_size = yield from _render_exemplars(inputs, cfg, gen, device, cancel)

        # 2. theme fine-tuning (Sec. 3.1) [+ reference prior, Sec. 3.3.3]
        n_theme = cfg.render.views
        images, prompts = [], []
        for r, subj in zip(renders, [theme_subject] * len(renders) if theme_subject else exemplar_subjects):
            nv = len(r.rgb) if cfg.shared_reference_prior else n_theme
            views = [view_word(float(a), float(e)) for a, e in zip(r.azimuth[:nv], r.elevation[:nv])]
            images.append(r.rgb[:nv])
            prompts += [cpt.theme_prompt(subj, v) for v in views]
            if cfg.shared_reference_prior:
                images.append(r.normal[:nv])
                prompts += [cpt.theme_prompt(subj, v, normal=True) for v in views]
        iters = cfg.finetune.iterations(len(inputs))
        theme = yield from finetune(bundle, torch.cat(images), prompts, iters, cfg.finetune, name="theme",
                                    stage="theme fine-tune", cancel=cancel, generator=gen)
        priors.append(theme)
        if cfg.shared_reference_prior:
            reference = theme
        else:
            ref_imgs, ref_prompts = [], []
            for r, subj in zip(renders, [theme_subject] * len(renders) if theme_subject else exemplar_subjects):
                views = [view_word(float(a), float(e)) for a, e in zip(r.azimuth, r.elevation)]
                ref_imgs += [r.rgb, r.normal]
                ref_prompts += [cpt.theme_prompt(subj, v) for v in views]
                ref_prompts += [cpt.theme_prompt(subj, v, normal=True) for v in views]
            reference = yield from finetune(bundle, torch.cat(ref_imgs), ref_prompts, iters, cfg.finetune,
                                            name="reference", stage="reference prior", cancel=cancel, generator=gen)
            priors.append(reference)

        # 3. concept images (Sec. 3.1)
        concept_prompts = [cpt.theme_prompt(s, "front view") for s in subjects]
        seeds = [int(ctx.seed) * 1000 + 17 * i + 1 for i in range(count)]
        concept_images = []
        for i, (p, s) in enumerate(zip(concept_prompts, seeds)):
            cancel.check()
            yield Progress("concept images", i, count, p)
            with _adapter(theme):
                img = cpt.sample_concepts(theme.bundle, [p], cfg.concept, [s])
            concept_images.append(img)
            yield Image(i2s.encode_png(img[0]), f"concept_{i}: {subjects[i]}")
        yield Progress("concept images", count, count, "concept images done")

        # exemplar embeddings for the scores
        clip = profile.clip()
        ex_clip = [sc.clip_embedding(clip, r.rgb[: cfg.render.views].to(device)) for r in renders]
        cisp = _optional_cisp(profile)
        ex_cisp = [sc.cisp_embedding(cisp, world_vertices(m), m.faces) for m in inputs] if cisp is not None else []
        finished_emb: list[torch.Tensor] = []

        for i in range(count):
            name = f"item_{i}"
            subject = subjects[i]
            # 4. initial model (Sec. 3.2)
            cancel.check()
            yield Progress("initial model", i, count, f"{name}: lifting the concept image ({lift_method})")
            shape = i2s.lift_image(concept_images[i].cpu(), profile, cfg.lift, gen)
            # outputs are as large as the exemplars (the initial model's size sets the factor for this asset)
            world_scale = world_size / max(_extent(shape.vertices), 1e-6)
            yield MeshUpdate(mesh_to_world(shape.vertices, world_scale), shape.faces, shape.colors, final=False, name=name,
                             info={"stage": "initial model", "method": shape.method, "subject": subject})
            init = MeshInput(name=name, vertices=shape.vertices, faces=shape.faces, colors=shape.colors)
            fld, init_norm = mesh_field(init, cfg.optimize.grid_resolution, cfg.render.beta, device)

            # 5. concept prior (Sec. 3.3.2)
            cp = cfg.concept_prior
            az, el, bg = random_viewpoints(cp.augmented_views, cfg.render.elevations, gen, device)
            aug_rgb, _ = render_views(fld, az, el, cfg.render.resolution, bg, cfg.render.n_samples,
                                      cfg.render.views_per_batch, gen)
            aug_views = [view_word(float(a), float(e)) for a, e in zip(az.cpu(), el.cpu())]
            with _adapter(theme):
                aug = cpt.img2img(theme.bundle, aug_rgb.detach(), [cpt.theme_prompt(subject, v) for v in aug_views],
                                  cp.augment_strength, cp.augment_steps, cfg.concept.guidance_scale, gen)
            cp_images = torch.cat([concept_images[i].to(aug.device), aug])
            cp_prompts = [cpt.concept_prior_prompt(subject, "front view")] + [
                cpt.concept_prior_prompt(subject, v) for v in aug_views]
            concept_prior = yield from finetune(bundle, cp_images, cp_prompts, cp.iterations, cfg.finetune,
                                                name=f"concept{i}", stage="concept prior", cancel=cancel,
                                                generator=gen)
            priors.append(concept_prior)

            # 6. dual score distillation (Sec. 3.3)
            with torch.no_grad():
                uncond = bundle.encode_prompt([""])
            c_conds = _view_conds(concept_prior.bundle, lambda w, n: cpt.concept_prior_prompt(subject, w))
            r_conds = _view_conds(reference.bundle, lambda w, n: cpt.theme_prompt(subject, w, normal=n))
            c_sp = ScorePrior(concept_prior.bundle, c_conds["front view"][0], uncond, concept_prior.adapter)
            r_sp = ScorePrior(reference.bundle, r_conds["front view"][0], uncond, reference.adapter,
                              r_conds["front view"][1])
            for p in fld.parameters():
                p.requires_grad_(True)
            level = surface_level(cfg.render.beta)
            yield from optimize_dsd(fld, c_sp, r_sp, cfg.optimize, cfg.dsd, concept_conds=c_conds,
                                    reference_conds=r_conds, view_word=view_word, level=level, name=name,
                                    stage="dual score distillation", cancel=cancel, generator=gen, device=device,
                                    world_scale=world_scale, normalization=init_norm)
            concept_prior.release()
            priors.remove(concept_prior)

            # 7. final mesh + scores
            cancel.check()
            yield Progress("final mesh", i, count, f"{name}: extracting the mesh")
            v, f, c = field_mesh(fld, cfg.optimize.grid_resolution, level, cfg.optimize.target_faces)
            info = {"subject": subject, "concept": i, "method": shape.method, "stage": "final",
                    "world_scale": float(world_scale)}
            info.update(_scores(fld, v, f, clip, cisp, ex_clip, ex_cisp, finished_emb, cfg, gen, device))
            yield from uv_texture.finish(  # issue 16: UV map + texture baked from the vertex colours, if asked
                MeshUpdate(mesh_to_world(v, world_scale, init_norm), f, c, final=True, name=name, info=info),
                uv_texture.options(params))
            del fld
        yield Progress("gallery", count, count, "gallery done")
    finally:
        for p in priors:
            p.release()


def _extent(vertices: np.ndarray) -> float:
    """Longest side of the bounding box."""
    v = np.asarray(vertices, dtype=np.float64)
    return float((v.max(axis=0) - v.min(axis=0)).max()) if len(v) else 0.0


class _adapter:
    """Activate a tuned prior's adapter while sampling with it."""

    def __init__(self, prior: TunedPrior) -> None:
        self.prior = prior

    def __enter__(self) -> None:
        if self.prior.adapter is not None:
            self.prior.bundle.unet.enable_adapters()
            self.prior.bundle.unet.set_adapter(self.prior.adapter)

    def __exit__(self, *exc) -> None:
        return None


def _optional_cisp(profile: Any) -> Optional[Any]:
    """CISP for the 3D theme score when the profile has it (the score is left out otherwise)."""
    try:
        if not profile.component("cisp").present:
            return None
        return profile.cisp()
    except ModelUnavailable:
        return None


def _scores(fld, v, f, clip, cisp, ex_clip, ex_cisp, finished_emb, cfg: GalleryConfig, gen, device) -> dict:
    """Theme consistency (CLIP, CISP) and diversity of a finished asset (see :mod:`backend.pipelines.theme.scores`)."""
    n = max(1, cfg.score_views)
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    el = torch.full((n,), 15.0)
    bg = torch.ones(n, 3)
    res = min(cfg.score_resolution, cfg.render.resolution) if device == "cpu" else cfg.score_resolution
    rgb, _ = render_views(fld, az.to(device), el.to(device), res, bg.to(device), cfg.render.n_samples,
                          cfg.render.views_per_batch, gen)
    emb = sc.clip_embedding(clip, rgb)
    out: dict = {"theme_clip": sc.theme_consistency(emb, ex_clip)}
    if cisp is not None and len(f):
        out["theme_cisp"] = sc.theme_consistency(sc.cisp_embedding(cisp, v, f), ex_cisp)
    div = sc.diversity(emb, finished_emb)
    if div is not None:
        out["diversity_clip"] = div
    finished_emb.append(emb)
    gal = sc.pairwise_diversity(finished_emb)
    if gal is not None:
        out["gallery_diversity_clip"] = gal
    return out
