#!/usr/bin/env python3
"""Build the installable Blender extension: ``dist/stepstone-<version>.zip``.

The zip holds the package ``stepstone/`` (the ``blender_manifest.toml`` at its root) made of

* the add-on (``blender_addon/*.py``),
* a copy of ``shared/`` made now, as the sub-package ``stepstone/shared`` (one source of truth; the add-on imports
  it as ``.shared``, and ``shared`` itself uses only relative imports),
* pyzmq wheels for each platform, downloaded with pip (``--only-binary=:all: --platform ... --python-version``)
  at the version pinned in ``uv.lock``, cached under ``build/wheels/`` and listed in the manifest's ``wheels``.

Usage::

    python build_addon.py                                   # one zip per Blender Python, all platforms:
                                                            #   Python 3.11 (Blender 4.2 - 5.0), 3.13 (5.1+)
    python build_addon.py --python-version 3.13              # only Blender 5.1+ (Python 3.13 wheels)
    python build_addon.py --platforms linux-x64 --out /tmp/x # quick linux-only build (tests)

Install the zip in Blender with Edit > Preferences > Get Extensions > Install from Disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent
ADDON_SRC = ROOT / "blender_addon"
SHARED_SRC = ROOT / "shared"
PACKAGE = "stepstone"

log = logging.getLogger("build_addon")

# Blender platform name -> pip --platform tags (first match wins; macOS wheels are universal2)
PLATFORMS: dict[str, list[str]] = {
    "linux-x64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64"],
    "macos-x64": ["macosx_10_15_x86_64"],
}
# Python version -> lowest Blender that ships it, and the first Blender that no longer does (the manifest's
# blender_version_max is exclusive: a zip built for Python 3.11 must not install on 5.1+, whose Python 3.13 cannot
# load its pyzmq wheel). None: no upper bound known yet.
BLENDER_MIN = {"3.11": "4.2.0", "3.13": "5.1.0"}
BLENDER_MAX: dict[str, str | None] = {"3.11": "5.1.0", "3.13": None}


class BuildError(Exception):
    pass


def pinned_version(package: str, lock: Path = ROOT / "uv.lock") -> str:
    """The version of ``package`` in ``uv.lock``."""
    text = lock.read_text(encoding="utf-8")
    m = re.search(r'\[\[package\]\]\s*\nname = "' + re.escape(package) + r'"\s*\nversion = "([^"]+)"', text)
    if not m:
        raise BuildError(f"{package} is not in {lock}; pass --pyzmq-version")
    return m.group(1)


def manifest_version(manifest: Path) -> str:
    text = manifest.read_text(encoding="utf-8")
    if tomllib is not None:
        return str(tomllib.loads(text)["version"])
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise BuildError(f"no version in {manifest}")
    return m.group(1)


def pip_command() -> list[str]:
    """An ordinary pip client: this interpreter's, else one on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for exe in ("pip3", "pip"):
        p = shutil.which(exe)
        if p:
            return [p]
    for exe in ("python3", "python"):
        p = shutil.which(exe)
        if p and subprocess.run([p, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [p, "-m", "pip"]
    raise BuildError("pip is needed to download the pyzmq wheels; install pip or put wheels in build/wheels/")


def _cached_wheel(folder: Path, version: str) -> Path | None:
    wheels = sorted(folder.glob(f"pyzmq-{version}-*.whl"))
    return wheels[0] if wheels else None


def fetch_wheel(platform: str, python_version: str, version: str, cache: Path) -> Path:
    """The pyzmq wheel for one Blender platform, from the cache or downloaded into it."""
    folder = cache / f"py{python_version}" / platform
    hit = _cached_wheel(folder, version)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [*pip_command(), "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--dest", str(folder)]
    for tag in PLATFORMS[platform]:
        cmd += ["--platform", tag]
    cmd.append(f"pyzmq=={version}")
    log.info("downloading pyzmq %s for %s (Python %s)", version, platform, python_version)
    res = subprocess.run(cmd, capture_output=True, text=True)
    hit = _cached_wheel(folder, version)
    if res.returncode != 0 or hit is None:
        raise BuildError(
            f"could not download pyzmq {version} for {platform}, Python {python_version}:\n{res.stderr.strip()[-2000:]}"
        )
    return hit


def _toml_list(items: list[str]) -> str:
    if not items:
        return "[]"
    return "[\n" + "".join(f'  "{i}",\n' for i in items) + "]"


def write_manifest(src: Path, dst: Path, *, wheels: list[str], platforms: list[str], blender_min: str,
                   blender_max: str | None = None) -> None:
    """Copy the manifest, replacing ``wheels``, ``platforms``, ``blender_version_min`` and setting (or leaving out)
    ``blender_version_max``."""
    text = src.read_text(encoding="utf-8")
    text = re.sub(r'^blender_version_max\s*=\s*"[^"]*"\n', "", text, flags=re.M)
    if blender_max:
        text = re.sub(r'^(blender_version_min\s*=\s*"[^"]*"\n)', rf'\1blender_version_max = "{blender_max}"\n', text,
                      count=1, flags=re.M)
    text, n1 = re.subn(r"^wheels\s*=\s*\[[^\]]*\]", "wheels = " + _toml_list(wheels), text, flags=re.M)
    text, n2 = re.subn(r"^platforms\s*=\s*\[[^\]]*\]", "platforms = " + _toml_list(platforms), text, flags=re.M)
    text, n3 = re.subn(r'^blender_version_min\s*=\s*"[^"]*"', f'blender_version_min = "{blender_min}"', text, flags=re.M)
    if not (n1 and n2 and n3):
        raise BuildError(f"{src} must have top-level wheels, platforms and blender_version_min entries")
    dst.write_text(text, encoding="utf-8")
    if tomllib is not None:
        tomllib.loads(text)  # still valid TOML


def _copy_py_tree(src: Path, dst: Path) -> list[Path]:
    """Copy the ``.py`` files of ``src`` (recursively, no caches) to ``dst``."""
    out = []
    for f in sorted(src.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        out.append(target)
    return out


def build(*, platforms: list[str], python_version: str = "3.11", out_dir: Path = ROOT / "dist",
          cache: Path = ROOT / "build" / "wheels", pyzmq_version: str | None = None,
          stage_dir: Path = ROOT / "build" / "addon") -> Path:
    """Build the extension zip and return its path."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise BuildError(f"unknown platform(s) {', '.join(unknown)}; choose from {', '.join(PLATFORMS)}")
    if python_version not in BLENDER_MIN:
        raise BuildError(f"Python {python_version} is not a Blender Python; choose from {', '.join(BLENDER_MIN)}")
    manifest_src = ADDON_SRC / "blender_manifest.toml"
    version = manifest_version(manifest_src)
    zmq_version = pyzmq_version or pinned_version("pyzmq")

    stage = stage_dir / f"py{python_version}" / PACKAGE
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    _copy_py_tree(ADDON_SRC, stage)
    if (stage / "shared").exists():
        raise BuildError("blender_addon/ must not contain its own shared/; it is copied from the repository root")
    _copy_py_tree(SHARED_SRC, stage / "shared")

    wheel_dir = stage / "wheels"
    wheel_dir.mkdir()
    wheel_names: list[str] = []
    for plat in platforms:
        whl = fetch_wheel(plat, python_version, zmq_version, cache)
        if whl.name not in wheel_names:
            shutil.copy2(whl, wheel_dir / whl.name)
            wheel_names.append(whl.name)
    write_manifest(manifest_src, stage / "blender_manifest.toml", wheels=[f"./wheels/{w}" for w in wheel_names],
                   platforms=list(platforms), blender_min=BLENDER_MIN[python_version],
                   blender_max=BLENDER_MAX[python_version])

    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if python_version == "3.11" else f"-py{python_version.replace('.', '')}"
    if sorted(platforms) != sorted(PLATFORMS):
        suffix += "-" + "-".join(platforms)
    zpath = out_dir / f"{PACKAGE}-{version}{suffix}.zip"
    tmp = zpath.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(stage.rglob("*")):
            if f.is_file():
                # wheels are already compressed
                ctype = zipfile.ZIP_STORED if f.suffix == ".whl" else zipfile.ZIP_DEFLATED
                zf.write(f, f.relative_to(stage.parent).as_posix(), compress_type=ctype)
    tmp.replace(zpath)
    log.info("wrote %s (%d wheels: %s)", zpath, len(wheel_names), ", ".join(wheel_names))
    return zpath


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help=f"comma separated, from: {', '.join(PLATFORMS)} (default: all)")
    ap.add_argument("--python-version", default="all", choices=["all", *sorted(BLENDER_MIN)],
                    help="all: one zip per Blender Python (default); 3.11 for Blender 4.2-5.0, 3.13 for 5.1+")
    ap.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default: dist/)")
    ap.add_argument("--cache", default=str(ROOT / "build" / "wheels"), help="wheel cache folder")
    ap.add_argument("--pyzmq-version", default=None, help="default: the version in uv.lock")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    versions = sorted(BLENDER_MIN) if args.python_version == "all" else [args.python_version]
    try:
        for pv in versions:
            path = build(platforms=platforms, python_version=pv, out_dir=Path(args.out), cache=Path(args.cache),
                         pyzmq_version=args.pyzmq_version, stage_dir=Path(args.out) / ".stage")
            hi = BLENDER_MAX[pv]
            print(f"{path}  (Blender {BLENDER_MIN[pv]}{' up to, not including, ' + hi if hi else '+'})")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
