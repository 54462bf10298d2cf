"""``python -m backend bench quality [--quick]``: text-to-shape quality of the starter profile against the
procedural ground truth (issues 9 and 12).

Text to shape is measured on what an artist gets: :class:`DefaultJob` runs the default job of ``run text-to-shape``
(the pipeline's own validation, stage-2 settings for the device, Eq. 5 target with the default tau) for

- held-out prompts (category/colour/attribute combinations never seen in training, :mod:`backend.training.split`):
  mean volumetric IoU (32^3 cell centres) and F-score (FS@0.05 of the unit cube, ShapeClipper Eq. 8 on 2048
  surface points) against the exact world shape of the prompt; category and colour accuracy of the independent
  classifier (:mod:`backend.training.classifier`, a CNN trained separately from the guidance CLIP) on 4 renders;
  CLIP consistency (mean cosine of the guidance CLIP's image features of those renders with f_T); the count of
  empty shapes; for ``stage-1`` (mapper only, ``z = M(f_T)``), the default job (``+ stage-2``, ISS++ Sec. 3.3.2)
  and ``+ diversity`` (2 variants with diffusion-prior samples, Eq. 5); and the ISS++ Table 3 figures
  ``d(M(f_T), f_S)`` and ``d(M'(f_T), f_S)`` (relative L2 distance between the mapped text feature and the SVR
  latent of a ground-truth render, mean +- std);
- free-form prompts (:data:`backend.bench.freeform.FREEFORM_PROMPTS`: synonyms and sentences whose words are never
  in a caption): category accuracy, and colour accuracy where the prompt names a colour.

It also prints CISP- vs CLIP-conditioned image-to-shape IoU (paper 002's comparison, 16^3 voxels) and SVR
reconstruction IoU of the shipped (3D-supervised) SVR and of the image-supervised one with vs without semantic
shape consistency (paper 004's ablation). Numbers are measured in one run; nothing here is tuned on the held-out set.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend.bench.freeform import FREEFORM_PROMPTS

log = logging.getLogger("stepstone.bench.quality")

FS_THRESHOLD = 0.05
EVAL_CAMS = np.array([[30.0, 25.0, 1.6], [120.0, 25.0, 1.6], [210.0, 25.0, 1.6], [300.0, 25.0, 1.6]], np.float32)


@dataclass
class QualitySettings:
    prompts: int = 13  # one per category
    variants: int = 2  # diffusion-prior variants per prompt (the "+ diversity" row)
    freeform: int = len(FREEFORM_PROMPTS)  # free-form prompts (words never in a caption)
    job: dict = field(default_factory=dict)  # overrides of the default text-to-shape job (none: the defaults)
    cisp_samples: int = 10  # shapes per input image, as paper 002 reports IoU (10 per image)
    cisp_steps: int = 25
    svr_shapes: int = 26
    cisp_shapes: int = 26
    seed: int = 0


QUICK = QualitySettings(prompts=2, variants=1, freeform=4, job={"iterations": 4}, cisp_steps=6, svr_shapes=4,
                        cisp_shapes=4)


def _cell_points(res: int) -> torch.Tensor:
    from backend.training.dataset import grid_points

    return torch.from_numpy(grid_points(res))[None]


@torch.no_grad()
def decoded_occupancy(decoder, z: torch.Tensor, res: int = 32) -> np.ndarray:
    logits, _ = decoder(_cell_points(res).to(z.device), z.reshape(1, -1))
    return (logits[0] > 0).cpu().numpy().reshape(res, res, res)


def surface_points_from_occ(occ_logits_fn, res: int, n: int, seed: int) -> np.ndarray | None:
    """Marching cubes of a grid function + area-weighted surface samples (None when empty)."""
    from backend.fields import grid_points
    from backend.geometry import extract_mesh
    from backend.geometry.metrics import sample_surface

    pts = grid_points(res).reshape(-1, 3)
    grid = occ_logits_fn(pts).reshape(res, res, res)
    v, f, _ = extract_mesh(grid, level=0.0, inside="above", allow_empty=True)
    if len(f) == 0:
        return None
    return sample_surface(v, f, n, seed=seed)


def gt_surface(shape, n: int = 2048, seed: int = 0) -> np.ndarray:
    return surface_points_from_occ(lambda p: -shape.sdf.sdf(p.numpy()), 64, n, seed)


def decoder_surface(decoder, z, n: int = 2048, seed: int = 0) -> np.ndarray | None:
    @torch.no_grad()
    def fn(p):
        logits, _ = decoder(p.reshape(1, -1, 3).to(z.device), z.reshape(1, -1))
        return logits[0].cpu().numpy()

    return surface_points_from_occ(fn, 48, n, seed)


# The judged renders show the surface the artist gets (the marching-cubes level o = 0.5 of the final mesh), not the
# soft volume stage 2 optimises: the occupancy is sharpened (sigmoid(logit / 0.1)) and rendered nearly opaque, like the
# ground-truth renders (beta 0.004) the classifier was trained on.
JUDGE_TEMPERATURE = 0.1
JUDGE_BETA = 0.005


@torch.no_grad()
def render_decoded(decoder, z, res: int = 48) -> torch.Tensor:
    """4 white-background renders (4, 3, res, res) of the decoded shape's surface for the classifier."""
    from backend.fields.adapters import DecoderField
    from backend.render import render
    from backend.training.render_world import cameras_from_array

    field_ = DecoderField(decoder, z.reshape(1, -1), beta=JUDGE_BETA, temperature=JUDGE_TEMPERATURE)
    out = render(field_, cameras_from_array(EVAL_CAMS, str(z.device)), res, res,
                 n_samples=64, background="white", stratified=False, normals=None)
    return out["rgb"].permute(0, 3, 1, 2).cpu()


def _mean_std(xs) -> str:
    xs = np.asarray(xs, np.float64)
    return f"{xs.mean():.3f} +- {xs.std():.3f}" if len(xs) else "n/a"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 prompts, short stage 2, 4 shapes for CISP/SVR (about a minute on a CPU)")
    p.add_argument("--prompts", type=int, default=0, help="number of held-out text prompts (default 13: one per category; quick 2)")
    p.add_argument("--freeform", type=int, default=-1,
                   help=f"number of free-form prompts (default all {len(FREEFORM_PROMPTS)}; quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", default="",
                   help="comma list of sections to skip: text,freeform,cisp,svr and (issue 14, "
                        "backend.bench.quality_diffusion) t2i,refined,gallery")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QualitySettings(**{**QUICK.__dict__}) if args.quick else QualitySettings()
    if args.prompts:
        s.prompts = args.prompts
    if args.freeform >= 0:
        s.freeform = min(args.freeform, len(FREEFORM_PROMPTS))
    s.seed = args.seed
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}

    from backend.models.device import resolve_device
    from backend.models.registry import load_profile, starter_dir
    from backend.training.classifier import ShapeClassifier
    from backend.training.split import heldout_benchmark_set

    device = resolve_device(args.device)
    t_start = time.perf_counter()
    profile = load_profile("starter", device=device)
    root = starter_dir()
    classifier = ShapeClassifier.load(root / "classifier", device=device)
    shapes = heldout_benchmark_set(s.prompts, seed=s.seed)
    more = heldout_benchmark_set(max(s.svr_shapes, s.cisp_shapes, s.prompts), seed=s.seed)
    from backend.pipelines.text_to_shape import stage2_config, validate

    c2 = stage2_config(validate({"prompt": "x", **s.job}, []), device)
    print(f"bench quality: {len(shapes)} held-out prompts, {s.freeform} free-form prompts, device {device}; the "
          f"default job's stage 2: {c2.iterations} iterations x {c2.views} views at {c2.view.resolution}^2, "
          f"{c2.view.n_samples} samples per ray")
    rows: dict[str, dict[str, list]] = {}
    if "text" not in skip:
        rows.update(_text_to_shape(profile, classifier, shapes, s, device))
    if "freeform" not in skip and s.freeform:
        rows.update(_freeform(profile, classifier, s, device))
    if "cisp" not in skip:
        rows.update(_cisp_vs_clip(profile, root, more[: s.cisp_shapes], s, device))
    if "svr" not in skip:
        rows.update(_svr_ablation(profile, root, more[: s.svr_shapes], device))
    from backend.bench import quality_diffusion

    rows.update(quality_diffusion.run_sections(profile, classifier, shapes, skip, device, s.seed, args.quick))
    print()
    print("| method | IoU | F-score@0.05 | category acc | colour acc | CLIP consistency | extra |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        cells = []
        for key in ("iou", "fscore", "cat", "col", "clip"):
            v = r.get(key)
            cells.append(f"{np.mean(v):.3f}" if v else "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {r.get('extra', '')} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f}s")
    return 0


class DefaultJob:
    """The default text-to-shape job of ``run text-to-shape`` / the sidebar, stage by stage, for one prompt.

    It uses the pipeline's own functions and settings (:func:`backend.pipelines.text_to_shape.validate`,
    ``stage2_config`` with the CPU view defaults on a CPU, ``consistency_targets`` for Eq. 5 with the default tau),
    so the benchmark measures what an artist gets.
    """

    def __init__(self, profile, device: str, overrides: dict) -> None:
        self.profile, self.device, self.overrides = profile, device, dict(overrides)
        self.clip, self.svr, self.mapper = profile.clip(), profile.svr(), profile.mapper()
        self.decoder = self.svr.decoder

    def run(self, prompt: str, seed: int, variants: int = 1) -> dict:
        from backend.pipelines.iss_stages import Stage2Aligner, stage1_latent
        from backend.pipelines.iss_texture import texture_pass
        from backend.pipelines.text_to_shape import (colour_targets, consistency_targets, stage2_config,
                                                     texture_config, validate)

        params = validate({"prompt": prompt, **self.overrides, "variants": variants}, [])
        cfg = stage2_config(params, self.device)
        with torch.no_grad():
            f_t = self.clip.encode_text([params["prompt"]]).to(self.device)
        targets, view_seeds, _ = consistency_targets(self.profile, f_t, variants, params["tau"], seed)
        z1 = stage1_latent(self.mapper, f_t)
        tc = texture_config(params, cfg)
        tex_targets = colour_targets(self.profile, f_t, variants, params["tau"], targets, tc, seed)
        out = {"f_t": f_t, "stage1": z1, "stage2": [], "final": [], "decoders": [], "stopped": []}
        for k in range(variants):
            gen = torch.Generator().manual_seed(view_seeds[k])
            al = Stage2Aligner(self.mapper, self.decoder, self.clip, f_t, targets[k], cfg, gen, self.device)
            for _ in range(cfg.iterations):
                al.step()
            with torch.no_grad():
                z = al.latent().detach()
            out["stage2"].append(z)
            out["final"].append(z)
            out["decoders"].append(texture_pass(self.decoder, z, self.clip, tex_targets[k], tc, gen, self.device))
            out["stopped"].append(bool(al.stopped))
        return out


def judge_latent(decoder, z, classifier, clip, f_t, device) -> dict:
    """Classifier category/colour, CLIP consistency with f_T and emptiness of one decoded latent."""
    views = render_decoded(decoder, z).to(device)
    cat, col = classifier.predict_shape(views)
    with torch.no_grad():
        cs = float((clip.encode_image(views) @ f_t.reshape(-1, 1)).mean())
    occ = decoded_occupancy(decoder, z)
    return {"cat": cat, "col": col, "clip": cs, "occ": occ, "empty": not occ.any()}


GROUND_TRUTH_ROW = "ground-truth shapes (the judge's ceiling)"


def _text_to_shape(profile, classifier, shapes, s: QualitySettings, device: str) -> dict:
    from backend.geometry.metrics import f_score, volumetric_iou
    from backend.training.captions import caption
    from backend.training.dataset import voxelize
    from backend.training.render_world import render_shape

    job = DefaultJob(profile, device, s.job)
    clip, svr, decoder = job.clip, job.svr, job.decoder
    names = ("stage-1 (mapper only)", "+ stage-2 alignment", "+ colour pass (default job)",
             "+ diffusion-prior diversity")
    rows = {n: {"iou": [], "fscore": [], "cat": [], "col": [], "clip": []} for n in names}
    ceiling = GROUND_TRUTH_ROW
    rows = {ceiling: {"cat": [], "col": []}, **rows}
    d1, d2, div = [], [], []
    empty = runs = 0
    for k, shape in enumerate(shapes):
        t0 = time.perf_counter()
        prompt = caption(shape)
        gt_vox = voxelize(shape, 32)
        gt_pts = gt_surface(shape, seed=k)
        with torch.no_grad():
            gt_img = torch.from_numpy(render_shape(shape, EVAL_CAMS[:1], 64)["rgb"]).permute(0, 3, 1, 2).to(device)
            f_s = svr.encode(gt_img)
        # the judge on the exact world shape, rendered the way judge_latent renders a result: what it can confirm
        with torch.no_grad():
            gt_views = torch.from_numpy(render_shape(shape, EVAL_CAMS, 48)["rgb"]).permute(0, 3, 1, 2).to(device)
            gt_cat, gt_col = classifier.predict_shape(gt_views)
        rows[ceiling]["cat"].append(float(gt_cat == shape.category))
        rows[ceiling]["col"].append(float(gt_col == shape.colour))
        res = job.run(prompt, s.seed + k, 1)
        latents = {names[0]: [(decoder, res["stage1"])], names[1]: [(decoder, z) for z in res["stage2"]],
                   names[2]: list(zip(res["decoders"], res["final"]))}
        if s.variants > 1:
            more = job.run(prompt, s.seed + k, s.variants)
            latents[names[3]] = list(zip(more["decoders"], more["final"]))
        rel = lambda a: float((a - f_s).norm() / f_s.norm().clamp_min(1e-8))  # noqa: E731
        d1.append(rel(res["stage1"]))
        d2.append(rel(res["final"][0]))
        f_t = res["f_t"]
        for name, zs in latents.items():
            occs = []
            for dec, z in zs:
                j = judge_latent(dec, z, classifier, clip, f_t, device)
                occs.append(j["occ"])
                if name in (names[2], names[3]):
                    runs += 1
                    empty += j["empty"]
                rows[name]["iou"].append(volumetric_iou(j["occ"], gt_vox))
                pts = decoder_surface(dec, z, seed=k)
                rows[name]["fscore"].append(0.0 if pts is None else f_score(pts, gt_pts, FS_THRESHOLD))
                rows[name]["cat"].append(float(j["cat"] == shape.category))
                rows[name]["col"].append(float(j["col"] == shape.colour))
                rows[name]["clip"].append(j["clip"])
            if name == names[3] and len(occs) > 1:
                pair = [1 - volumetric_iou(a, b) for i, a in enumerate(occs) for b in occs[i + 1:]]
                div.append(float(np.mean(pair)))
        print(f"  {k + 1}/{len(shapes)} {prompt!r}: stage-1 IoU {rows[names[0]]['iou'][-1]:.3f} "
              f"cat {rows[names[0]]['cat'][-1]:.0f} col {rows[names[0]]['col'][-1]:.0f}; stage-2 IoU "
              f"{rows[names[1]]['iou'][-1]:.3f} cat {rows[names[1]]['cat'][-1]:.0f} col {rows[names[1]]['col'][-1]:.0f}; "
              f"final cat {rows[names[2]]['cat'][-1]:.0f} col {rows[names[2]]['col'][-1]:.0f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    rows[ceiling]["extra"] = "the classifier on renders of the exact shapes: the most any row can score"
    rows[names[0]]["extra"] = f"d(M(f_T), f_S) = {_mean_std(d1)}"
    rows[names[1]]["extra"] = f"d(M'(f_T), f_S) = {_mean_std(d2)}"
    rows[names[2]]["extra"] = f"shape of stage 2, colour network tuned; empty shapes {empty} of {runs} runs"
    if s.variants > 1:
        rows[names[3]]["extra"] = f"{s.variants} variants/prompt, pairwise 1-IoU = {_mean_std(div) if div else 'n/a'}"
    else:
        rows.pop(names[3])
    return rows


def _freeform(profile, classifier, s: QualitySettings, device: str) -> dict:
    """The default job on free-form prompts (:data:`FREEFORM_PROMPTS`): category (and named colour) accuracy."""
    job = DefaultJob(profile, device, s.job)
    name = f"free-form prompts ({s.freeform}, default job)"
    row = {"cat": [], "col": [], "clip": []}
    empty = 0
    # a shorter run takes prompts spread evenly over the list (it is ordered by category), not its head
    pick = np.unique(np.linspace(0, len(FREEFORM_PROMPTS) - 1, s.freeform).round().astype(int))
    for k, (prompt, category, colour) in enumerate(FREEFORM_PROMPTS[i] for i in pick):
        res = job.run(prompt, s.seed + k, 1)
        j = judge_latent(res["decoders"][0], res["final"][0], classifier, job.clip, res["f_t"], device)
        empty += j["empty"]
        row["cat"].append(float(j["cat"] == category))
        row["clip"].append(j["clip"])
        if colour is not None:
            row["col"].append(float(j["col"] == colour))
        print(f"  free-form {k + 1}/{s.freeform} {prompt!r}: {j['col']} {j['cat']} "
              f"({'ok' if j['cat'] == category else 'wanted ' + category})", flush=True)
    row["extra"] = (f"colour scored on the {len(row['col'])} prompts that name one; empty shapes {empty} of "
                    f"{s.freeform}")
    return {name: row}


def _cisp_vs_clip(profile, root: Path, shapes, s: QualitySettings, device: str) -> dict:
    import torch.nn.functional as F

    from backend.geometry.metrics import volumetric_iou
    from backend.models.cisp import CISP
    from backend.training.dataset import voxelize
    from backend.training.render_world import render_shape

    cisp = profile.cisp()
    clip = profile.clip()
    base_dir = root / "cisp_clipcond"
    base = CISP.load(base_dir, device=device) if (base_dir / "config.json").is_file() else None
    res = cisp.config.voxel_res
    rows = {"image-to-shape, CISP-conditioned": {"iou": []}}
    if base is not None:
        rows["image-to-shape, CLIP-conditioned"] = {"iou": []}
    for k, shape in enumerate(shapes):
        gt = voxelize(shape, 32)
        gt_r = (F.adaptive_avg_pool3d(torch.from_numpy(gt.astype(np.float32))[None, None], res)[0, 0] >= 0.25).numpy()
        img = torch.from_numpy(render_shape(shape, EVAL_CAMS[:1], 64)["rgb"]).permute(0, 3, 1, 2).to(device)
        for name, model, emb in (("image-to-shape, CISP-conditioned", cisp, lambda: cisp.encode_image(img)),
                                 ("image-to-shape, CLIP-conditioned", base, lambda: clip.encode_image(img).float())):
            if model is None:
                continue
            with torch.no_grad():
                cond = emb().repeat(s.cisp_samples, 1)
                vox = model.sample(cond, steps=s.cisp_steps, generator=torch.Generator().manual_seed(s.seed + k))
            for v in vox:
                rows[name]["iou"].append(volumetric_iou(v.cpu().numpy() > 0.5, gt_r))
    for r in rows.values():
        r["extra"] = f"{res}^3 voxels, {s.cisp_samples} samples per image, {s.cisp_steps} DDIM steps, paper 002"
    return rows


def _svr_ablation(profile, root: Path, shapes, device: str) -> dict:
    from backend.geometry.metrics import volumetric_iou
    from backend.models.svr import SVRModel
    from backend.training.dataset import voxelize
    from backend.training.render_world import render_shape

    models = {"SVR shipped (3D occupancy supervision)": profile.svr()}
    for folder, name in (("svr_ssc", "SVR image-supervised, with semantic consistency (paper 004)"),
                         ("svr_no_ssc", "SVR image-supervised, without semantic consistency")):
        if (root / folder / "config.json").is_file():
            models[name] = SVRModel.load(root / folder, device=device)
    rows = {n: {"iou": []} for n in models}
    for k, shape in enumerate(shapes):
        gt = voxelize(shape, 32)
        img = torch.from_numpy(render_shape(shape, EVAL_CAMS[1:2], 64)["rgb"]).permute(0, 3, 1, 2).to(device)
        for name, svr in models.items():
            with torch.no_grad():
                z = svr.encode(img)
            rows[name]["iou"].append(volumetric_iou(decoded_occupancy(svr.decoder, z), gt))
    for r in rows.values():
        r["extra"] = "single-view reconstruction of held-out shapes"
    return rows
