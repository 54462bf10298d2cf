"""Shap-E (Jun & Nichol 2023, diffusers ``ShapEPipeline`` / ``ShapEImg2ImgPipeline``): the pretrained 3D prior.

The ``pretrained`` profile has no public weights for the ISS SVR model, mapper, prior or CISP (their roles in the
seed papers are "a model trained on 3D data"). Shap-E fills that role with public weights (MIT licence):
``openai/shap-e`` (text -> 3D) and ``openai/shap-e-img2img`` (image -> 3D), loaded with ``from_pretrained`` from
the Hugging Face cache (``python -m backend models download shap-e`` fetches them with progress).

What this module adds on top of diffusers:

- :meth:`ShapE.sample`: the pipelines' own prior sampling loop (CLIP text or image embedding -> ``PriorTransformer``
  with classifier-free guidance -> Heun steps), copied from ``pipeline_shap_e*.py`` so a job reports progress and
  stops within one step when cancelled;
- :meth:`ShapE.sdf_grid`: the latent -> NeRSTF MLP parameters (``params_proj``) -> signed distances on a regular
  grid (``decode_to_mesh`` steps 1-3.1, into a copy of the MLP so a shared pipeline is never modified);
- :meth:`ShapE.decode_mesh`: marching cubes of that grid through the project's own :func:`extract_mesh`
  (scikit-image) instead of the renderer's ``MeshDecoder`` (a freshly built renderer, e.g. the tiny one, has
  all-zero marching-cubes tables and returns no mesh), vertex colours from the MLP's texture head, then the
  project's frame and unit-cube normalisation (:func:`backend.geometry.normalize.normalize_mesh`).

Axes: Shap-E's frame is Z-up, with its default pan camera looking along +Y at theta = 0: the same as the backend's
(Blender's) frame, so :data:`SHAP_E_TO_BACKEND` is the identity. Shap-E meshes "come out rotated by 90 degrees
about X" in Y-up consumers (glTF viewers, trimesh's ``export("x.glb")`` of the raw vertices; diffusers' docs fix it
with ``rotation_matrix(-pi/2, [1, 0, 0])``): our GLB writer applies exactly that rotation at the file boundary
(backend ``(x, y, z)`` -> file ``(x, z, -y)``, :mod:`backend.geometry.io`), so nothing is rotated twice.
``tests/test_shap_e.py`` checks the GLB of a Shap-E mesh equals the diffusers-docs fix of its raw vertices.

Sign: Shap-E's STF head predicts "signed distance" positive *inside* (``MeshDecoder``: "negative values correspond
to the outside"); the project's SDFs are negative inside, so :meth:`ShapE.prior_sdf` negates through
:func:`backend.geometry.mesh_to_sdf` of the decoded mesh (a true distance, which Shap-E's field is not).

:meth:`ShapE.tiny` builds random components with the shapes diffusers' own tests use (``PriorTransformer`` with
2 heads x 16, 32 latent tokens of 16, ``ShapERenderer`` with 8-wide MLP, a 16-wide CLIP text / vision encoder);
the tokenizer is open_clip's bundled BPE written as a ``CLIPTokenizer`` (diffusers' tests download theirs).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from backend.errors import InputError, ModelUnavailable

log = logging.getLogger(__name__)

TEXT = "shap-e"
IMAGE = "shap-e-img2img"
SHAP_E_KINDS = (TEXT, IMAGE)
DEFAULT_MODELS = {TEXT: "openai/shap-e", IMAGE: "openai/shap-e-img2img"}
ENV = {TEXT: "STEPSTONE_SHAP_E_MODEL", IMAGE: "STEPSTONE_SHAP_E_IMG2IMG_MODEL"}
# diffusers' examples: guidance 15 for text, 3 for images; 64 Karras-sigma Heun steps
DEFAULT_GUIDANCE = {TEXT: 15.0, IMAGE: 3.0}
DEFAULT_STEPS = 64
SHAP_E_BBOX = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))  # the renderer's BoundingBoxVolume
SHAP_E_TO_BACKEND = np.eye(3)  # see the module docstring (Axes)
QUERY_BATCH = 4096  # diffusers' decode_to_mesh query_batch_size


def model_id(kind: str) -> str:
    """The hub id (or local folder) of a Shap-E pipeline (``STEPSTONE_SHAP_E_MODEL`` / ``..._IMG2IMG_MODEL``)."""
    if kind not in SHAP_E_KINDS:
        raise InputError(f"unknown Shap-E kind {kind!r}; known: {', '.join(SHAP_E_KINDS)}")
    return os.environ.get(ENV[kind]) or DEFAULT_MODELS[kind]


def download_command(kind: str) -> str:
    return f"python -m backend models download {kind}"


@dataclass
class ShapEShape:
    """A decoded Shap-E shape in the backend frame, normalised into the unit cube, with vertex colours."""

    vertices: np.ndarray  # float32 (N, 3)
    faces: np.ndarray  # uint32 (M, 3)
    colors: Optional[np.ndarray]  # uint8 (N, 3|4)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- tiny parts


def _tiny_prior(image: bool):
    from diffusers import PriorTransformer

    kw = dict(num_attention_heads=2, attention_head_dim=16, embedding_dim=16, num_embeddings=32,
              embedding_proj_dim=16, time_embed_dim=64, num_layers=1, clip_embed_dim=32, additional_embeddings=0,
              time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None, added_emb_type=None)
    if image:
        kw["embedding_proj_norm_type"] = "layer"
    return PriorTransformer(**kw)


def _tiny_renderer():
    from diffusers.pipelines.shap_e import ShapERenderer

    return ShapERenderer(param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)), d_latent=16, d_hidden=8, n_output=12,
                         background=(0.1, 0.1, 0.1))


def _scheduler():
    from diffusers import HeunDiscreteScheduler

    # Shap-E's scheduler config (openai/shap-e scheduler/scheduler_config.json, as in diffusers' tests)
    return HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                 use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)


def build_tiny_pipeline(kind: str, seed: int = 0):
    """A random Shap-E pipeline of ``kind`` with diffusers' test shapes (deterministic for ``seed``)."""
    from backend.models.diffusion import _bundled_tokenizer
    from backend.models.io import deterministic

    if kind == TEXT:
        from diffusers import ShapEPipeline
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        with deterministic(seed):
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=16, projection_dim=16,
                intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                vocab_size=49408, max_position_embeddings=77))
            prior = _tiny_prior(image=False)
            renderer = _tiny_renderer()
        return ShapEPipeline(prior=prior, text_encoder=text_encoder, tokenizer=copy.deepcopy(_bundled_tokenizer()),
                             scheduler=_scheduler(), shap_e_renderer=renderer)
    if kind == IMAGE:
        from diffusers import ShapEImg2ImgPipeline
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        with deterministic(seed):
            image_encoder = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=16, image_size=32, projection_dim=16, intermediate_size=24, num_attention_heads=2,
                num_channels=3, num_hidden_layers=5, patch_size=4))
            prior = _tiny_prior(image=True)
            renderer = _tiny_renderer()
        processor = CLIPImageProcessor(crop_size=32, do_center_crop=True, do_normalize=True, do_resize=True,
                                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                                       image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=32)
        return ShapEImg2ImgPipeline(prior=prior, image_encoder=image_encoder, image_processor=processor,
                                    scheduler=_scheduler(), shap_e_renderer=renderer)
    raise InputError(f"unknown Shap-E kind {kind!r}; known: {', '.join(SHAP_E_KINDS)}")


# ----------------------------------------------------------------------------------------------- the model


class ShapE:
    """A Shap-E pipeline (text or image) with cancellable sampling and SDF / mesh decoding in the project's frame."""

    def __init__(self, pipe: Any, kind: str, device: str = "cpu", source: str = "") -> None:
        self.pipe = pipe
        self.kind = kind
        self.device = device
        self.source = source
        pipe.to(device)
        for m in (pipe.prior, pipe.shap_e_renderer, getattr(pipe, "text_encoder", None),
                  getattr(pipe, "image_encoder", None)):
            if m is not None:
                m.requires_grad_(False)
                m.eval()

    def __repr__(self) -> str:
        return f"ShapE({self.kind!r}, source={self.source!r}, device={self.device!r})"

    # ------------------------------------------------------------------ construction

    @classmethod
    def tiny(cls, kind: str, device: str = "cpu", seed: int = 0) -> "ShapE":
        return cls(build_tiny_pipeline(kind, seed), kind, device=device, source="tiny")

    @classmethod
    def from_pretrained(cls, source: str, kind: str, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                        cache_dir: Optional[str] = None) -> "ShapE":
        """Load with diffusers' ``from_pretrained`` from a local folder or the Hugging Face cache (never the network).

        fp16 on CUDA (the published ``*.fp16.safetensors`` variant when the cache has it), fp32 on a CPU.
        """
        from diffusers import ShapEImg2ImgPipeline, ShapEPipeline

        from backend.models import hub

        pipe_cls = ShapEPipeline if kind == TEXT else ShapEImg2ImgPipeline
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        local = Path(source).expanduser()
        if local.is_dir():
            variant = hub.shap_e_variant(local, kind)
            kwargs: dict = {}
            where = str(local)
        else:
            variant = hub.shap_e_variant(source, kind)
            kwargs = {"local_files_only": True, "cache_dir": cache_dir or hub.hf_cache_dir()}
            where = source
        try:
            pipe = pipe_cls.from_pretrained(where, dtype=dtype, variant=variant, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelUnavailable(
                f"cannot load the Shap-E model {source} ({kind}) from {'that folder' if local.is_dir() else 'the Hugging Face cache'}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Run `{download_command(kind)}` "
                "(needs network access once)") from exc
        return cls(pipe, kind, device=device, source=source)

    def save_pretrained(self, directory: str | Path, variant: Optional[str] = None) -> Path:
        """diffusers' ``save_pretrained`` layout (``model_index.json`` + one folder per component)."""
        d = Path(directory)
        self.pipe.save_pretrained(str(d), safe_serialization=True, variant=variant)
        return d

    # ------------------------------------------------------------------ sampling (the pipelines' loop)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.prior.dtype

    def _condition(self, cond: Any, do_cfg: bool) -> Tensor:
        dev = torch.device(self.device)
        if self.kind == TEXT:
            if not isinstance(cond, str):
                raise InputError("Shap-E text -> 3D needs a prompt (text)")
            return self.pipe._encode_prompt(cond, dev, 1, do_cfg)
        return self.pipe._encode_image([_to_pil(cond)], dev, 1, do_cfg)

    def sample(self, cond: Any, steps: int = DEFAULT_STEPS, guidance_scale: Optional[float] = None,
               generator: Optional[torch.Generator] = None,
               on_step: Optional[Callable[[int, int], None]] = None) -> Tensor:
        """One Shap-E latent ``(1, num_embeddings, embedding_dim)`` for a prompt (text) or an image.

        ``on_step(i, n)`` is called before every scheduler step and once at the end (progress; raise from it to
        cancel). See :meth:`sample_iter` for the loop.
        """
        it = self.sample_iter(cond, steps, guidance_scale, generator)
        while True:
            try:
                i, n = next(it)
            except StopIteration as done:
                return done.value
            if on_step is not None:
                on_step(i, n)

    def sample_iter(self, cond: Any, steps: int = DEFAULT_STEPS, guidance_scale: Optional[float] = None,
                    generator: Optional[torch.Generator] = None):
        """Generator of ``(step, total)`` before every scheduler step and at the end; returns the latent.

        The loop of ``ShapEPipeline.__call__`` / ``ShapEImg2ImgPipeline.__call__``: conditioning embeddings
        (zeros for the unconditional half), latents ``~ N(0, I) * init_noise_sigma``, then per scheduler step
        ``eps_u + s (eps_c - eps_u)`` on the predicted sample (the variance half is dropped).
        """
        from diffusers.utils.torch_utils import randn_tensor

        if steps < 1:
            raise InputError(f"Shap-E needs at least 1 sampling step, got {steps}")
        s = DEFAULT_GUIDANCE[self.kind] if guidance_scale is None else float(guidance_scale)
        do_cfg = s > 1.0
        with torch.no_grad():
            embeds = self._condition(cond, do_cfg)
        scheduler = copy.deepcopy(self.pipe.scheduler)  # stateful (Heun's step index): one per call
        dev = torch.device(self.device)
        scheduler.set_timesteps(int(steps), device=dev)
        prior = self.pipe.prior
        n, d = prior.config.num_embeddings, prior.config.embedding_dim
        latents = randn_tensor((1, n * d), generator=generator, device=dev, dtype=embeds.dtype)
        latents = (latents * scheduler.init_noise_sigma).reshape(1, n, d)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            yield i, len(timesteps)
            with torch.no_grad():
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                scaled = scheduler.scale_model_input(model_in, t)
                pred = prior(scaled, timestep=t, proj_embedding=embeds).predicted_image_embedding
                pred, _ = pred.split(scaled.shape[2], dim=2)
                if do_cfg:
                    uncond, condp = pred.chunk(2)
                    pred = uncond + s * (condp - uncond)
                latents = scheduler.step(pred, timestep=t, sample=latents).prev_sample
        yield len(timesteps), len(timesteps)
        return latents

    # ------------------------------------------------------------------ decoding

    def _mlp(self, latent: Tensor):
        """A copy of the renderer's NeRSTF MLP with the latent's projected parameters (``decode_to_mesh`` 1-2)."""
        r = self.pipe.shap_e_renderer
        params = r.params_proj(latent.to(self.device, r.dtype).reshape(1, *latent.shape[-2:]))
        mlp = copy.deepcopy(r.mlp)
        for name, p in mlp.state_dict().items():
            key = f"nerstf.{name}"
            if key in params:
                p.copy_(params[key].squeeze(0))
        return mlp

    def _query(self, mlp, points: Tensor, what: str, checkpoint: Optional[Callable[[], None]] = None) -> Tensor:
        out = []
        dtype = next(mlp.parameters()).dtype
        for s in range(0, len(points), QUERY_BATCH):
            if checkpoint is not None:
                checkpoint()
            o = mlp(position=points[None, s: s + QUERY_BATCH].to(self.device, dtype),
                    direction=None, ts=None, nerf_level="fine", rendering_mode="stf")
            out.append(getattr(o, what)[0].float())
        return torch.cat(out)

    @torch.no_grad()
    def sdf_grid(self, latent: Tensor, resolution: int,
                 checkpoint: Optional[Callable[[], None]] = None) -> tuple[np.ndarray, Any]:
        """Shap-E's signed distances (R, R, R) (positive inside, Shap-E frame, corners of ``SHAP_E_BBOX``) and the
        MLP that gave them (for colours)."""
        if not 8 <= int(resolution) <= 512:
            raise InputError(f"the Shap-E decoding grid must be 8..512 per side, got {resolution}")
        mlp = self._mlp(latent)
        lin = torch.linspace(SHAP_E_BBOX[0][0], SHAP_E_BBOX[1][0], int(resolution))
        pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)  # volume_query_points
        sdf = self._query(mlp, pts, "signed_distance", checkpoint).reshape(int(resolution), int(resolution),
                                                                         int(resolution))
        return sdf.cpu().numpy(), mlp

    @torch.no_grad()
    def decode_mesh(self, latent: Tensor, resolution: int = 128, target_faces: Optional[int] = None,
                    fill_fraction: float = 0.1, checkpoint: Optional[Callable[[], None]] = None) -> ShapEShape:
        """Marching cubes (scikit-image, :func:`backend.geometry.extract_mesh`) of the SDF grid at 0, vertex colours
        from the texture head (sRGB, as Shap-E predicts them), rotated into the backend frame and normalised into
        the unit cube (longest side 0.9, centred).

        Simplification: with random (tiny) weights the field may have no zero crossing; then the level is moved
        to enclose ``fill_fraction`` of the grid (``info["iso_fallback"]``), as image-to-shape does.
        """
        from backend.errors import StepstoneError
        from backend.geometry import extract_mesh
        from backend.geometry.normalize import normalize_mesh

        sdf, mlp = self.sdf_grid(latent, resolution, checkpoint)
        info: dict = {"shap_e_resolution": int(resolution)}
        level = 0.0
        if not (sdf.min() < level < sdf.max()):
            q = float(np.quantile(sdf, 1.0 - fill_fraction))
            if not (sdf.min() < q < sdf.max()):
                raise StepstoneError("Shap-E produced no shape at all (a constant field); try another seed")
            log.warning("Shap-E field has no surface at 0 (values %.3g..%.3g); using level %.3g", sdf.min(),
                        sdf.max(), q)
            info["iso_fallback"] = q
            level = q

        def colors(points: np.ndarray) -> np.ndarray:
            ch = self._query(mlp, torch.as_tensor(points, dtype=torch.float32), "channels")
            return ch.clamp(0, 1).cpu().numpy()

        v, f, c = extract_mesh(sdf, level=level, bbox=SHAP_E_BBOX, color_fn=colors, inside="above",
                               target_faces=target_faces)
        v = np.asarray(v, dtype=np.float64) @ SHAP_E_TO_BACKEND.T
        v_unit, norm = normalize_mesh(v)
        info["shap_e_center"] = [float(x) for x in norm.center]
        info["shap_e_scale"] = float(norm.scale)
        return ShapEShape(v_unit.astype(np.float32), np.asarray(f, dtype=np.uint32), c, info)


def prior_sdf(shape: ShapEShape, resolution: int) -> np.ndarray:
    """The project's SDF grid (R, R, R) (negative inside, unit cube) of a decoded Shap-E shape, for Dream3D Eq. 9."""
    from backend.geometry import mesh_to_sdf
    from backend.geometry.normalize import Normalization

    sdf, _ = mesh_to_sdf(shape.vertices, shape.faces, int(resolution),
                         normalization=Normalization(np.zeros(3), 1.0))
    return sdf


def _to_pil(image: Any):
    """(1|3, H, W) / (1, 3, H, W) float tensor in [0, 1], a PIL image or a uint8 array -> RGB PIL image."""
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        x = image.detach().float().cpu()
        if x.ndim == 4:
            x = x[0]
        arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        return PILImage.fromarray(arr)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    return PILImage.fromarray(arr).convert("RGB")


def read_model_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())
