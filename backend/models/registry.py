"""Model profiles: which weights a backend uses, where they live, and what they make possible.

A *profile* names a complete model set (DESIGN.md, "Models, weights and profiles"):

- ``starter``: small models this project trains on its procedural shape world, shipped in
  ``backend/models/starter/`` (override the folder with ``STEPSTONE_STARTER_DIR``). Until they are trained the
  capabilities say so and name the command that makes them. The starter text-to-image model
  (``starter/diffusion/``, ``python -m backend train diffusion``: a pixel-space UNet on the starter CLIP's locked
  text tower, issue 14) makes SDS, SDS stylization, Dream3D's image prior and the theme gallery available; without
  it the profile uses the public Stable Diffusion model once that is in the HF cache.
- ``pretrained``: public weights: open_clip ``ViT-B-32`` with pretrained tag ``laion2b_s34b_b79k`` and a Stable
  Diffusion model id through the Hugging Face cache (``STEPSTONE_SD_MODEL``, default
  ``sd-legacy/stable-diffusion-v1-5``). The ISS SVR model, mapper, diffusion prior and CISP have **no public
  weights** for these architectures; the profile looks for them under
  ``$STEPSTONE_MODELS_DIR/pretrained/<kind>/`` (default ``~/.cache/stepstone/models``) and says they are missing.
- ``tiny``: random, very small configurations built deterministically in memory, for tests.
- ``tiny-pretrained``: the ``pretrained`` profile's model set and routes with tiny random weights built in memory
  (tiny CLIP and diffusion as in ``tiny``, tiny Shap-E with diffusers' test shapes, no ISS models), for tests.

3D prior (issue 13): ``pretrained`` also has Shap-E (``shap-e``: ``openai/shap-e``, text -> 3D;
``shap-e-img2img``: ``openai/shap-e-img2img``, image -> 3D; ``STEPSTONE_SHAP_E_MODEL`` /
``STEPSTONE_SHAP_E_IMG2IMG_MODEL`` override the ids or name a local folder), fetched by ``python -m backend models
download shap-e`` into the HF cache. It takes the place of the models trained on 3D data that have no public
weights: text to shape runs Shap-E's shape as the Dream3D shape prior, image to shape and the theme gallery lift
images with Shap-E img2img. :meth:`Profile.route` names the route each workflow takes.

Loading a profile is cheap: models load lazily on first use and are cached in :data:`_MODEL_CACHE` (the only
global state allowed by the design), keyed by (profile, kind, device, source).

Manifest format (``backend/models/starter/manifest.json``), written by :func:`write_manifest_entry`::

    {
      "format": 1,
      "profile": "starter",
      "models": {
        "<kind>": {                                   # clip | diffusion | svr | mapper | prior | cisp
          "path": "<kind>",                           # folder relative to the manifest
          "files": {"<relative file>": {"sha256": "<hex>", "size": <bytes>}, ...},
          "command": "python -m backend train <kind> ...",   # the exact command that made the files
          "seed": 0,
          "created": "2025-01-01T00:00:00Z",
          "notes": "free text: data set, iterations, metrics"
        }
      }
    }

Folder layouts per kind: ``clip`` is open_clip's ``local-dir:`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``); ``diffusion`` is the diffusers ``save_pretrained`` layout (``model_index.json``,
``unet/``, optional ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``); the others are
``config.json`` + ``model.safetensors`` (:mod:`backend.models.io`).

Capabilities (sent in ``welcome``): ``{workflow: {"available": bool, "reason": str, "options": {option: {value:
{"available": bool, "reason": str}}}}}``; ``reason`` is empty when available, else a sentence naming the missing
file and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from backend.errors import InputError, ModelUnavailable

log = logging.getLogger(__name__)

PROFILES = ("starter", "pretrained", "tiny", "tiny-pretrained")
TINY_PROFILES = ("tiny", "tiny-pretrained")
KINDS = ("clip", "diffusion", "svr", "mapper", "prior", "cisp")
PRIOR_KINDS = ("shap-e", "shap-e-img2img")  # the pretrained 3D prior (issue 13)
PRIOR_PROFILES = ("pretrained", "tiny-pretrained")  # profiles whose 3D knowledge comes from Shap-E
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

PRETRAINED_CLIP = ("ViT-B-32", "laion2b_s34b_b79k")
DEFAULT_SD_MODEL = "sd-legacy/stable-diffusion-v1-5"

# The only global state: loaded models, shared by every Profile object of the process.
_MODEL_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.RLock()

# Files whose presence says a local model folder is complete, per kind.
_REQUIRED_FILES = {
    "clip": ("open_clip_config.json", "open_clip_model.safetensors"),
    # (a Stable Diffusion folder also has tokenizer/; the starter pixel model's text encoder tokenises itself)
    "diffusion": ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                  "text_encoder/config.json"),
    "svr": ("config.json", "model.safetensors"),
    "mapper": ("config.json", "model.safetensors"),
    "prior": ("config.json", "model.safetensors"),
    "cisp": ("config.json", "model.safetensors"),
}


def starter_dir() -> Path:
    """Folder of the shipped starter weights (``STEPSTONE_STARTER_DIR`` overrides it)."""
    env = os.environ.get("STEPSTONE_STARTER_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "starter"


def user_models_dir() -> Path:
    """Folder for weights an artist trains or downloads (``STEPSTONE_MODELS_DIR``, default ~/.cache/stepstone/models)."""
    env = os.environ.get("STEPSTONE_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stepstone" / "models"


def sd_model_id() -> str:
    """The Stable Diffusion model id (or local folder) of the ``pretrained`` profile."""
    return os.environ.get("STEPSTONE_SD_MODEL", DEFAULT_SD_MODEL)


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ComponentStatus:
    """Where one model of a profile comes from and whether it is usable now (``models check``)."""

    kind: str
    source: str  # a folder, an open_clip tag or a Hugging Face model id
    present: bool
    detail: str = ""  # what is missing / how it was verified
    fetch: str = ""  # the command that makes or fetches it
    public: bool = True  # False: no public weights exist for this part in this profile

    def reason(self) -> str:
        if self.present:
            return ""
        msg = f"{self.kind} unavailable: {self.detail}"
        if self.fetch:
            msg += f" — run `{self.fetch}`"
        return msg


# --------------------------------------------------------------------------------------------- manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path | None = None) -> dict:
    """The manifest of a weights folder (empty skeleton when there is none yet)."""
    root = Path(root) if root is not None else starter_dir()
    path = root / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "profile": "starter", "models": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{path} is not valid JSON ({exc}); re-run the starter training to rewrite it") from exc
    data.setdefault("models", {})
    return data


def write_manifest_entry(kind: str, command: str, seed: int, root: Path | None = None, notes: str = "",
                         path: str | None = None) -> dict:
    """Hash every file of ``root/<kind>`` and record it in ``root/manifest.json`` with the command and seed.

    Called by the starter trainers after they save a model; returns the entry written.
    """
    if kind not in KINDS:
        raise InputError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    root = Path(root) if root is not None else starter_dir()
    rel = path or kind
    folder = root / rel
    if not folder.is_dir():
        raise ModelUnavailable(f"cannot write the manifest entry: {folder} does not exist")
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[f.relative_to(folder).as_posix()] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    entry = {
        "path": rel,
        "files": files,
        "command": command,
        "seed": int(seed),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notes": notes,
    }
    with manifest_lock(root):
        manifest = read_manifest(root)
        manifest["format"] = MANIFEST_FORMAT
        manifest.setdefault("profile", "starter")
        manifest["models"][kind] = entry
        write_manifest(root, manifest)
    return entry


@contextlib.contextmanager
def manifest_lock(root: Path):
    """An exclusive lock on ``root``'s manifest (trainers of ``train all`` run in parallel processes)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / (MANIFEST + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``root/manifest.json`` atomically (temporary file, then rename)."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)


def verify_manifest_entry(kind: str, root: Path | None = None) -> tuple[bool, str]:
    """Check the files of ``kind`` against their sha256 in the manifest; returns (ok, detail)."""
    root = Path(root) if root is not None else starter_dir()
    entry = read_manifest(root)["models"].get(kind)
    if entry is None:
        return False, f"no entry for {kind} in {root / MANIFEST}"
    folder = root / entry.get("path", kind)
    for rel, info in entry.get("files", {}).items():
        f = folder / rel
        if not f.is_file():
            return False, f"{f} is missing"
        if f.stat().st_size != info.get("size"):
            return False, f"{f} has {f.stat().st_size} bytes, the manifest says {info.get('size')}"
        if sha256_file(f) != info.get("sha256"):
            return False, f"{f} does not match its sha256 in the manifest (corrupted or replaced)"
    return True, f"{len(entry.get('files', {}))} files match their sha256"


# --------------------------------------------------------------------------------------------- profiles


def _train_cmd(kind: str) -> str:
    return f"python -m backend train {kind}"


class Profile:
    """A named model set. Cheap to create; ``clip()``, ``diffusion()``... load lazily and are cached."""

    def __init__(self, name: str, device: str = "cpu") -> None:
        if name not in PROFILES:
            raise InputError(f"unknown model profile {name!r}; known profiles: {', '.join(PROFILES)}")
        self.name = name
        self.device = device

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, device={self.device!r})"

    # ------------------------------------------------------------------ where each part comes from

    def local_dir(self, kind: str) -> Optional[Path]:
        """The folder a local model of ``kind`` lives in for this profile (None for tiny / hub-only parts)."""
        if self.name == "starter":
            entry = read_manifest().get("models", {}).get(kind, {})
            return starter_dir() / entry.get("path", kind)
        if self.name == "pretrained" and kind in KINDS and kind not in ("clip", "diffusion"):
            return user_models_dir() / "pretrained" / kind
        return None

    def kinds(self) -> tuple[str, ...]:
        """The model kinds of this profile (the ``pretrained`` set adds the Shap-E 3D prior)."""
        return KINDS + PRIOR_KINDS if self.name in PRIOR_PROFILES else KINDS

    def has_3d_prior(self) -> bool:
        """Whether this profile's 3D knowledge comes from Shap-E (``pretrained``, ``tiny-pretrained``)."""
        return self.name in PRIOR_PROFILES

    def component(self, kind: str) -> ComponentStatus:
        """Cheap presence check of one part (file existence / HF cache lookup; no hashing, no loading)."""
        if kind not in KINDS + PRIOR_KINDS:
            raise InputError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS + PRIOR_KINDS)}")
        if kind in PRIOR_KINDS:
            return self._prior_component(kind)
        if self.name == "tiny":
            return ComponentStatus(kind, "tiny (random, built in memory)", True, "random weights for tests")
        if self.name == "tiny-pretrained":
            if kind in ("clip", "diffusion"):
                return ComponentStatus(kind, "tiny (random, built in memory)", True, "random weights for tests")
            return ComponentStatus(kind, "not part of tiny-pretrained", False,
                                   f"like the pretrained profile, tiny-pretrained has no {kind} model (no public "
                                   "weights); its 3D prior is Shap-E", public=False)
        if self.name == "pretrained" and kind == "clip":
            from backend.models import hub

            name, tag = PRETRAINED_CLIP
            present, detail = hub.clip_in_cache(name, tag)
            return ComponentStatus(kind, f"open_clip {name} / {tag}", present, detail,
                                   fetch="python -m backend models download clip")
        if self.name == "pretrained" and kind == "diffusion":
            from backend.models import hub

            mid = sd_model_id()
            present, detail = hub.diffusers_in_cache(mid)
            return ComponentStatus(kind, f"diffusers {mid}", present, detail,
                                   fetch="python -m backend models download diffusion")
        folder = self.local_dir(kind)
        assert folder is not None
        missing = [f for f in _REQUIRED_FILES[kind] if not (folder / f).is_file()]
        if not missing:
            return ComponentStatus(kind, str(folder), True, "files present", public=self.name != "pretrained")
        if self.name == "starter" and kind == "diffusion":
            # Without its own text-to-image model the starter set uses the public one once it is downloaded.
            from backend.models import hub

            mid = sd_model_id()
            present, detail = hub.diffusers_in_cache(mid)
            if present:
                return ComponentStatus(kind, f"diffusers {mid}", True, detail)
            return ComponentStatus(
                kind, str(folder), False,
                f"the starter text-to-image model is missing ({folder / missing[0]}) and {mid} is not downloaded "
                "(`python -m backend models download diffusion` fetches it)",
                fetch="python -m backend train diffusion")
        if self.name == "starter":
            return ComponentStatus(kind, str(folder), False,
                                   f"starter weights missing ({folder / missing[0]})", fetch=_train_cmd(kind))
        return ComponentStatus(
            kind, str(folder), False,
            f"no public weights exist for this project's {kind} model; expected a trained copy at {folder / missing[0]}",
            fetch=f"python -m backend train {kind} --out {folder}", public=False)

    def _prior_component(self, kind: str) -> ComponentStatus:
        """Presence of a Shap-E pipeline: tiny in memory, or the HF cache / a local folder for ``pretrained``."""
        from backend.models import shap_e

        fetch = shap_e.download_command(kind)
        if self.name == "tiny-pretrained":
            return ComponentStatus(kind, "tiny Shap-E (random, built in memory)", True, "random weights for tests")
        if self.name != "pretrained":
            return ComponentStatus(kind, f"not part of the {self.name} profile", False,
                                   f"the {self.name} profile has no Shap-E 3D prior; start the backend with "
                                   "`--profile pretrained`", public=False)
        from backend.models import hub

        mid = shap_e.model_id(kind)
        present, detail = hub.shap_e_in_cache(mid, kind)
        return ComponentStatus(kind, f"diffusers {mid}", present, detail, fetch=fetch)

    def route(self, workflow: str) -> str:
        """The route ``workflow`` takes on this profile (a short sentence; shown in the panel)."""
        lift = self.lift_route()
        routes = {
            "text-to-shape": ("Shap-E shape prior, then Dream3D CLIP guidance (paper 001)" if self.has_3d_prior()
                              else "ISS++ stage-1 mapper, stage-2 alignment (paper 000)"),
            "image-to-shape": {"shap-e": "Shap-E img2img lift", "cisp": "CISP voxel diffusion (paper 002)",
                               "svr": "ISS SVR encoder (paper 000)"}.get(lift, "no lifting model"),
            "gallery": ("ThemeStation: theme fine-tune, concept images, "
                        + {"shap-e": "Shap-E img2img", "cisp": "CISP", "svr": "SVR"}.get(lift, "a lift")
                        + " initial model, dual score distillation (paper 003)"),
            "stylize": "ISS++ CLIP stylization, SDS with the text-to-image model (paper 000)",
            "diagnostic": "no models",
        }
        return routes.get(workflow, "")

    def lift_route(self) -> str:
        """The image -> 3D model ``auto`` picks: CISP, else the SVR model, else Shap-E img2img ("" if none)."""
        for kind, name in (("cisp", "cisp"), ("svr", "svr"), ("shap-e-img2img", "shap-e")):
            if kind in self.kinds() and self.component(kind).present:
                return name
        return ""

    def subjects(self) -> Optional[list[str]]:
        """The object categories this profile's shape models were trained on (None: open-world, e.g. pretrained)."""
        if self.name == "starter":
            from backend.training.world import CATEGORIES

            return list(CATEGORIES)
        return None

    def components(self) -> dict[str, ComponentStatus]:
        return {k: self.component(k) for k in self.kinds()}

    # ------------------------------------------------------------------ capabilities

    def capabilities(self) -> dict[str, dict]:
        """Which workflows and options this profile can run, and why not (sent to clients in ``welcome``)."""
        c = self.components()

        def need(*kinds: str) -> tuple[bool, str]:
            reasons = [c[k].reason() for k in kinds if not c[k].present]
            return (not reasons), "; ".join(reasons)

        def opt(ok_reason: tuple[bool, str]) -> dict:
            return {"available": ok_reason[0], "reason": ok_reason[1]}

        caps: dict[str, dict] = {}
        caps["diagnostic"] = {"available": True, "reason": "", "options": {}}

        if self.has_3d_prior():
            # issue 13: Shap-E's shape as the Dream3D shape prior (Eq. 9), CLIP guidance (Eq. 1); refined adds SDS.
            fast = need("clip", "shap-e")
            refined_ok, refined_reason = need("clip", "shap-e", "diffusion")
            diversity = need("shap-e")  # every variant samples its own Shap-E latent
        else:
            # ISS++: CLIP -> mapper -> SVR latent -> decoder (stage 1/2); refined = SDS (Eq. 7) needs diffusion.
            fast = need("clip", "svr", "mapper")
            refined_ok, refined_reason = need("clip", "svr", "mapper", "diffusion")
            diversity = need("prior")  # ISS++ Eq. 5: diversity through the diffusion prior f_{T->I}
        caps["text-to-shape"] = {
            "available": fast[0],
            "reason": fast[1],
            "options": {
                "quality": {"fast": opt(fast), "refined": opt((refined_ok, refined_reason))},
                "diversity": {"prior": opt(diversity), "none": opt((True, ""))},
            },
        }
        # ISS++ Sec. 3.3: texture / shape-and-texture (CLIP) and SDS stylization (Eq. 7).
        clip_only = need("clip")
        sds = need("diffusion")
        caps["stylize"] = {
            "available": clip_only[0] or sds[0],
            "reason": "" if (clip_only[0] or sds[0]) else f"{clip_only[1]}; {sds[1]}",
            "options": {"mode": {"texture": opt(clip_only), "shape": opt(clip_only), "sds": opt(sds)}},
        }
        # image-to-shape: CISP-conditioned voxel diffusion (paper 002) or the ISS SVR encoder.
        cisp_ok, svr_ok = need("cisp"), need("svr")
        methods = {"cisp": opt(cisp_ok), "svr": opt(svr_ok)}
        lift_reasons = [cisp_ok[1], svr_ok[1]]
        if self.has_3d_prior():  # issue 13: Shap-E img2img lifts the image (ThemeStation Sec. 3.2's role)
            shap_ok = need("shap-e-img2img")
            methods["shap-e"] = opt(shap_ok)
            lift_reasons = [shap_ok[1]]  # what an artist of this profile can fetch (the others have no weights)
        lift_ok = any(m["available"] for m in methods.values())
        caps["image-to-shape"] = {
            "available": lift_ok,
            "reason": "" if lift_ok else "; ".join(r for r in lift_reasons if r),
            "options": {"method": methods},
        }
        # ThemeStation: fine-tuned text-to-image (concept images) + lift to 3D + dual score distillation.
        diff = need("diffusion")
        gallery_ok = diff[0] and lift_ok
        reasons = [r for r in (diff[1], "" if lift_ok else caps["image-to-shape"]["reason"]) if r]
        caps["gallery"] = {"available": gallery_ok, "reason": "; ".join(reasons), "options": {}}
        for wf, cap in caps.items():
            cap["route"] = self.route(wf)
        return caps

    # ------------------------------------------------------------------ models (lazy, cached)

    def _cached(self, kind: str, source: str, build: Callable[[], Any]) -> Any:
        key = (self.name, kind, self.device, source)
        with _CACHE_LOCK:
            if key not in _MODEL_CACHE:
                log.info("loading %s for profile %s on %s from %s", kind, self.name, self.device, source)
                _MODEL_CACHE[key] = build()
            return _MODEL_CACHE[key]

    def _require(self, kind: str) -> ComponentStatus:
        st = self.component(kind)
        if not st.present:
            raise ModelUnavailable(_unavailable_paragraph(self.name, st))
        return st

    def clip(self):
        """The CLIP model of this profile (:class:`backend.models.clip.ClipModel`)."""
        from backend.models import clip as clip_mod

        st = self._require("clip")
        if self.name in TINY_PROFILES:
            return self._cached("clip", "tiny", lambda: clip_mod.ClipModel.tiny(device=self.device))
        if self.name == "pretrained":
            name, tag = PRETRAINED_CLIP
            return self._cached("clip", st.source, lambda: clip_mod.ClipModel.from_pretrained(name, tag, device=self.device))
        return self._cached("clip", st.source, lambda: clip_mod.ClipModel.load(st.source, device=self.device))

    def diffusion(self, **options: Any):
        """The text-to-image diffusion bundle (:class:`backend.models.diffusion.DiffusionBundle`).

        ``options`` (dtype, attention_slicing, cpu_offload) go to ``DiffusionBundle.from_pretrained``.
        """
        from backend.models import diffusion as diff_mod

        st = self._require("diffusion")
        key = st.source + (json.dumps(options, sort_keys=True, default=str) if options else "")
        if self.name in TINY_PROFILES:
            return self._cached("diffusion", key, lambda: diff_mod.DiffusionBundle.tiny(device=self.device))
        source = sd_model_id() if st.source.startswith("diffusers ") else st.source
        return self._cached("diffusion", key,
                            lambda: diff_mod.DiffusionBundle.from_pretrained(source, device=self.device, **options))

    def _local_model(self, kind: str, module_name: str, cls_name: str, tiny_factory: str):
        import importlib

        mod = importlib.import_module(f"backend.models.{module_name}")
        cls = getattr(mod, cls_name)
        st = self._require(kind)
        if self.name == "tiny":
            return self._cached(kind, "tiny", lambda: getattr(cls, tiny_factory)(device=self.device))
        hint = f"Run `{st.fetch}`." if st.fetch else ""
        return self._cached(kind, st.source, lambda: cls.load(st.source, device=self.device, fetch_hint=hint))

    def svr(self):
        """The ISS SVR model (:class:`backend.models.svr.SVRModel`): image encoder E_S + implicit decoder D."""
        return self._local_model("svr", "svr", "SVRModel", "tiny")

    def mapper(self):
        """The ISS mapper M (:class:`backend.models.mapper.Mapper`): CLIP feature -> SVR shape latent."""
        return self._local_model("mapper", "mapper", "Mapper", "tiny")

    def prior(self):
        """The diffusion prior (:class:`backend.models.prior.DiffusionPrior`): CLIP text -> CLIP image embedding."""
        return self._local_model("prior", "prior", "DiffusionPrior", "tiny")

    def cisp(self):
        """CISP (:class:`backend.models.cisp.CISP`): joint image/voxel embedding + conditioned voxel diffusion."""
        m = self._local_model("cisp", "cisp", "CISP", "tiny")
        if m.config.image_backbone == "clip" and m.backbone is None:
            m.attach_backbone(self.clip())  # its image tower is the profile's CLIP (paper 002's pretrained E_i)
        return m

    def _shap_e(self, kind: str):
        from backend.models import shap_e

        st = self._require(kind)
        if self.name == "tiny-pretrained":
            return self._cached(kind, "tiny", lambda: shap_e.ShapE.tiny(kind, device=self.device))
        mid = shap_e.model_id(kind)
        return self._cached(kind, st.source, lambda: shap_e.ShapE.from_pretrained(mid, kind, device=self.device))

    def shap_e(self):
        """Shap-E text -> 3D (:class:`backend.models.shap_e.ShapE`, ``openai/shap-e``), the 3D prior."""
        return self._shap_e("shap-e")

    def shap_e_img2img(self):
        """Shap-E image -> 3D (:class:`backend.models.shap_e.ShapE`, ``openai/shap-e-img2img``)."""
        return self._shap_e("shap-e-img2img")

    def load(self, kind: str):
        """The model of ``kind`` (``models check --load``)."""
        return getattr(self, kind.replace("-", "_"))()


def _unavailable_paragraph(profile: str, st: ComponentStatus) -> str:
    msg = f"The {st.kind} model of the {profile!r} profile is not available: {st.detail}."
    if st.fetch:
        msg += f" Run `{st.fetch}` to make it"
        if "download" in st.fetch:
            msg += " (needs network access once; then it works offline from the Hugging Face cache)"
        msg += "."
    if profile == "starter":
        msg += " Or start the backend with `--profile tiny` to try the workflows with random weights."
    return msg


def load_profile(name: str | None = None, device: str = "cpu") -> Profile:
    """The profile ``name`` (None -> ``STEPSTONE_PROFILE`` or ``"starter"``) on ``device``; unknown -> InputError."""
    if name is None:
        name = os.environ.get("STEPSTONE_PROFILE") or "starter"
    name = name.strip().lower()
    return Profile(name, device=device)


def clear_cache() -> None:
    """Forget every loaded model (tests, and freeing GPU memory when the profile changes)."""
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()
