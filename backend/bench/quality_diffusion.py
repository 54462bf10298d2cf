"""``bench quality`` sections of the starter text-to-image model (issue 14): what the workflows that need a
diffusion model give on the ``starter`` profile, judged like the text-to-shape rows.

- ``t2i``: text-to-image samples of held-out captions (:func:`backend.training.split.heldout_benchmark_set`,
  never in training), ``samples`` per caption from :meth:`DiffusionBundle.sample` (DDIM + classifier-free
  guidance); each image judged on its own by the independent classifier (category, colour). A reference row judges
  real renders of the same shapes brought to the model's resolution (what the classifier can read at that size).
- ``refined``: ISS++ "refined" text to shape (Sec. 3.4.2, SDS on the decoder, Eq. 7) against "fast" on the same
  held-out prompts: the default job's stage-2 latent, then :class:`backend.pipelines.iss_stages.SDSRefiner` with
  the workflow's own settings (:func:`backend.pipelines.text_to_shape.sds_config`, ``refine_iterations`` from the
  caller); IoU, category/colour and CLIP consistency of both, judged by the same renders.
- ``gallery``: ThemeStation galleries on themes made of held-out world shapes: three exemplars of different
  categories sharing a colour (and, where the categories have one, a height), asked for subjects of other
  categories. Per item: the classifier's category equals the requested subject, its colour the theme's; the
  gallery's own scores (theme consistency by CLIP and CISP, CLIP diversity); diversity as pairwise ``1 - IoU``
  between the items of one gallery (32^3 cells of each mesh in the unit cube of its initial model). Meshes are
  judged at their own size in the unit cube (the classifier reads size: normalising every mesh to fill the cube
  drops its accuracy on the exemplars from 77% to 38%), rendered sharper than the workflow renders (Eq. 9 beta
  0.005); the exemplars, judged the same way, are the reference.

Nothing here is tuned on the held-out set; settings are the workflows' own (the gallery's ``starter`` preset).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger("stepstone.bench.quality")

SECTIONS = ("t2i", "refined", "gallery")
T2I_GUIDANCE = 4.0  # chosen before measuring (a middle value of the usual 3-7.5), not tuned on held-out captions
T2I_STEPS = 50


def _row() -> dict:
    return {"iou": [], "fscore": [], "cat": [], "col": [], "clip": []}


# ------------------------------------------------------------------------------------------ text to image


@torch.no_grad()
def text_to_image(profile, classifier, shapes, device: str, samples: int = 4, seed: int = 0) -> dict:
    """Classifier category/colour accuracy of samples of held-out captions (each image judged alone)."""
    import torch.nn.functional as F

    from backend.training.captions import caption
    from backend.training.render_world import render_shape

    bundle = profile.diffusion()
    clip = profile.clip()
    res = bundle.resolution
    name = f"text-to-image samples of held-out captions ({res}^2)"
    ref = f"  reference: real renders of those shapes at {res}^2"
    rows = {name: _row(), ref: _row()}
    t0 = time.perf_counter()
    for k, shape in enumerate(shapes):
        prompt = caption(shape)
        g = torch.Generator().manual_seed(seed * 100_003 + k)
        imgs = bundle.sample([prompt] * samples, steps=T2I_STEPS, guidance_scale=T2I_GUIDANCE, generator=g)
        cats, cols = classifier.predict(imgs.to(device))
        f_t = clip.encode_text([prompt])
        cs = (clip.encode_image(imgs.to(device)) @ f_t.t()).squeeze(-1)
        rows[name]["cat"] += [float(c == shape.category) for c in cats]
        rows[name]["col"] += [float(c == shape.colour) for c in cols]
        rows[name]["clip"] += cs.tolist()
        real = torch.from_numpy(render_shape(shape, _cams(2, k), 64)["rgb"]).permute(0, 3, 1, 2)
        real = F.interpolate(real, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        rc, rk = classifier.predict(real.to(device))
        rows[ref]["cat"] += [float(c == shape.category) for c in rc]
        rows[ref]["col"] += [float(c == shape.colour) for c in rk]
        rows[ref]["clip"] += (clip.encode_image(real.to(device)) @ f_t.t()).squeeze(-1).tolist()
        print(f"  t2i {k + 1}/{len(shapes)} {prompt!r}: {sum(c == shape.category for c in cats)}/{samples} category, "
              f"{sum(c == shape.colour for c in cols)}/{samples} colour ({', '.join(f'{a} {b}' for a, b in zip(cols, cats))})",
              flush=True)
    rows[name]["extra"] = (f"{samples} samples per caption, {len(shapes)} captions, DDIM {T2I_STEPS} steps, "
                           f"guidance {T2I_GUIDANCE}; {time.perf_counter() - t0:.0f}s")
    rows[ref]["extra"] = "2 views per shape, white background: what the classifier reads at this size"
    return rows


def _cams(n: int, k: int) -> np.ndarray:
    az = (30.0 + 97.0 * k + np.arange(n) * 360.0 / n) % 360.0
    return np.stack([az, np.full(n, 25.0), np.full(n, 1.6)], -1).astype(np.float32)


# ------------------------------------------------------------------------------------------ refined vs fast


def refined_vs_fast(profile, classifier, shapes, device: str, seed: int = 0, refine_iterations: int | None = None
                    ) -> dict:
    """The default job ("fast") and the same job + SDS refinement ("refined"), judged on the same prompts."""
    from backend.bench.quality import DefaultJob, judge_latent
    from backend.geometry.metrics import volumetric_iou
    from backend.pipelines.iss_stages import SDSRefiner
    from backend.pipelines.iss_texture import texture_pass
    from backend.pipelines.text_to_shape import sds_config, stage2_config, texture_config, validate
    from backend.training.captions import caption
    from backend.training.dataset import voxelize

    job = DefaultJob(profile, device, {})
    bundle = profile.diffusion()
    extra = {"quality": "refined"}
    if refine_iterations is not None:
        extra["refine_iterations"] = int(refine_iterations)
    params = validate({"prompt": "x", **extra}, [], profile=profile)
    sc = sds_config(params, stage2_config(params, device).view)
    names = ("fast (default job), paired", f"refined (+ SDS, {sc.iterations} iterations, guidance "
                                           f"{sc.guidance_scale:g})")
    rows = {n: _row() for n in names}
    t_ref = []
    for k, shape in enumerate(shapes):
        prompt = caption(shape)
        res = job.run(prompt, seed + k, 1)
        z, f_t = res["final"][0], res["f_t"]
        gt = voxelize(shape, 32)
        t0 = time.perf_counter()
        refiner = SDSRefiner(job.decoder, z, bundle, prompt, sc, torch.Generator().manual_seed(seed + k), device)
        for _ in range(sc.iterations):
            refiner.step()
        t_ref.append(time.perf_counter() - t0)
        refiner.decoder.eval()
        # the pipeline's order: SDS, then the colour pass (backend.pipelines.iss_texture) on the refined decoder
        refined = texture_pass(refiner.decoder, z, job.clip, f_t, texture_config(params, stage2_config(params, device)),
                               torch.Generator().manual_seed(seed + k), device)
        for name, dec in zip(names, (res["decoders"][0], refined)):
            j = judge_latent(dec, z, classifier, job.clip, f_t, device)
            rows[name]["iou"].append(volumetric_iou(j["occ"], gt))
            rows[name]["cat"].append(float(j["cat"] == shape.category))
            rows[name]["col"].append(float(j["col"] == shape.colour))
            rows[name]["clip"].append(j["clip"])
        print(f"  refined {k + 1}/{len(shapes)} {prompt!r}: IoU {rows[names[0]]['iou'][-1]:.3f} -> "
              f"{rows[names[1]]['iou'][-1]:.3f}, CLIP {rows[names[0]]['clip'][-1]:.3f} -> "
              f"{rows[names[1]]['clip'][-1]:.3f} ({t_ref[-1]:.0f}s)", flush=True)
    rows[names[1]]["extra"] = f"SDS refinement {np.mean(t_ref):.0f}s per prompt on {device}"
    return rows


# ------------------------------------------------------------------------------------------ galleries


def world_mesh(shape, name: str, resolution: int = 64):
    """A world shape as a coloured triangle mesh (marching cubes of its exact SDF, colours of its parts)."""
    from backend.events import MeshInput
    from backend.fields import grid_points
    from backend.geometry import extract_mesh

    pts = grid_points(resolution).reshape(-1, 3).numpy().astype(np.float64)
    sdf = shape.sdf.sdf(pts).reshape(resolution, resolution, resolution)
    v, f, c = extract_mesh(sdf.astype(np.float32), level=0.0,
                           color_fn=lambda p: np.asarray(shape.sdf.color(np.asarray(p, np.float64)), np.float32))
    return MeshInput(name, v.astype(np.float32), f.astype(np.uint32), c)


def gallery_themes(n_themes: int, per_theme: int = 3) -> list[dict]:
    """Themes of held-out world shapes: ``per_theme`` exemplars of different categories sharing a colour (and a
    height where their categories have one), each with the categories not in the theme as subjects.

    The held-out split holds each colour for at most two categories (:data:`HELDOUT_COLOUR_PAIRS`); the third
    exemplar comes from a held-out attribute combination (any colour, :data:`HELDOUT_ATTRIBUTE_COMBOS`).
    """
    from backend.training.split import heldout_descriptions
    from backend.training.world import CATEGORIES, COLOURS

    descs = heldout_descriptions()
    themes: list[dict] = []
    used: dict[str, int] = {}
    for colour in COLOURS:
        for height in ("tall", "short"):
            picked: dict[str, tuple] = {}
            # categories that earlier themes used go last, so the themes differ (stable sort keeps the order)
            for cat, col, attrs in sorted(descs, key=lambda d: used.get(d[0], 0)):
                if col != colour or cat in picked or attrs.get("height", height) != height:
                    continue
                picked[cat] = (cat, col, attrs)
                if len(picked) == per_theme:
                    break
            if len(picked) == per_theme and not any(set(picked) == set(t["categories"]) for t in themes):
                cats = list(picked)
                for c in cats:
                    used[c] = used.get(c, 0) + 1
                themes.append({"colour": colour, "height": height, "categories": cats,
                               "descriptions": list(picked.values()),
                               "subjects": [c for c in CATEGORIES if c not in cats]})
                break
    return themes[:n_themes]


def gallery(profile, classifier, device: str, themes: int = 4, count: int = 3, seed: int = 0,
            preset: str = "starter", overrides: dict | None = None) -> dict:
    """Galleries of ``count`` items on held-out themes, judged per item (see the module docstring)."""
    from backend.events import JobContext, MeshInput, MeshUpdate
    from backend.pipelines import get_workflow
    from backend.training.world import build_shape

    wf = get_workflow("gallery")
    name = f"gallery items ({preset} preset)"
    ex_name = "  reference: the exemplars, judged the same way"
    rows = {name: {**_row(), "div": [], "theme_clip": [], "theme_cisp": [], "div_clip": []}, ex_name: _row()}
    rng = np.random.default_rng([seed, 14])
    t0 = time.perf_counter()
    for ti, theme in enumerate(gallery_themes(themes)):
        exemplars = [world_mesh(build_shape(c, col, a, seed=2_000_000 + 10 * ti + j), c)
                     for j, (c, col, a) in enumerate(theme["descriptions"])]
        for m, cat in zip(exemplars, theme["categories"]):
            cat_p, col_p = judge_mesh(m, classifier, device)
            rows[ex_name]["cat"].append(float(cat_p == cat))
            rows[ex_name]["col"].append(float(col_p == theme["colour"]))
        subjects = [str(s) for s in rng.choice(theme["subjects"], size=count, replace=False)]
        params = wf.validate({"count": count, "subjects": [f"a {s}" if s[0] not in "aeiou" else f"an {s}"
                                                           for s in subjects],
                              "preset": preset, "config": overrides or {}}, exemplars, profile=profile)
        ctx = JobContext(profile=profile, device=device, seed=seed + ti)
        finals = [ev for ev in wf.run(params, exemplars, ctx) if isinstance(ev, MeshUpdate) and ev.final]
        occs, last_div = [], None
        for ev, subj in zip(finals, subjects):
            # back to the unit cube of the initial model (the workflow scales items to the exemplars' size)
            scale = float(ev.info.get("world_scale", 1.0))
            mesh = MeshInput(ev.name, np.asarray(ev.vertices, np.float32) / scale, np.asarray(ev.faces, np.uint32),
                             ev.colors)
            cat_p, col_p = judge_mesh(mesh, classifier, device)
            r = rows[name]
            r["cat"].append(float(cat_p == subj))
            r["col"].append(float(col_p == theme["colour"]))
            for key, info_key in (("theme_clip", "theme_clip"), ("theme_cisp", "theme_cisp")):
                if info_key in ev.info:
                    r[key].append(float(ev.info[info_key]))
            if "gallery_diversity_clip" in ev.info:
                last_div = float(ev.info["gallery_diversity_clip"])
            occs.append(natural_occupancy(mesh, 32))
            print(f"  gallery {ti + 1} ({theme['colour']} {theme['height']}: {', '.join(theme['categories'])}) "
                  f"{ev.name} asked {subj!r}: {col_p} {cat_p}", flush=True)
        pair = [1.0 - _iou(a, b) for i, a in enumerate(occs) for b in occs[i + 1:]]
        if pair:
            rows[name]["div"].append(float(np.mean(pair)))
        if last_div is not None:
            rows[name]["div_clip"].append(last_div)
    r = rows[name]
    r["extra"] = (f"{len(r['cat'])} items in {len(r['div'])} galleries; pairwise 1-IoU per gallery "
                  f"{_fmt(r['div'])}; theme consistency CLIP {_fmt(r['theme_clip'])}, CISP {_fmt(r['theme_cisp'])}; "
                  f"CLIP diversity {_fmt(r['div_clip'])}; {time.perf_counter() - t0:.0f}s")
    for k in ("div", "theme_clip", "theme_cisp", "div_clip"):
        r.pop(k)
    return rows


def _fmt(xs) -> str:
    return f"{np.mean(xs):.3f} +- {np.std(xs):.3f}" if len(xs) else "n/a"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


JUDGE_BETA = 0.005  # Eq. 9 sharpness of the judging renders (the workflow's 0.05 blurs thin parts away)


def _natural_field(mesh, resolution: int = 64):
    """A density + colour grid of ``mesh`` in the unit cube *as it is* (no fit: size is a cue of the category)."""
    from backend.fields import DensityGridField
    from backend.fields.grid import ColorGrid
    from backend.geometry.normalize import Normalization
    from backend.geometry.sdf import mesh_to_sdf
    from backend.pipelines.theme.renders import vertex_color_grid

    v = np.asarray(mesh.vertices, np.float64)
    sdf, _ = mesh_to_sdf(v, mesh.faces, resolution, normalization=Normalization(np.zeros(3), 1.0))
    col = ColorGrid(resolution, init=vertex_color_grid(v, mesh.colors, resolution))
    return DensityGridField.from_sdf(sdf, beta=JUDGE_BETA, color=col), sdf


@torch.no_grad()
def judge_mesh(mesh, classifier, device: str, resolution: int = 48) -> tuple[str, str]:
    """Classifier (category, colour) of a coloured mesh in the unit cube at its own size, from the quality bench's
    4 cameras on white (the views the text-to-shape rows are judged from)."""
    from backend.bench.quality import EVAL_CAMS
    from backend.render import render
    from backend.training.render_world import cameras_from_array

    fld, _ = _natural_field(mesh)
    out = render(fld.to(device), cameras_from_array(EVAL_CAMS, device), resolution, resolution, n_samples=96,
                 background="white", stratified=False, normals=None)
    return classifier.predict_shape(out["rgb"].permute(0, 3, 1, 2))


def natural_occupancy(mesh, resolution: int = 32) -> np.ndarray:
    """Occupancy (R, R, R) at unit-cube cell centres of a mesh as it is (the IoU convention of the text rows)."""
    from backend.fields.grid import sample_grid

    _, sdf = _natural_field(mesh, 64)
    u = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution - 0.5
    pts = torch.stack(torch.meshgrid(u, u, u, indexing="ij"), -1)
    return (sample_grid(torch.from_numpy(sdf)[None], pts)[..., 0] < 0).numpy()


def run_sections(profile: Any, classifier, shapes, skip: set[str], device: str, seed: int = 0, quick: bool = False
                 ) -> dict:
    """The sections not in ``skip`` (``bench quality --skip``), as rows of the quality table."""
    rows: dict = {}
    if not profile.component("diffusion").present:
        print(f"  (no text-to-image model: {profile.component('diffusion').reason()}; sections "
              f"{', '.join(SECTIONS)} skipped)")
        return rows
    if "t2i" not in skip:
        rows.update(text_to_image(profile, classifier, shapes, device, samples=2 if quick else 4, seed=seed))
    if "refined" not in skip:
        rows.update(refined_vs_fast(profile, classifier, shapes[:2] if quick else shapes, device, seed=seed,
                                    refine_iterations=4 if quick else None))
    if "gallery" not in skip:
        over = {"optimize": {"iterations": 4, "mesh_every": 2}, "finetune": {"iterations_multi": 4}} if quick else None
        rows.update(gallery(profile, classifier, device, themes=1 if quick else 4, count=2 if quick else 3,
                            seed=seed, overrides=over))
    return rows
