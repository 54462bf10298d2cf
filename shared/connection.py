"""Connection files: how a client finds and authenticates to a running backend (stdlib only).

The backend writes a small JSON file, readable by its owner only (mode 0600), into a per-user runtime folder::

    {"address": "tcp://127.0.0.1:PORT", "key": "<hex>", "backend_id": "...", "protocol_version": 1,
     "pid": 1234, "curve_server_key": "<z85, remote only>", "created": <unix time>}

Runtime folder: ``$STEPSTONE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/stepstone``, else ``~/.stepstone/run``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

from .atomic import write_atomic
from .protocol import PROTOCOL_VERSION

CONNECTION_FILE_NAME = "backend.json"


class ConnectionFileError(Exception):
    """The connection file is missing, unreadable or malformed; the message says what to do."""


def runtime_dir(create: bool = True) -> Path:
    """The per-user runtime folder (created with mode 0700 when ``create``)."""
    env = os.environ.get("STEPSTONE_RUNTIME_DIR")
    if env:
        d = Path(env).expanduser()
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "stepstone"
    else:
        d = Path.home() / ".stepstone" / "run"
    if create:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def default_connection_file() -> Path:
    """``<runtime_dir>/backend.json``."""
    return runtime_dir(create=False) / CONNECTION_FILE_NAME


def write_connection_file(
    path: Union[str, Path, None] = None,
    *,
    address: str,
    key: bytes,
    backend_id: str,
    pid: Optional[int] = None,
    curve_server_key: Optional[bytes] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write the connection file atomically with owner-only permissions (0600) and return its path."""
    path = Path(path) if path is not None else runtime_dir() / CONNECTION_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info: dict[str, Any] = {
        "address": address,
        "key": key.hex(),
        "backend_id": backend_id,
        "protocol_version": PROTOCOL_VERSION,
        "pid": os.getpid() if pid is None else int(pid),
        "created": time.time(),
    }
    if curve_server_key is not None:
        info["curve_server_key"] = curve_server_key.decode("ascii") if isinstance(curve_server_key, bytes) else str(
            curve_server_key
        )
    if extra:
        info.update(extra)
    write_atomic(path, lambda fh: fh.write(json.dumps(info, indent=2).encode("utf-8")), prefix=".backend-",
                 suffix=".json")
    return path


def read_connection_file(path: Union[str, Path, None] = None) -> dict[str, Any]:
    """Read and check a connection file; ``key`` comes back as bytes, ``curve_server_key`` as bytes or None.

    Raises :class:`ConnectionFileError` when the file is missing, malformed, from another protocol version, or
    readable by other users.
    """
    path = Path(path) if path is not None else default_connection_file()
    if not path.is_file():
        raise ConnectionFileError(
            f"no backend connection file at {path}; start the backend with `python -m backend serve`"
        )
    if sys.platform != "win32":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConnectionFileError(
                f"connection file {path} is readable by other users (mode {oct(mode & 0o777)}); "
                "it holds a secret key: run `chmod 600` on it or restart the backend"
            )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConnectionFileError(f"cannot read connection file {path}: {exc}") from None
    for k in ("address", "key", "backend_id", "protocol_version"):
        if k not in info:
            raise ConnectionFileError(f"connection file {path} lacks {k!r}; restart the backend to rewrite it")
    if info["protocol_version"] != PROTOCOL_VERSION:
        raise ConnectionFileError(
            f"backend speaks protocol {info['protocol_version']}, this client speaks {PROTOCOL_VERSION}; "
            "update the Blender extension and the backend to the same version"
        )
    try:
        info["key"] = bytes.fromhex(info["key"])
    except (TypeError, ValueError):
        raise ConnectionFileError(f"connection file {path} has a malformed key") from None
    csk = info.get("curve_server_key")
    info["curve_server_key"] = csk.encode("ascii") if isinstance(csk, str) and csk else None
    info["path"] = str(path)
    return info


def remove_connection_file(path: Union[str, Path], backend_id: str) -> bool:
    """Delete ``path`` if it still belongs to ``backend_id`` (a newer backend may have replaced it)."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("backend_id") != backend_id:
        return False
    try:
        path.unlink()
        return True
    except OSError:
        return False
