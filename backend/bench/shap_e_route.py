"""Benchmark of the ``pretrained`` text-to-shape route (issue 13): Shap-E prior, then Dream3D.

``python -m backend bench text-to-shape --profile pretrained`` (or ``tiny-pretrained``) lands here. With
``pretrained`` the models are full size with random weights, built in memory (no download): Shap-E at its published
sizes (``PriorTransformer`` 24 layers x 1024 on 1024 latent tokens, the CLIP ViT-L/14 text tower,
``ShapERenderer`` with its 1024 -> NeRSTF parameter projection), open_clip ViT-B-32 for the CLIP guidance, and for
``--quality refined`` an SD-1.5-size UNet + VAE for SDS. It prints, measured in one run, seconds to the first
preview (the decoded Shap-E prior) and to the final mesh of a one-variant job. On a CPU the Shap-E steps, grids and
Dream3D iterations are cut (``--cpu-*``) so it finishes; the line says so and gives per-step figures.
Goal on an H100: first preview <= 5 s, "fast" final <= 30 s.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# openai/shap-e prior/config.json and shap_e_renderer/config.json (diffusers' conversion script)
PRIOR_CONFIG = dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024,
                    num_embeddings=1024, additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                    encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4096, embedding_proj_dim=768,
                    clip_embed_dim=2048)


def full_size_shap_e(device: str):
    """Shap-E text -> 3D at its published sizes with random weights (fp16 on CUDA, as the profile loads it)."""
    from diffusers import PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from backend.models import shap_e
    from backend.models.diffusion import _bundled_tokenizer

    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1))
    pipe = ShapEPipeline(prior=PriorTransformer(**PRIOR_CONFIG), text_encoder=text, tokenizer=_bundled_tokenizer(),
                         scheduler=shap_e._scheduler(), shap_e_renderer=ShapERenderer())
    if device.startswith("cuda"):
        pipe.to(torch.float16)
    return shap_e.ShapE(pipe, shap_e.TEXT, device=device, source="random full-size")


def full_size_sd(device: str):
    """An SD-1.5-size UNet + VAE + CLIP ViT-L/14 text encoder with random weights (for the refined quality)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.models.diffusion import DiffusionBundle, _bundled_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    return DiffusionBundle(unet, vae, sched, text, _bundled_tokenizer(), device=device, source="random SD-1.5 size")


class _InMemoryPretrained:
    """The ``pretrained`` profile's routes with models built in memory (bench only; nothing is downloaded)."""

    def __init__(self, device: str, models: dict[str, Any]) -> None:
        from backend.models.registry import Profile

        self._profile = Profile("pretrained", device)
        self._models = models
        self.name, self.device = "pretrained", device

    def component(self, kind: str):
        from backend.models.registry import ComponentStatus

        return ComponentStatus(kind, "random full-size (bench)", kind in self._models, "built in memory")

    def components(self):
        return {k: self.component(k) for k in self._profile.kinds()}

    def capabilities(self):
        return type(self._profile).capabilities(self)

    def kinds(self):
        return self._profile.kinds()

    def has_3d_prior(self) -> bool:
        return True

    def route(self, workflow: str) -> str:
        return self._profile.route(workflow)

    def lift_route(self) -> str:
        return "shap-e" if "shap-e-img2img" in self._models else ""

    def shap_e(self):
        return self._models["shap-e"]

    def clip(self):
        return self._models["clip"]

    def diffusion(self, **_: Any):
        return self._models["diffusion"]

    def subjects(self):
        return None


def timed_job(profile: Any, device: str, params: dict) -> dict[str, float]:
    """Seconds to the first preview (the Shap-E prior), to the end of Shap-E sampling and to the final mesh."""
    from backend.events import JobContext, MeshUpdate, Progress
    from backend.pipelines import text_to_shape as t2s

    p = t2s.validate(dict(params), [], profile=profile)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    for ev in t2s.run(p, [], JobContext(profile=profile, device=device, seed=0)):
        now = time.perf_counter() - t0
        if isinstance(ev, Progress) and ev.stage == "shap-e" and ev.step == 0:
            out["sampling_start"] = now
        if isinstance(ev, Progress) and ev.stage == "shap-e" and ev.step == ev.total:
            out["sampled"] = now
        if isinstance(ev, Progress) and ev.stage == "dream3d":
            out.setdefault("dream3d_first", now)
            out["dream3d_last"], out["dream3d_n"] = now, ev.step
        if isinstance(ev, MeshUpdate) and "first_preview" not in out:
            out["first_preview"] = now
        if isinstance(ev, MeshUpdate) and ev.final:
            sync()
            out["final"] = time.perf_counter() - t0
    return out


def run(args) -> int:
    from backend.models.registry import load_profile

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    cpu = device == "cpu"
    print(f"text-to-shape benchmark, pretrained route (Shap-E prior + Dream3D): device {device}"
          + (" (no CUDA device on this machine)" if not torch.cuda.is_available() else "")
          + f", torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    params = {"prompt": "a red swivel chair", "quality": args.quality, "preview_every": 100000}
    note = ""
    if cpu:
        params.update(prior_steps=args.cpu_prior_steps, prior_resolution=args.cpu_prior_resolution,
                      dream3d_iterations=args.cpu_dream3d_iterations, grid_resolution=64, resolution=64)
        note = (f" (CPU: {args.cpu_prior_steps} Shap-E steps instead of 64, a {args.cpu_prior_resolution}^3 decoding "
                f"grid instead of 128^3, {args.cpu_dream3d_iterations} Dream3D iterations instead of 300)")
    if args.profile == "tiny-pretrained":
        profile, what = load_profile("tiny-pretrained", device=device), "tiny-pretrained models"
    else:
        from backend.models.clip import ClipModel

        t = time.perf_counter()
        models: dict[str, Any] = {"shap-e": full_size_shap_e(device),
                                  "clip": ClipModel.from_pretrained("ViT-B-32", None, device=device)}
        if args.quality == "refined":
            models["diffusion"] = full_size_sd(device)
        profile = _InMemoryPretrained(device, models)
        what = "full-size random weights: Shap-E, ViT-B-32" + (", SD-1.5-size UNet" if "diffusion" in models else "")
        print(f"[{what}] built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    profile.shap_e(), profile.clip()  # a warm backend: models loaded by an earlier job (or the warm-up)
    if args.quality == "refined":
        profile.diffusion()
    print(f"[{what}] models loaded in {time.perf_counter() - t:.1f} s (not counted below)")
    r = timed_job(profile, device, params)
    print(f"[{what}, {device}] {args.quality}: first preview (decoded Shap-E prior) {r['first_preview']:.2f} s, "
          f"final mesh {r['final']:.2f} s{note}")
    if cpu:
        steps = 2 * params["prior_steps"] - 1
        per_step = (r["sampled"] - r["sampling_start"]) / steps
        per_it = (r["dream3d_last"] - r["dream3d_first"]) / max(1, r["dream3d_n"] - 1)
        print(f"[{what}, cpu] Shap-E sampling {per_step:.2f} s/Heun step (127 steps at 64: ~{127 * per_step:.0f} s); "
              f"decode + SDF {r['first_preview'] - r['sampled']:.2f} s; Dream3D {per_it:.2f} s/iteration "
              f"(300: ~{300 * per_it:.0f} s); final mesh {r['final'] - r['dream3d_last']:.2f} s")
    print("goal on an H100: first preview <= 5 s, fast final <= 30 s")
    return 0
