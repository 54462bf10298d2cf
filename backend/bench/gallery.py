"""Benchmark: time per stage of the theme gallery (renders, fine-tune, concept sampling, initial model, DSD).

``python -m backend bench gallery`` runs the real workflow (:mod:`backend.pipelines.theme_gallery`) and times every
stage from the events it yields, in one run:

- ``--size tiny`` (default on a CPU): the tiny profile with every stage shrunk (what the tests run).
- ``--size full`` (needs CUDA, or ``--allow-cpu``): full-size *random-weight* models of the pretrained
  architectures (Stable Diffusion 1.5 UNet / VAE / text encoder, open_clip ViT-B-32, CISP's default
  configuration) at the paper's sizes (512 px renders, 30 views, batch 8, 192 grid), with the iteration-bound
  stages (fine-tuning, DSD) run for ``--iterations`` steps and projected to the paper's counts (400 / 200 / 5000)
  from the measured time per iteration. Reports peak GPU memory. Goal: a gallery of 6 in under 20 minutes on an
  H200 with peak memory under 24 GB (ThemeStation reports 1-2 hours per asset on an 80 GB A100).

Numbers are measured in this run only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("renders", "theme fine-tune", "concept images", "initial model", "concept prior",
          "dual score distillation", "final mesh")


def tiny_config() -> dict:
    """The stage sizes of the tests (seconds on a CPU): the workflow's "smoke" preset with a few more steps."""
    return {
        "finetune": {"iterations_single": 4, "iterations_multi": 4},
        "concept": {"steps": 4},
        "lift": {"steps": 4},
        "concept_prior": {"iterations": 4},
        "optimize": {"iterations": 8, "mesh_every": 4},
    }


def full_config(iterations: int) -> dict:
    """The paper's sizes with the iteration-bound stages cut to ``iterations`` (projected afterwards)."""
    return {
        "finetune": {"iterations_single": iterations, "iterations_multi": iterations},
        "concept_prior": {"iterations": iterations},
        "optimize": {"iterations": iterations, "mesh_every": max(1, iterations // 2)},
    }


class _FullSizeProfile:
    """Random-weight full-size models with the interface of :class:`backend.models.registry.Profile`."""

    name = "full-size-random"

    def __init__(self, device: str) -> None:
        self.device = device
        self._cache: dict[str, Any] = {}

    def capabilities(self) -> dict:
        ok = {"available": True, "reason": ""}
        return {"gallery": dict(ok, options={}),
                "image-to-shape": dict(ok, options={"method": {"cisp": ok, "svr": ok}})}

    def component(self, kind: str):
        return type("C", (), {"present": True})()

    def diffusion(self):
        if "diffusion" not in self._cache:
            import torch
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextConfig, CLIPTextModel

            from backend.models.diffusion import DiffusionBundle, build_clip_tokenizer

            tok = build_clip_tokenizer(tempfile.mkdtemp(prefix="stepstone-bench-tok-"))
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5 architecture
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                sample_size=512)
            te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, max_position_embeddings=77))
            sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="epsilon", clip_sample=False)
            dtype = torch.float16 if self.device == "cuda" else torch.float32
            self._cache["diffusion"] = DiffusionBundle(unet, vae, sched, te, tok, device=self.device, dtype=dtype,
                                                       source="random full-size SD 1.5 architecture")
        return self._cache["diffusion"]

    def clip(self):
        if "clip" not in self._cache:
            from backend.models.clip import ClipModel

            self._cache["clip"] = ClipModel.from_pretrained("ViT-B-32", None, device=self.device)
        return self._cache["clip"]

    def cisp(self):
        if "cisp" not in self._cache:
            from backend.models.cisp import CISP, CISPConfig

            self._cache["cisp"] = CISP(CISPConfig()).to(self.device).eval()
        return self._cache["cisp"]

    def svr(self):
        if "svr" not in self._cache:
            from backend.models.svr import SVRConfig, SVRModel

            self._cache["svr"] = SVRModel(SVRConfig()).to(self.device).eval()
        return self._cache["svr"]


def _exemplars(n: int):
    import trimesh

    from backend.events import MeshInput

    shapes = [trimesh.creation.box((0.6, 0.4, 1.0)), trimesh.creation.cylinder(0.3, 0.8, sections=24),
              trimesh.creation.icosphere(2, 0.5), trimesh.creation.capsule(0.6, 0.25)]
    out = []
    for i in range(n):
        m = shapes[i % len(shapes)]
        col = np.tile(np.array([[60 + 40 * i, 120, 200 - 30 * i, 255]], np.uint8), (len(m.vertices), 1))
        out.append(MeshInput(f"exemplar_{i}", m.vertices.astype(np.float32), m.faces.astype(np.uint32), col))
    return out


def run_once(profile: Any, device: str, count: int, exemplars: int, config: dict, seed: int = 0,
             preset: str = "paper") -> dict:
    """Run the gallery once; returns per-stage seconds, iteration counts and peak CUDA memory."""
    import torch

    from backend.events import JobContext, MeshUpdate, Progress
    from backend.pipelines import get_workflow

    wf = get_workflow("gallery")
    inputs = _exemplars(exemplars)
    params = wf.validate({"count": count, "preset": preset, "config": config}, inputs)
    ctx = JobContext(profile=profile, device=device, seed=seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    times: "OrderedDict[str, float]" = OrderedDict((s, 0.0) for s in STAGES)
    iters: dict[str, int] = {}
    stage = "renders"
    finals = []
    t_start = last = time.perf_counter()
    for ev in wf.run(params, inputs, ctx):
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if isinstance(ev, Progress):
            stage = ev.stage if ev.stage in times else stage
            if ev.stage in ("theme fine-tune", "concept prior", "dual score distillation") and ev.step > 0:
                iters[ev.stage] = iters.get(ev.stage, 0) + 1
        times[stage] = times.get(stage, 0.0) + (now - last)
        last = now
        if isinstance(ev, MeshUpdate) and ev.final:
            finals.append(ev)
    total = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"times": dict(times), "iters": iters, "total": total, "peak_gib": peak,
            "scores": [dict(f.info) for f in finals]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m backend bench gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "full", "auto"), default="auto",
                   help="tiny profile on the CPU, or full-size random-weight models (auto: full with CUDA)")
    p.add_argument("--count", type=int, default=None, help="gallery size (default 3 tiny, 1 full + projection to 6)")
    p.add_argument("--exemplars", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5, help="full size: iterations measured per iteration stage")
    p.add_argument("--allow-cpu", action="store_true", help="full size without CUDA (very slow)")
    args = p.parse_args(argv)

    import torch

    from backend.models.registry import load_profile

    has_cuda = torch.cuda.is_available()
    size = args.size if args.size != "auto" else ("full" if has_cuda else "tiny")
    print(f"torch {torch.__version__}; CUDA: {torch.cuda.get_device_name(0) if has_cuda else 'no CUDA device'}")
    if size == "tiny" or (size == "full" and not has_cuda and not args.allow_cpu):
        if size == "full":
            print("no CUDA device: full-size GPU numbers were not measured (use --allow-cpu to try on the CPU)")
        count = args.count or 3
        torch.set_num_threads(min(2, torch.get_num_threads()))
        profile = load_profile("tiny", device="cpu")
        t0 = time.perf_counter()
        profile.diffusion(), profile.clip(), profile.cisp()
        load_s = time.perf_counter() - t0
        res = run_once(profile, "cpu", count, args.exemplars, tiny_config(), preset="smoke")
        print(f"gallery of {count} from {args.exemplars} exemplars, tiny profile, CPU "
              f"({torch.get_num_threads()} threads); model load {load_s:.1f} s")
        _print_stages(res)
        print(f"total {res['total']:.1f} s ({res['total'] / count:.1f} s per asset)")
        _print_scores(res)
        if not has_cuda:
            print("GPU full size: no CUDA device on this machine, not measured")
        return 0

    device = "cuda" if has_cuda else "cpu"
    count = args.count or 1
    k = max(1, args.iterations)
    prof = _FullSizeProfile(device)
    t0 = time.perf_counter()
    prof.diffusion(), prof.clip(), prof.cisp()
    load_s = time.perf_counter() - t0
    res = run_once(prof, device, count, args.exemplars, full_config(k))
    print(f"full-size random-weight models on {device}; gallery of {count} from {args.exemplars} exemplars, "
          f"{k} iterations per iteration stage; model build {load_s:.1f} s")
    _print_stages(res)
    from backend.pipelines.theme_gallery import GalleryConfig

    paper = GalleryConfig()
    full_iters = {"theme fine-tune": paper.finetune.iterations(args.exemplars),
                  "concept prior": paper.concept_prior.iterations, "dual score distillation": paper.optimize.iterations}
    projected = dict(res["times"])
    for st, n_full in full_iters.items():
        n_meas = res["iters"].get(st, 0)
        if n_meas:  # measured seconds per iteration x the paper's iterations (per asset for per-asset stages)
            projected[st] = res["times"][st] / n_meas * n_full * (1 if st == "theme fine-tune" else count)
    per_asset = sum(v for s, v in projected.items() if s not in ("renders", "theme fine-tune")) / max(1, count)
    shared = projected["renders"] + projected["theme fine-tune"]
    print("projected to the paper's iteration counts "
          f"(fine-tune {full_iters['theme fine-tune']}, concept prior {full_iters['concept prior']}, "
          f"DSD {full_iters['dual score distillation']}):")
    for st in STAGES:
        print(f"  {st:<24} {projected[st]:9.1f} s")
    g6 = shared + 6 * per_asset
    print(f"projected gallery of 6: {g6 / 60:.1f} min ({per_asset / 60:.1f} min per asset + {shared / 60:.1f} min "
          f"shared); goal < 20 min")
    if res["peak_gib"] is not None:
        print(f"peak GPU memory {res['peak_gib']:.1f} GiB; goal < 24 GB")
    return 0


def _print_stages(res: dict) -> None:
    for st in STAGES:
        n = res["iters"].get(st)
        extra = f"  ({n} it, {res['times'][st] / n * 1000:.0f} ms/it)" if n else ""
        print(f"  {st:<24} {res['times'][st]:8.2f} s{extra}")


def _print_scores(res: dict) -> None:
    for i, info in enumerate(res["scores"]):
        keys = ("theme_clip", "theme_cisp", "diversity_clip")
        vals = " ".join(f"{k}={info[k]:.3f}" for k in keys if isinstance(info.get(k), float))
        print(f"  item_{i}: {vals}")
