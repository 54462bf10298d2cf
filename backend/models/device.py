"""Device selection shared by the CLI, the server and the pipelines."""

from __future__ import annotations

from backend.errors import InputError


def resolve_device(name: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is a clear error."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name
