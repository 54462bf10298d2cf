"""Public weights through the Hugging Face hub: cache look-ups (cheap, offline) and downloads (with progress).

Used by the ``pretrained`` profile and by ``python -m backend models download NAME``. A cache look-up never
touches the network; a download with no network or ``HF_HUB_OFFLINE=1`` raises :class:`ModelUnavailable` with a
one-paragraph message naming the file and the command that fetches it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from backend.errors import ModelUnavailable

log = logging.getLogger(__name__)

# Files of a Stable-Diffusion-style diffusers repository that the bundle needs (fp32 safetensors or .bin).
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "tokenizer/*",
    "unet/*.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/*.json", "vae/diffusion_pytorch_model.safetensors",
]
DIFFUSERS_REQUIRED = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "text_encoder/config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id=repo_id, filename=filename)
    return hit if isinstance(hit, str) else None


def clip_hub_file(name: str, tag: str) -> tuple[str, list[str]]:
    """(hub repo id, candidate weight file names) of an open_clip pretrained tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise ModelUnavailable(f"open_clip has no Hugging Face weights for {name} / {tag}; "
                               f"see open_clip.list_pretrained() for valid tags")
    repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" -> default file name
    filename = filename or "open_clip_pytorch_model.bin"
    names = [filename.replace(".bin", ".safetensors").replace("open_clip_pytorch_model", "open_clip_model"),
             filename.replace(".bin", ".safetensors"), filename]
    return repo, list(dict.fromkeys(names))


def clip_in_cache(name: str, tag: str) -> tuple[bool, str]:
    """Whether the open_clip weights of ``name``/``tag`` are in the Hugging Face cache; (present, detail)."""
    try:
        repo, names = clip_hub_file(name, tag)
    except ModelUnavailable as exc:
        return False, exc.message
    for n in names:
        path = _cached(repo, n)
        if path:
            return True, f"cached at {path}"
    return False, f"{repo}/{names[-1]} is not in the Hugging Face cache"


def diffusers_in_cache(model_id: str) -> tuple[bool, str]:
    """Whether a diffusers model (hub id or local folder) has the files the bundle needs; (present, detail)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        missing = [f for f in DIFFUSERS_REQUIRED if not (local / f).is_file()
                   and not (f.endswith(".safetensors") and (local / f.replace(".safetensors", ".bin")).is_file())]
        return (not missing), (f"local folder {local}" if not missing else f"{local / missing[0]} is missing")
    for f in DIFFUSERS_REQUIRED:
        if not _cached(model_id, f):
            return False, f"{model_id}/{f} is not in the Hugging Face cache"
    return True, f"{model_id} in the Hugging Face cache"


def _offline_paragraph(what: str, command: str, exc: Exception | None = None) -> str:
    why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hugging Face hub could not be reached"
    msg = (f"Cannot download {what}: {why}. Run `{command}` on a machine with network access (unset HF_HUB_OFFLINE "
           f"first), or copy the Hugging Face cache folder ({_hf_cache_dir()}) from a machine that has it.")
    if exc is not None:
        msg += f" (detail: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return msg


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old hub
        return "~/.cache/huggingface/hub"


def download_clip(name: str, tag: str) -> str:
    """Fetch open_clip weights of ``name``/``tag`` into the HF cache (tqdm progress); returns the local file."""
    from huggingface_hub import hf_hub_download

    repo, names = clip_hub_file(name, tag)
    present, detail = clip_in_cache(name, tag)
    if present:
        return detail.removeprefix("cached at ")
    cmd = "python -m backend models download clip"
    if _offline():
        raise ModelUnavailable(_offline_paragraph(f"the CLIP weights {repo}/{names[-1]}", cmd))
    last: Exception | None = None
    for n in names:
        try:
            return hf_hub_download(repo_id=repo, filename=n)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            last = exc
    raise ModelUnavailable(_offline_paragraph(f"the CLIP weights {repo}/{names[-1]}", cmd, last))


def download_diffusers(model_id: str) -> str:
    """Fetch the parts of a diffusers model the bundle needs into the HF cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    cmd = "python -m backend models download diffusion"
    if _offline():
        raise ModelUnavailable(_offline_paragraph(f"the diffusion model {model_id} ({DIFFUSERS_REQUIRED[2]})", cmd))
    try:
        return snapshot_download(repo_id=model_id, allow_patterns=DIFFUSERS_PATTERNS)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(_offline_paragraph(f"the diffusion model {model_id}", cmd, exc)) from exc


# --------------------------------------------------------------------------------------------- Shap-E (issue 13)

# Components each Shap-E pipeline loads (model_index.json of openai/shap-e also names an older "renderer" folder,
# which ShapEPipeline does not load: it is neither checked nor downloaded).
SHAP_E_COMPONENTS = {
    "shap-e": ("prior", "text_encoder", "tokenizer", "scheduler", "shap_e_renderer"),
    "shap-e-img2img": ("prior", "image_encoder", "image_processor", "scheduler", "shap_e_renderer"),
}
_CONFIG_FILE = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
                "image_processor": "preprocessor_config.json"}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, read now (``HF_HUB_CACHE`` / ``HF_HOME``), not at import."""
    return _hf_cache_dir()


def _weight_names(component: str, variant: str | None) -> list[str]:
    if variant:
        return [f"{component}/{s}.{variant}.safetensors" for s in _WEIGHT_STEMS]
    return [f"{component}/{s}.{ext}" for s in _WEIGHT_STEMS for ext in ("safetensors", "bin")]


def _shap_e_files(kind: str, exists) -> tuple[bool, str, str | None]:
    """(present, detail, variant) of a Shap-E pipeline, ``exists(relative path) -> bool``."""
    if not exists("model_index.json"):
        return False, "model_index.json is missing", None
    for variant in ("fp16", None):
        missing = None
        for c in SHAP_E_COMPONENTS[kind]:
            if c in _CONFIG_FILE:
                if not exists(f"{c}/{_CONFIG_FILE[c]}"):
                    missing = f"{c}/{_CONFIG_FILE[c]}"
                    break
                continue
            if not exists(f"{c}/config.json"):
                missing = f"{c}/config.json"
                break
            if not any(exists(n) for n in _weight_names(c, variant)):
                missing = _weight_names(c, variant)[0]
                break
        if missing is None:
            return True, "fp16 weights" if variant else "fp32 weights", variant
        if variant is None:
            return False, f"{missing} is missing", None
    return False, "incomplete", None  # pragma: no cover


def shap_e_in_cache(model_id: str, kind: str) -> tuple[bool, str]:
    """Whether the Shap-E pipeline ``model_id`` (hub id or local folder) can load offline; (present, detail)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        ok, detail, _ = _shap_e_files(kind, lambda rel: (local / rel).is_file())
        return ok, (f"local folder {local} ({detail})" if ok else f"{local}: {detail}")
    ok, detail, _ = _shap_e_files(kind, lambda rel: _cached(model_id, rel) is not None)
    if ok:
        return True, f"{model_id} in the Hugging Face cache ({detail})"
    return False, f"{model_id} is not in the Hugging Face cache ({detail})"


def shap_e_variant(model_id: str | Path, kind: str | None = None) -> str | None:
    """``"fp16"`` when every weighted component has the fp16 variant (as openai/shap-e publishes), else None."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        exists = lambda rel: (local / rel).is_file()  # noqa: E731
    else:
        exists = lambda rel: _cached(str(model_id), rel) is not None  # noqa: E731
    kinds = [kind] if kind else list(SHAP_E_COMPONENTS)
    for k in kinds:
        ok, _, variant = _shap_e_files(k, exists)
        if ok:
            return variant
    return None


def download_shap_e(model_id: str, kind: str) -> str:
    """Fetch what the Shap-E pipeline ``kind`` loads into the HF cache (tqdm progress); returns the snapshot folder.

    Weights: the fp16 ``safetensors`` variant when every component publishes it (about 1.3 GB for openai/shap-e),
    else the fp32 files.
    """
    from huggingface_hub import HfApi, snapshot_download

    cmd = f"python -m backend models download {kind}"
    if _offline():
        raise ModelUnavailable(_offline_paragraph(f"the Shap-E model {model_id}", cmd))
    try:
        files = HfApi().list_repo_files(model_id)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(_offline_paragraph(f"the Shap-E model {model_id}", cmd, exc)) from exc
    comps = SHAP_E_COMPONENTS[kind]
    weighted = [c for c in comps if c not in _CONFIG_FILE]
    fp16 = all(any(f in files for f in _weight_names(c, "fp16")) for c in weighted)
    patterns = ["model_index.json"]
    for c in comps:
        patterns += [f"{c}/*.json", f"{c}/*.txt"]
        if c in weighted:
            names = [f for f in _weight_names(c, "fp16" if fp16 else None) if f in files]
            safes = [f for f in names if f.endswith(".safetensors")]
            patterns += (safes or names)[:1]
    try:
        return snapshot_download(repo_id=model_id, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(_offline_paragraph(f"the Shap-E model {model_id}", cmd, exc)) from exc
