"""Text-to-image diffusion through diffusers: the bundle the SDS / DSD losses and ThemeStation fine-tuning use.

A :class:`DiffusionBundle` holds a ``UNet2DConditionModel``, an optional ``AutoencoderKL`` (``None`` = a
pixel-space model, as the small model this project trains), a DDPM noise schedule and a DDIM sampler (diffusers
schedulers), and a ``transformers`` CLIP text encoder + tokenizer. It loads from a Hugging Face model id (through
the HF cache, ``HF_HUB_OFFLINE`` honoured) or a local folder in the diffusers ``save_pretrained`` layout, and
:meth:`DiffusionBundle.save_pretrained` writes that same layout (``model_index.json``, ``unet/``, ``vae/``,
``scheduler/``, ``text_encoder/``, ``tokenizer/``), so the tiny test model goes through the production code.

Tokenizer offline: the tiny configuration builds a ``CLIPTokenizer`` from open_clip's bundled BPE file (the same
``vocab.json`` / ``merges.txt`` layout as Stable Diffusion's tokenizer folder; token ids are identical to
open_clip's), so nothing is downloaded.

Maths used by the losses (DDPM, Ho et al.; SDS, ISS++ Eq. 7 / DreamFusion; DSD, ThemeStation Sec. 3.3):
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; :meth:`predict_noise` returns eps-hat with classifier-free
guidance ``eps_u + s (eps_c - eps_u)`` (v-prediction models are converted to eps).

Options: fp16 (bf16 on request) on CUDA, attention slicing, and a simple CPU offload that keeps each component
on the CPU and moves it to the GPU only while it runs (a simplification of accelerate's model offload hooks).
LoRA adapters go through peft (:meth:`add_lora`, :meth:`save_lora`, :meth:`load_lora`).

The starter text-to-image model (issue 14, :mod:`backend.training.diffusion_trainer`) is a pixel-space
``UNet2DConditionModel`` with no VAE whose text encoder is the starter CLIP's locked text tower
(:class:`LockedTextEncoder`: all-MiniLM-L6-v2 through open_clip's ``HFTextEncoder``, mean-pooled, unit norm, one
conditioning token), so an SDS prompt is embedded exactly as the starter CLIP embeds it. Its folder has the same
``save_pretrained`` layout; ``model_index.json`` names ``["stepstone", "LockedTextEncoder"]`` and
``text_encoder/config.json`` names the tower (the weights come from the tower's package, checked by sha256), and
there is no ``tokenizer/`` folder (the encoder tokenises with the tower's own WordPiece tokenizer).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.errors import InputError, ModelUnavailable
from backend.models.io import deterministic
from backend.events import checkpoint as cancel_checkpoint

log = logging.getLogger(__name__)

LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TinyDiffusionConfig:
    """Sizes of the tiny test model (random weights; pixel space unless ``latent``)."""

    resolution: int = 16
    block_out_channels: tuple = (16, 32)
    cross_attention_dim: int = 32
    text_layers: int = 2
    latent: bool = False  # True: add a tiny AutoencoderKL (x2 downsampling, 4 latent channels)
    num_train_timesteps: int = 1000
    seed: int = 0


def build_clip_tokenizer(folder: str | Path):
    """Write a Stable-Diffusion-style tokenizer folder (vocab.json + merges.txt) from open_clip's bundled BPE.

    Returns the loaded ``transformers.CLIPTokenizer``. Token ids equal open_clip's (and OpenAI CLIP's).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = gzip.open(default_bpe()).read().decode("utf-8")
    merges = raw.split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [v + "</w>" for v in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


@functools.lru_cache(maxsize=1)
def _bundled_tokenizer():
    """open_clip's BPE as a CLIPTokenizer, built once per process (read into memory; the files are removed)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stepstone-tok-") as tmp:
        return build_clip_tokenizer(tmp)


def _class_from_index(index: dict, name: str, default: type) -> type:
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in ("diffusers", "transformers"):
        try:
            return getattr(importlib.import_module(entry[0]), entry[1])
        except AttributeError:
            log.warning("model_index.json names unknown class %s.%s; using %s", entry[0], entry[1], default.__name__)
    return default


class LockedTextEncoder(nn.Module):
    """The starter CLIP's locked text tower as a diffusion text encoder: ``prompts -> (B, 1, D)`` unit-norm tokens.

    Config (``text_encoder/config.json``): ``{"_class_name": "LockedTextEncoder", "tower": <a
    backend.models.clip.TEXT_TOWERS name or a folder>, "embed_dim": 384, "pooler": "mean_pooler",
    "context_length": 32, "normalize": true}``. The module is open_clip's ``HFTextEncoder`` with the starter CLIP's
    text config (no projection), so ``encode_texts(p)[:, 0]`` equals the starter CLIP's ``encode_text(p)``. Nothing
    of it is trained or saved: :meth:`save_pretrained` writes the config only.
    """

    CONFIG = "config.json"

    def __init__(self, config: dict, pretrained: bool = True) -> None:
        super().__init__()
        import open_clip
        import transformers
        from open_clip.hf_model import HFTextEncoder

        from backend.models.clip import text_tower_path

        self.config = {"_class_name": type(self).__name__, "pooler": "mean_pooler", "context_length": 32,
                       "normalize": True, **dict(config)}
        folder = str(text_tower_path(self.config["tower"], verify=pretrained))
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the unused BERT pooler weights are expected
        try:
            self.tower = HFTextEncoder(folder, output_dim=int(self.config["embed_dim"]), proj_type=None,
                                       pooler_type=self.config["pooler"], pretrained=pretrained)
        finally:
            transformers.logging.set_verbosity(level)
        self.tokenizer = open_clip.tokenizer.HFTokenizer(folder, context_length=int(self.config["context_length"]))

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    def forward(self, ids: Tensor) -> tuple[Tensor]:
        f = self.tower(ids).float()
        if self.config.get("normalize", True):
            f = F.normalize(f, dim=-1)
        return (f[:, None, :],)

    def encode_texts(self, prompts: Sequence[str]) -> Tensor:
        """(B, 1, D) conditioning tokens of ``prompts`` (the pooled sentence embedding as one token)."""
        ids = self.tokenizer(list(prompts)).to(next(self.parameters()).device)
        return self(ids)[0]

    def save_pretrained(self, directory: str | Path, **_: object) -> None:
        write_locked_text_config(directory, self.config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, pretrained: bool = True) -> "LockedTextEncoder":
        path = Path(directory) / cls.CONFIG
        if not path.is_file():
            raise OSError(f"{path} is missing")
        return cls(json.loads(path.read_text()), pretrained=pretrained)


def write_locked_text_config(directory: str | Path, config: dict) -> Path:
    """Write ``text_encoder/config.json`` of a :class:`LockedTextEncoder` (no weights: they come from the package)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": LockedTextEncoder.__name__, **dict(config)}
    (d / LockedTextEncoder.CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return d / LockedTextEncoder.CONFIG


def write_model_index(directory: str | Path, unet: nn.Module, vae: Optional[nn.Module], scheduler,
                      text_encoder_class: tuple[str, str], tokenizer: bool = True) -> Path:
    """``model_index.json`` of the diffusers layout (``[None, None]`` for a missing VAE / tokenizer)."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline" if vae is not None else "StepstonePixelDiffusion",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(unet).__name__],
        "vae": ["diffusers", type(vae).__name__] if vae is not None else [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": list(text_encoder_class),
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer else [None, None],
    }
    path = Path(directory) / "model_index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


class DiffusionBundle:
    """UNet (+ optional VAE) + schedulers + text encoder/tokenizer, with the calls SDS/DSD/fine-tuning need."""

    def __init__(self, unet: nn.Module, vae: Optional[nn.Module], scheduler, text_encoder: nn.Module, tokenizer,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
                 source: str = "") -> None:
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.cpu_offload = bool(cpu_offload and device != "cpu")
        self.source = source
        # The training/noising schedule (DDPM) and the sampler (DDIM) share the model's beta schedule.
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        # predict_noise always returns eps, so the sampler is configured for eps whatever the model predicts.
        self.sampler = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        home = "cpu" if self.cpu_offload else device
        for m in self._modules():
            m.to(home)
            if next(m.parameters()).dtype != dtype:
                m.to(dtype=dtype)
            m.eval()
            m.requires_grad_(False)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder) if m is not None]

    # ------------------------------------------------------------------ properties

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side length the model works at (latent size x VAE factor)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                        attention_slicing: bool = False, cpu_offload: bool = False,
                        local_files_only: Optional[bool] = None) -> "DiffusionBundle":
        """Load from a hub model id or a local diffusers folder; missing files are :class:`ModelUnavailable`."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        src = str(source)
        local = Path(src).expanduser().is_dir()
        if local_files_only is None:
            local_files_only = local or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
        torch_dtype = _resolve_dtype(dtype, device)
        kw = {"local_files_only": local_files_only}
        try:
            index = _read_index(src, local, local_files_only)
            unet = _class_from_index(index, "unet", UNet2DConditionModel).from_pretrained(src, subfolder="unet", **kw)
            vae = None
            if index.get("vae") not in (None, [None, None]) and (not local or (Path(src) / "vae").is_dir()):
                vae = _class_from_index(index, "vae", AutoencoderKL).from_pretrained(src, subfolder="vae", **kw)
            scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
            if _locked_text(index):  # the starter pixel model: the starter CLIP's locked text tower
                if not local:
                    raise OSError("a model with a LockedTextEncoder loads from a local folder only")
                text_encoder, tokenizer = LockedTextEncoder.from_pretrained(Path(src) / "text_encoder"), None
            else:
                text_encoder = _class_from_index(index, "text_encoder", CLIPTextModel).from_pretrained(
                    src, subfolder="text_encoder", **kw)
                tokenizer = _class_from_index(index, "tokenizer", CLIPTokenizer).from_pretrained(
                    src, subfolder="tokenizer", **kw)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"the diffusion model {src} could not be loaded: {str(exc).splitlines()[0]}. "
                + ("Check the folder was written by `save_pretrained` (model_index.json, unet/, scheduler/, "
                   "text_encoder/, tokenizer/)." if local else
                   "Run `python -m backend models download diffusion` with network access (it fills the Hugging "
                   "Face cache; afterwards it works offline).")
            ) from exc
        bundle = cls(unet, vae, scheduler, text_encoder, tokenizer, device=device, dtype=torch_dtype,
                     cpu_offload=cpu_offload, source=src)
        if attention_slicing:
            bundle.enable_attention_slicing()
        return bundle

    @classmethod
    def tiny(cls, device: str = "cpu", config: Optional[TinyDiffusionConfig] = None,
             tokenizer_dir: str | Path | None = None) -> "DiffusionBundle":
        """A random, very small bundle (deterministic for a seed) for tests; pixel space unless ``config.latent``."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = config or TinyDiffusionConfig()
        if tokenizer_dir is not None:
            tokenizer = build_clip_tokenizer(tokenizer_dir)
        else:
            tokenizer = copy.deepcopy(_bundled_tokenizer())
        factor = 2 if cfg.latent else 1
        ch = cfg.block_out_channels
        with deterministic(cfg.seed):
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=cfg.cross_attention_dim, intermediate_size=2 * cfg.cross_attention_dim,
                num_hidden_layers=cfg.text_layers, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
            unet = UNet2DConditionModel(
                sample_size=cfg.resolution // factor, in_channels=4 if cfg.latent else 3,
                out_channels=4 if cfg.latent else 3, layers_per_block=1, block_out_channels=ch,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",),
                cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
            vae = None
            if cfg.latent:
                vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                    layers_per_block=1, norm_num_groups=8, sample_size=cfg.resolution)
        scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False)
        return cls(unet, vae, scheduler, text_encoder, tokenizer, device=device, source="tiny")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the diffusers layout (``model_index.json`` + one folder per component)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(d / "unet"), safe_serialization=True)
        if self.vae is not None:
            self.vae.save_pretrained(str(d / "vae"), safe_serialization=True)
        self.scheduler.save_pretrained(str(d / "scheduler"))
        if isinstance(self.text_encoder, LockedTextEncoder):
            self.text_encoder.save_pretrained(d / "text_encoder")
            write_model_index(d, self.unet, self.vae, self.scheduler, ("stepstone", "LockedTextEncoder"),
                              tokenizer=False)
            return d
        self.text_encoder.save_pretrained(str(d / "text_encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(d / "tokenizer"))
        if not (d / "tokenizer" / "vocab.json").is_file():  # transformers 5 writes tokenizer.json only
            build_clip_tokenizer(d / "tokenizer")
        write_model_index(d, self.unet, self.vae, self.scheduler, ("transformers", type(self.text_encoder).__name__))
        return d

    # ------------------------------------------------------------------ options

    def enable_attention_slicing(self, slice_size: str | int = "auto") -> None:
        """Compute attention in slices (less memory, a little slower)."""
        if hasattr(self.unet, "set_attention_slice"):
            self.unet.set_attention_slice(slice_size)

    @contextlib.contextmanager
    def _on_device(self, module: nn.Module) -> Iterator[nn.Module]:
        if not self.cpu_offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states (B, L, D) used as cross-attention conditioning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise InputError("encode_prompt needs at least one prompt")
        if isinstance(self.text_encoder, LockedTextEncoder):
            with torch.no_grad(), self._on_device(self.text_encoder) as te:
                hidden = te.encode_texts(list(prompts))
            return hidden.to(self.device, self.dtype)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad(), self._on_device(self.text_encoder) as te:
            hidden = te(ids.to(te.device))[0]
        return hidden.to(self.device, self.dtype)

    # ------------------------------------------------------------------ image <-> model space

    def to_model_space(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> x0 in model space (VAE latents x scaling factor, or pixels in [-1, 1]).

        Images are resized to :attr:`resolution`; differentiable (SDS back-propagates through it).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        r = self.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=x.shape[-1] > r)
        x = (x * 2.0 - 1.0).to(self.dtype)
        if self.vae is None:
            return x
        with self._on_device(self.vae) as vae:
            dist = vae.encode(x.to(vae.device)).latent_dist
            z = dist.sample(generator) if generator is not None else dist.mean
        return (z * self.vae.config.scaling_factor).to(self.device)

    def from_model_space(self, x0: Tensor) -> Tensor:
        """Model-space samples -> images (B, 3, H, W) in [0, 1]."""
        x = x0.to(self.device, self.dtype)
        if self.vae is not None:
            with self._on_device(self.vae) as vae:
                x = vae.decode((x / self.vae.config.scaling_factor).to(vae.device)).sample.to(self.device)
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ denoising

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM Eq. 4)."""
        a = self.alphas_cumprod.to(x0.device)[t.long()].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_noise(self, x_t: Tensor, t: Tensor | int, cond: Tensor, uncond: Optional[Tensor] = None,
                      guidance_scale: float = 1.0) -> Tensor:
        """eps-hat(x_t, t, y) with classifier-free guidance when ``uncond`` is given: ``eps_u + s (eps_c - eps_u)``.

        Gradients flow to ``x_t`` and to any trainable (e.g. LoRA) parameters; SDS callers usually wrap it in
        ``torch.no_grad()`` (ISS++ Eq. 7 skips the U-Net Jacobian).
        """
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long()
        if t.ndim == 0:
            t = t.expand(b)
        if cond.shape[0] != b:
            cond = cond.expand(b, *cond.shape[1:]) if cond.shape[0] == 1 else cond
        use_cfg = uncond is not None and guidance_scale != 1.0
        if use_cfg:
            if uncond.shape[0] != b:
                uncond = uncond.expand(b, *uncond.shape[1:])
            x_in, t_in, c_in = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])
        else:
            x_in, t_in, c_in = x_t, t, cond
        with self._on_device(self.unet) as unet:
            out = unet(x_in.to(unet.device, self.dtype), t_in.to(unet.device),
                       encoder_hidden_states=c_in.to(unet.device, self.dtype)).sample.to(x_t.device)
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            a = self.alphas_cumprod.to(x_t.device)[t_in].view(-1, 1, 1, 1).to(out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * x_in.to(out.dtype)
        elif self.prediction_type == "sample":  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            a = self.alphas_cumprod.to(x_t.device)[t_in].view(-1, 1, 1, 1).to(out.dtype)
            out = (x_in.to(out.dtype) - a.sqrt() * out) / (1 - a).sqrt().clamp_min(1e-6)
        if use_cfg:
            eps_u, eps_c = out.chunk(2)
            return eps_u + guidance_scale * (eps_c - eps_u)
        return out

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], steps: int = 30, guidance_scale: float = 7.5,
               generator: Optional[torch.Generator] = None, negative_prompt: str = "") -> Tensor:
        """DDIM sampling with classifier-free guidance; returns images (B, 3, R, R) in [0, 1]."""
        if steps < 1:
            raise InputError("sample() needs steps >= 1")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
        size = self.resolution // self.vae_scale_factor
        shape = (len(prompts), self.latent_channels, size, size)
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")
        x = x.to(self.device, self.dtype) * self.sampler.init_noise_sigma
        self.sampler.set_timesteps(steps, device=self.device)
        for t in self.sampler.timesteps:
            cancel_checkpoint()
            eps = self.predict_noise(x, t, cond, uncond, guidance_scale)
            x = self.sampler.step(eps, t, x).prev_sample
        return self.from_model_space(x)

    # ------------------------------------------------------------------ LoRA (peft)

    def add_lora(self, rank: int = 4, alpha: Optional[float] = None,
                 target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, adapter_name: str = "default",
                 dropout: float = 0.0) -> list[nn.Parameter]:
        """Add a LoRA adapter to the UNet's attention projections (peft); returns its trainable parameters.

        ThemeStation (paper 003, Sec. 3.2 / App. A) fine-tunes the text-to-image model on exemplar renders; LoRA
        is the parameter-efficient form of that fine-tuning.
        """
        from peft import LoraConfig

        if rank < 1:
            raise InputError("LoRA rank must be >= 1")
        cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                         target_modules=list(target_modules), init_lora_weights=True)
        self.unet.add_adapter(cfg, adapter_name=adapter_name)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n and adapter_name in n]
        for p in params:
            p.data = p.data.float() if self.dtype == torch.float32 else p.data
            p.requires_grad_(True)
        return params

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    def save_lora(self, directory: str | Path, adapter_name: str = "default") -> Path:
        """Write the adapter (``adapter_model.safetensors`` + ``adapter_config.json``, peft's file names)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.unet, adapter_name=adapter_name)
        if not state:
            raise InputError(f"the UNet has no LoRA adapter named {adapter_name!r}; call add_lora() first")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(d / LORA_WEIGHTS))
        cfg = self.unet.peft_config[adapter_name].to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
        (d / LORA_CONFIG).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        return d

    def load_lora(self, directory: str | Path, adapter_name: str = "default") -> None:
        """Load an adapter written by :meth:`save_lora` and make it active."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        d = Path(directory)
        for f in (LORA_WEIGHTS, LORA_CONFIG):
            if not (d / f).is_file():
                raise ModelUnavailable(f"the LoRA adapter file {d / f} is missing; re-run the fine-tuning that makes it")
        raw = json.loads((d / LORA_CONFIG).read_text())
        known = set(LoraConfig.__dataclass_fields__)
        cfg = LoraConfig(**{k: v for k, v in raw.items() if k in known and k not in ("peft_type", "task_type")})
        if adapter_name not in getattr(self.unet, "peft_config", {}):
            self.unet.add_adapter(cfg, adapter_name=adapter_name)
        state = load_file(str(d / LORA_WEIGHTS))
        set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)
        self.unet.set_adapter(adapter_name)
        self.unet.to(self.device if not self.cpu_offload else "cpu")


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise InputError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    if table[name] != torch.float32 and not device.startswith("cuda"):
        log.warning("%s on the CPU is slow or unsupported; using fp32", name)
        return torch.float32
    return table[name]


def _locked_text(index: dict) -> bool:
    entry = index.get("text_encoder")
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "stepstone"


def _read_index(src: str, local: bool, local_files_only: bool) -> dict:
    if local:
        path = Path(src).expanduser() / "model_index.json"
        if not path.is_file():
            raise OSError(f"{path} is missing")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(src, "model_index.json", local_files_only=local_files_only)).read_text())
