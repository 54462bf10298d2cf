"""Start and stop a backend subprocess on this machine ("Start local backend" in the preferences).

No ``bpy`` here: the caller passes the settings. The backend writes its connection file where we tell it and its
log (stdout + stderr) into a file whose tail the preferences show.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Optional

log = logging.getLogger("stepstone.addon")


class BackendStartError(Exception):
    """The backend could not be started; the message says which setting to fix."""


def guess_backend_dir(python: str) -> Optional[Path]:
    """The folder holding ``backend/__main__.py`` for an interpreter inside ``<repo>/.venv`` (or ``None``)."""
    p = Path(os.path.abspath(os.path.expanduser(python)))  # not resolve(): a venv's python is a symlink
    for parent in list(p.parents)[:5]:
        if (parent / "backend" / "__main__.py").is_file():
            return parent
    return None


class LocalBackend:
    """One backend subprocess started from Blender."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.folder = Path(tempfile.mkdtemp(prefix="stepstone-backend-"))
        self.log_path = self.folder / "backend.log"
        self.connection_file = self.folder / "backend.json"
        self._log_fh = None
        self.command: list[str] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def start(self, python: str, *, profile: str = "starter", device: str = "auto", port: int = 0,
              backend_dir: str = "", heartbeat_s: float = 1.0, extra_env: Optional[dict] = None) -> None:
        """Launch ``python -m backend serve`` writing its connection file to :attr:`connection_file`."""
        if self.running:
            raise BackendStartError(f"a local backend is already running (pid {self.proc.pid})")
        if not python:
            raise BackendStartError(
                "set the backend's Python interpreter in the Stepstone preferences "
                "(the python of the environment where torch and the backend are installed)"
            )
        exe = Path(python).expanduser()
        if not exe.is_file():
            raise BackendStartError(f"Python interpreter {exe} does not exist; fix it in the Stepstone preferences")
        cwd = Path(backend_dir).expanduser() if backend_dir else guess_backend_dir(str(exe))
        if cwd is not None and not (cwd / "backend").is_dir():
            raise BackendStartError(f"{cwd} has no backend/ folder; set the backend folder in the preferences")
        try:
            self.connection_file.unlink()
        except OSError:
            pass
        cmd = [str(exe), "-m", "backend", "serve", "--connection-file", str(self.connection_file),
               "--profile", profile, "--device", device, "--heartbeat", f"{float(heartbeat_s):g}"]
        if port:
            cmd += ["--port", str(int(port))]
        env = dict(os.environ)
        env.update(extra_env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_fh = open(self.log_path, "ab", buffering=0)
        kw: dict = {}
        if sys.platform == "win32":
            kw["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        else:
            kw["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(cmd, cwd=str(cwd) if cwd else None, stdout=self._log_fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **kw)
        except OSError as exc:
            self._close_log()
            raise BackendStartError(f"could not start {exe}: {exc}") from None
        self.command = cmd
        log.info("started local backend pid %d: %s", self.proc.pid, " ".join(cmd))

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until the connection file exists (tests and scripts; the UI polls :meth:`ready` instead)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if not self.running:
                return False
            time.sleep(0.05)
        return False

    def ready(self) -> bool:
        return self.running and self.connection_file.is_file()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the subprocess (SIGTERM / CTRL_BREAK), then kill it if it does not exit in ``timeout_s``."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                if sys.platform == "win32":
                    proc.send_signal(getattr(signal, "CTRL_BREAK_EVENT", signal.SIGTERM))
                else:
                    proc.terminate()
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
            except OSError:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            except OSError:
                pass
            self._log_fh = None

    def log_tail(self, lines: int = 12) -> list[str]:
        """The last ``lines`` lines of the backend's log."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 16384))
                data = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return list(deque(data.splitlines(), maxlen=lines))

    def status(self) -> str:
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return f"running (pid {self.proc.pid})" + ("" if self.connection_file.is_file() else ", starting...")
        return f"exited with code {rc}"
