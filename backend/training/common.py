"""Small helpers shared by the starter trainers: seeding, devices, timing, loss logs and manifest entries."""

from __future__ import annotations

import json
import logging
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("stepstone.training")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a trainer is reproducible from its ``--seed``."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> str:
    from backend.models.device import resolve_device

    return resolve_device(name)


@dataclass
class TrainResult:
    """What a trainer returns: its per-step losses, wall time and where it saved the model."""

    name: str
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    out_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def first_last(self, window: int = 5) -> tuple[float, float]:
        """Mean loss over the first and the last ``window`` steps."""
        w = max(1, min(window, len(self.losses) // 2 or 1))
        return float(np.mean(self.losses[:w])), float(np.mean(self.losses[-w:]))

    def summary(self) -> str:
        a, b = self.first_last()
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        return f"{self.name}: {len(self.losses)} steps in {self.wall_s:.1f}s, loss {a:.4g} -> {b:.4g} {extra}".rstrip()


# Wall-clock time (time.time()) after which every training loop stops early and saves what it has; set by the
# CLI's ``--minutes`` (a safety net for a lent GPU whose time is counted, and for "train within N minutes").
_DEADLINE: list[float] = []


def set_deadline(minutes: float) -> None:
    """Stop every later :class:`StepLogger` loop ``minutes`` from now (<= 0 clears the deadline)."""
    _DEADLINE.clear()
    if minutes and minutes > 0:
        _DEADLINE.append(time.time() + 60.0 * minutes)


def past_deadline() -> bool:
    return bool(_DEADLINE) and time.time() >= _DEADLINE[0]


class StepLogger:
    """Logs a loss every ``every`` steps and collects all of them into a :class:`TrainResult`.

    Calling it returns ``True`` once the training deadline (:func:`set_deadline`) has passed: the loop should
    ``break`` and save; the result then records ``stopped_early_at`` (the steps actually done).
    """

    def __init__(self, result: TrainResult, total: int, every: int = 20) -> None:
        self.result, self.total, self.every = result, total, max(1, every)
        self.t0 = time.perf_counter()

    def __call__(self, step: int, loss: float, **extra: float) -> bool:
        self.result.losses.append(float(loss))
        if step % self.every == 0 or step == self.total - 1:
            more = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            log.info("%s step %d/%d loss %.5f %s (%.1fs)", self.result.name, step + 1, self.total, loss, more,
                     time.perf_counter() - self.t0)
        if step < self.total - 1 and past_deadline():
            log.warning("%s: the training deadline has passed; stopping after step %d of %d", self.result.name,
                        step + 1, self.total)
            self.result.metrics[f"{self.result.name}_stopped_early_at"] = step + 1
            return True
        return False

    def finish(self) -> TrainResult:
        self.result.wall_s = time.perf_counter() - self.t0
        return self.result


def command_line() -> str:
    """The command that is running, as a person would type it (recorded in the manifest)."""
    argv = sys.argv[1:]
    return "python -m backend " + " ".join(shlex.quote(a) for a in argv) if argv else "python -m backend train"


def record_model(kind: str, out_dir: Path, seed: int, notes: str, command: str | None = None) -> None:
    """Write the manifest entry of a model saved under the starter folder (or next to it for extra kinds).

    Kinds the registry knows go through :func:`backend.models.registry.write_manifest_entry`; the quality
    classifier (not a profile model) gets the same entry format in the same manifest under ``extras``.
    """
    from backend.models import registry

    out_dir = Path(out_dir)
    root = out_dir.parent
    command = command or command_line()
    if kind in registry.KINDS:
        registry.write_manifest_entry(kind, command, seed, root=root, notes=notes, path=out_dir.name)
        return
    files = {}
    for f in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        files[f.relative_to(out_dir).as_posix()] = {"sha256": registry.sha256_file(f), "size": f.stat().st_size}
    with registry.manifest_lock(root):
        manifest = registry.read_manifest(root)
        manifest.setdefault("extras", {})[kind] = {
            "path": out_dir.name, "files": files, "command": command, "seed": int(seed), "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        registry.write_manifest(root, manifest)
