"""Text to shape on the ``pretrained`` profile (issue 13): Shap-E's shape as the Dream3D shape prior (paper 001).

Dream3D (Sec. 3.1) takes its 3D knowledge from a text-to-shape generator trained on 3D data; with public weights
that generator is Shap-E (``openai/shap-e``). Per variant:

1. **Prior**: a Shap-E latent for the prompt (Heun sampling with classifier-free guidance, progress per step),
   decoded to its SDF grid, meshed by marching cubes in the unit cube of the backend frame with Shap-E's vertex
   colours (:mod:`backend.models.shap_e`). This mesh streams at once as the first preview (seconds on a GPU).
2. **Density grid**: the prior's SDF (a true distance, from :func:`backend.geometry.mesh_to_sdf` of that mesh)
   initialises the DVGO density grid by Eq. 9a/9b (:func:`backend.pipelines.dream3d.init_density_grid`), colour MLP
   random (Sec. 3.1).
3. **CLIP guidance**: :class:`backend.pipelines.dream3d.Dream3DOptimizer`: the CLIP loss (Eq. 1) on renders over
   random solid backgrounds, the Dream Fields transmittance loss and the shape-prior-preserving loss (Eq. 4);
   quality ``refined`` adds SDS with the text-to-image model on the same renders (ISS++ Eq. 7). A preview mesh
   every ``preview_every`` iterations, the final mesh with vertex colours at ``resolution``.

Ours, not the papers': :data:`DREAM3D_ITERATIONS` (the paper shows step 5000 of a long run; 300 keeps the "fast"
quality near half a minute on a GPU), the SDS weight (:data:`SDS_WEIGHT`), and Shap-E's decoding grid
(:data:`PRIOR_RESOLUTION`, Shap-E's own 128 on a GPU). The stage-2 ISS options (``iterations``, ``tau``) do not
apply to this route; ``dream3d_iterations`` sets the optimisation length.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from backend.events import Event, JobContext, MeshUpdate, Progress
from backend.fields import field_color_fn
from backend.models.shap_e import DEFAULT_STEPS, prior_sdf
from backend.pipelines import uv_texture
from backend.pipelines.dream3d import Dream3DOptimizer, density_mesh, init_density_grid, surface_level

DREAM3D_ITERATIONS = 300
SDS_WEIGHT = 1e-3
PRIOR_RESOLUTION = {"cuda": 128, "cpu": 64}
# ours: a decoded prior is decimated (vertex clustering) above this many faces before it streams as a preview and
# becomes Eq. 9's SDF. A real Shap-E shape at 128^3 stays far below; a noisy field (random weights, a bad sample)
# can cross zero millions of times (4.3 M faces measured on an H100), past the project's mesh limit.
PRIOR_MAX_FACES = 300_000
ROUTE = "shap-e+dream3d"
CPU_DEFAULTS = {"views": 2, "render_resolution": 64, "n_samples": 32}  # ours: Dream3D renders on a CPU


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run(params: dict, ctx: JobContext, seed: int) -> Iterator[Event]:
    """The Shap-E + Dream3D route of ``text-to-shape`` (params validated by :mod:`text_to_shape`)."""
    from backend.pipelines import text_to_shape as t2s

    profile, device = ctx.profile, ctx.device
    n, prompt = params["variants"], params["prompt"]
    yield Progress("load", 0, 1, f"loading models ({profile.name}: Shap-E, CLIP)")
    shap = profile.shap_e()
    clip = profile.clip()
    ctx.cancel.check()

    info_base: dict[str, Any] = {"prompt": prompt, "seed": seed, "quality": params["quality"], "method": "dream3d",
                                 "shape_prior": "shap-e", "route": ROUTE}
    kept = t2s.prompt_truncation(clip, prompt)
    if kept is not None:
        info_base["prompt_truncated"] = True
        yield Progress("load", 0, 1, f"prompt longer than CLIP's {clip.context_length} tokens; it reads only: "
                                     f"\"{kept}\"")
    with torch.no_grad():
        f_text = clip.encode_text([prompt]).to(device)

    view = t2s.stage2_config(params, device).view
    if device == "cpu":  # lighter renders on a CPU unless the job says otherwise (as text_to_shape.CPU_VIEW_DEFAULTS)
        params = dict(params, **{k: v for k, v in CPU_DEFAULTS.items() if params.get(k) is None})
    dc = t2s.dream3d_config(params, view)
    if params.get("dream3d_iterations") is None:
        dc = replace(dc, iterations=DREAM3D_ITERATIONS)
    sds = None
    if params["quality"] == "refined":
        yield Progress("load", 0, 1, "loading the text-to-image model (SDS)")
        bundle = profile.diffusion()
        with torch.no_grad():
            sds = (bundle, bundle.encode_prompt([prompt]), bundle.encode_prompt([""]))
        dc = replace(dc, lambda_sds=SDS_WEIGHT)
    steps = params.get("prior_steps") or DEFAULT_STEPS
    guidance = params.get("prior_guidance")
    decode_res = params.get("prior_resolution") or PRIOR_RESOLUTION["cuda" if str(device).startswith("cuda")
                                                                      else "cpu"]
    every = params["preview_every"]

    for k in range(n):
        name = f"variant_{k}"
        suffix = f" {k + 1}/{n}" if n > 1 else ""
        gen = torch.Generator().manual_seed(seed + k)
        info = dict(info_base, variant=k)

        # 1. Shap-E prior
        it = shap.sample_iter(prompt, steps=steps, guidance_scale=guidance, generator=gen)
        while True:
            try:
                i, total = next(it)
            except StopIteration as done:
                latent = done.value
                break
            ctx.cancel.check()
            yield Progress("shap-e" + suffix, i, total, "sampling the Shap-E shape prior")
        shape = shap.decode_mesh(latent, decode_res, target_faces=PRIOR_MAX_FACES, checkpoint=ctx.cancel.check)
        prior_info = dict(info, stage="shap-e prior", **{k2: v for k2, v in shape.info.items()
                                                         if k2 == "iso_fallback"})
        yield MeshUpdate(vertices=shape.vertices, faces=shape.faces, colors=shape.colors, final=False, name=name,
                         info=prior_info)

        # 2. density grid from the prior (Eq. 9)
        ctx.cancel.check()
        sdf = prior_sdf(shape, dc.grid_resolution)
        grid_field = init_density_grid(sdf, dc, device)
        opt = Dream3DOptimizer(grid_field, sdf, clip, f_text, dc, gen, device, sds=sds)

        # 3. CLIP guidance (Eq. 1) + transmittance + Eq. 4 (+ SDS)
        stage = "dream3d" + suffix
        terms: dict[str, float] = {}
        for i in range(dc.iterations):
            ctx.cancel.check()
            with ctx.autocast():  # bf16 autocast on CUDA by default, as text_to_shape's Dream3D (issue 15)
                terms = opt.step()
            yield Progress(stage, i + 1, dc.iterations, " ".join(f"{a}={b:.4f}" for a, b in terms.items()))
            if (i + 1) % every == 0 and i + 1 < dc.iterations:
                ev = t2s._mesh_event(density_mesh(grid_field, params["preview_resolution"],
                                                  surface_level(grid_field, dc), device, allow_empty=True),
                                     name, False, dict(info, stage="dream3d", iteration=i + 1))
                if ev is not None:
                    yield ev
        ctx.cancel.check()
        info.update({f"dream3d_{a}": b for a, b in terms.items()})
        info["prior_iou"] = _iou(opt.occupancy(), sdf < 0)  # how much of the Shap-E shape Eq. 4 kept
        info["dream3d_iterations"] = dc.iterations
        mesh = density_mesh(grid_field, params["resolution"], surface_level(grid_field, dc), device)
        yield from uv_texture.finish(  # issue 16: UV map + baked texture when the job asks for one
            MeshUpdate(vertices=mesh[0], faces=mesh[1], colors=mesh[2], final=True, name=name, info=info),
            uv_texture.options(params), field_color_fn(grid_field, device=device))
