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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(name: str | None) -> str:
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    return name


def enable_tf32(device: str) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (issue 15): the Ampere/Hopper tensor cores at ~10 bits of
    mantissa, what PyTorch's own docs recommend for training-style loops; no effect on a CPU."""
    import torch

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup_precision(device: str, precision: str | None) -> str:
    """The backend-wide part of ``--precision`` (``serve`` and ``run``): check the name and turn TF32 on for a
    CUDA device unless fp32 was asked for; returns the checked name for :func:`autocast`."""
    precision = check_precision(precision)
    if device != "cpu" and precision != "fp32":
        enable_tf32(device)
    return precision


def autocast(device: str, precision: str = "auto"):
    """The mixed-precision context of an iterative stage (issue 15): ``auto`` is bf16 autocast on CUDA and plain
    float32 on a CPU (where the starter models' small matmuls gain nothing from it); ``bf16`` / ``fp16`` ask for
    that autocast dtype on either device (fp16 on CUDA only); ``fp32`` turns autocast off. Parameters and
    optimiser state stay float32 (autocast casts per operation), so losses and updates are float32."""
    import contextlib

    import torch

    precision = check_precision(precision)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "fp32" or (precision == "auto" and kind == "cpu"):
        return contextlib.nullcontext()
    if precision == "fp16":
        if kind == "cpu":
            raise InputError("fp16 autocast needs a CUDA device; use bf16 or fp32 on a CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(kind, dtype=torch.bfloat16)
