"""Benchmarks: ``python -m backend bench <name> [options]``; each ``backend/bench/<name>.py`` has ``main(argv)``.

Benchmarks print numbers measured in one run (ratios against a baseline where one exists); tests never time.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def available() -> list[str]:
    import backend.bench as pkg

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m backend bench <name> [options]\navailable: " + ", ".join(available()))
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    try:
        mod = importlib.import_module(f"backend.bench.{name}")
    except ModuleNotFoundError:
        print(f"unknown benchmark {argv[0]!r}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    return int(mod.main(argv[1:]) or 0)
