"""The Khronos glTF Validator (npm ``gltf-validator``), installed on first use and run on GLB files.

``validate(paths)`` returns each file's report (``numErrors``, ``numWarnings``, ``messages`` ...). The package is
installed with npm into ``build/gltf-validator`` (ignored by git, like the add-on's wheel cache) the first time a
test needs it, which takes about a second; later sessions reuse it. A file lock keeps parallel sessions from
installing at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
VERSION = "2.0.0-dev.3.10"
CACHE = ROOT / "build" / "gltf-validator"
SCRIPT = Path(__file__).with_name("gltf_validate.mjs")


class ValidatorUnavailable(RuntimeError):
    """node/npm missing or the install failed; the message says what to do."""


def _package_dir() -> Path:
    return CACHE / "node_modules" / "gltf-validator"


def _installed_version() -> str:
    try:
        return json.loads((_package_dir() / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return ""


def ensure_installed() -> Path:
    """The validator's package folder, installing ``gltf-validator@VERSION`` with npm when it is missing."""
    if _installed_version() == VERSION:
        return _package_dir()
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise ValidatorUnavailable("the glTF validator needs node and npm on PATH (https://nodejs.org); "
                                   "the tests install gltf-validator with them")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() != VERSION:
            proc = subprocess.run([npm, "install", "--prefix", str(CACHE), f"gltf-validator@{VERSION}",
                                   "--no-audit", "--no-fund", "--no-save", "--loglevel=error"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0 or _installed_version() != VERSION:
                raise ValidatorUnavailable(f"npm install gltf-validator@{VERSION} failed (rc {proc.returncode}):\n"
                                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return _package_dir()


def validate(paths: Iterable[Path]) -> dict[str, dict]:
    """Validate GLB files with one node process; returns ``{path: issues}`` as the validator reports them."""
    paths = [str(p) for p in paths]
    if not paths:
        return {}
    ensure_installed()
    proc = subprocess.run([shutil.which("node") or "node", str(SCRIPT), str(CACHE / "node_modules"), *paths],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"glTF validator failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    reports = json.loads(proc.stdout)
    # a file a still-running backend replaced or removed meanwhile was not read: it is not a file with errors
    return {p: r for p, r in reports.items() if os.path.exists(p)}


def describe(path: str, issues: dict) -> str:
    """A readable summary of one file's report: counts, then each error and warning."""
    lines = [f"{path}: {issues['numErrors']} errors, {issues['numWarnings']} warnings"]
    for m in issues.get("messages", []):
        if m.get("severity", 3) <= 1:  # 0 error, 1 warning
            lines.append(f"  [{m['code']}] {m['message']} at {m.get('pointer', '')}")
    return "\n".join(lines)


IN_FLIGHT_PREFIX = ".tmp-"  # shared.atomic.write_atomic's temporary files, renamed over the real name when complete


class GlbWatch:
    """GLB files under ``root`` that are new or changed since the last call of :meth:`new_files`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.seen: dict[str, tuple[int, int]] = {}

    def new_files(self) -> list[Path]:
        new = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.lower().endswith(".glb") or name.startswith(IN_FLIGHT_PREFIX):
                    continue  # an atomic write in progress (shared.atomic): its final name is checked
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:  # removed meanwhile
                    continue
                key = (st.st_mtime_ns, st.st_size)
                if self.seen.get(p) != key:
                    self.seen[p] = key
                    new.append(Path(p))
        return new
