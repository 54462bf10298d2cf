"""Saving and loading this project's own models: ``config.json`` + ``model.safetensors`` in one folder.

Layout of a model folder (the production path: the starter trainers write it, the registry reads it)::

    <dir>/config.json        {"format": 1, "kind": "mapper", "config": {...dataclass fields...}}
    <dir>/model.safetensors  the module's state dict (no pickle anywhere)

CLIP (open_clip's own ``local-dir:`` layout) and diffusion models (diffusers ``save_pretrained`` layout) keep
their ecosystems' formats; see :mod:`backend.models.clip` and :mod:`backend.models.diffusion`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Type, TypeVar

import torch
from torch import nn

from backend.errors import ModelUnavailable

log = logging.getLogger(__name__)

FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

C = TypeVar("C")


def config_to_dict(cfg: Any) -> dict:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: Type[C], data: dict) -> C:
    """Build config dataclass ``cls`` from ``data``, ignoring unknown keys (forward compatible) and restoring tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            log.warning("ignoring unknown config key %r for %s", k, cls.__name__)
            continue
        if isinstance(v, list) and "tuple" in str(fields[k].type).lower():
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)  # type: ignore[call-arg]


def save_module(module: nn.Module, cfg: Any, kind: str, directory: str | Path) -> Path:
    """Write ``module``'s weights (safetensors) and ``cfg`` (JSON) into ``directory``; returns the folder."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(d / WEIGHTS_FILE), metadata={"kind": kind, "format": str(FORMAT)})
    meta = {"format": FORMAT, "kind": kind, "config": config_to_dict(cfg)}
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return d


def read_config(directory: str | Path, kind: str, cfg_cls: Type[C], fetch_hint: str = "") -> C:
    """Read and check ``config.json`` of a model folder; a missing or foreign file is :class:`ModelUnavailable`."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.is_file():
        raise ModelUnavailable(_missing_message(path, kind, fetch_hint))
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"the {kind} config {path} is not valid JSON ({exc}); {fetch_hint}".rstrip("; ")) from exc
    if meta.get("kind") != kind:
        raise ModelUnavailable(f"{path} describes a {meta.get('kind')!r} model, expected {kind!r}")
    if int(meta.get("format", 0)) > FORMAT:
        raise ModelUnavailable(f"{path} uses format {meta.get('format')}, newer than this Stepstone ({FORMAT})")
    return config_from_dict(cfg_cls, meta.get("config", {}))


def load_weights(module: nn.Module, directory: str | Path, kind: str, device: str = "cpu", fetch_hint: str = "") -> nn.Module:
    """Load ``model.safetensors`` into ``module`` (strict), move it to ``device`` and put it in eval mode."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelUnavailable(_missing_message(path, kind, fetch_hint))
    state = load_file(str(path), device="cpu")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(
            f"the {kind} weights {path} do not match its config.json ({str(exc).splitlines()[0]}); "
            f"the folder is probably from another version; {fetch_hint}".rstrip("; ")
        ) from exc
    return module.to(device).eval()


def _missing_message(path: Path, kind: str, fetch_hint: str) -> str:
    msg = f"the {kind} model file {path} is missing."
    if fetch_hint:
        msg += f" {fetch_hint}"
    return msg


class _Seeded:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._ctx = None

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def deterministic(seed: int) -> _Seeded:
    """``with deterministic(seed): build_model()`` builds the same random weights every time, global RNG untouched."""
    return _Seeded(seed)
