"""Fixtures for the Blender extension tests: the built zip (linux-only, cached wheels) and a real backend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).with_name("scenarios.py")


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    """``build_addon.py --platforms linux-x64`` into a temporary folder (wheels cached under build/wheels)."""
    sys.path.insert(0, str(ROOT))
    import build_addon

    out = tmp_path_factory.mktemp("dist")
    return build_addon.build(platforms=["linux-x64"], out_dir=out, cache=ROOT / "build" / "wheels",
                             stage_dir=out / "stage")


class Backend:
    """``python -m backend serve --profile tiny`` (or ``profile``) in a subprocess, with its own runtime and store
    folders."""

    def __init__(self, folder: Path, profile: str = "tiny") -> None:
        self.folder = folder
        self.profile = profile
        self.runtime = folder / "runtime"
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.connection_file = self.runtime / "backend.json"
        self.store = folder / "store"
        self.log = folder / "backend.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Backend":
        env = dict(os.environ, STEPSTONE_RUNTIME_DIR=str(self.runtime), STEPSTONE_STORE_DIR=str(self.store),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backend", "serve", "--connection-file", str(self.connection_file),
                 "--profile", self.profile, "--device", "cpu", "--store", str(self.store), "--heartbeat", "0.25"],
                cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not self.connection_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"backend not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_scenarios(group: str, zip_path: Path, home: Path, *, connection_file: Path | None = None,
                  options: str = "{}", timeout: float = 600.0, env: dict | None = None) -> dict:
    """Run one scenario group in a fresh Python process with ``bpy`` (bpy imports once per process)."""
    import json

    result = home.parent / f"{group}-result.json"
    cmd = [sys.executable, str(SCENARIOS), group, "--zip", str(zip_path), "--home", str(home),
           "--result", str(result), "--options", options]
    if connection_file is not None:
        cmd += ["--connection-file", str(connection_file)]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, cwd=str(ROOT), env=full_env, capture_output=True, text=True, timeout=timeout)
    if not result.is_file():
        raise RuntimeError(f"scenario process wrote no result (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
    data = json.loads(result.read_text())
    data["_stdout"] = proc.stdout[-4000:] + proc.stderr[-4000:]
    return data


@pytest.fixture(scope="session")
def backend_cls():
    """The :class:`Backend` helper (fixtures cannot be imported across test folders without packages)."""
    return Backend


@pytest.fixture(scope="session")
def scenario_runner():
    return run_scenarios
