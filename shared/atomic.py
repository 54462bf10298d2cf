"""All-or-nothing, owner-only file writes (stdlib only): the connection file and the backend's job store."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(d: Path) -> None:
    """Make a rename inside ``d`` durable (best effort; a no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Any], None], *, prefix: str = ".tmp-", suffix: str = "") -> None:
    """Write ``path`` all or nothing: ``write(fh)`` into a binary, owner-only (0600) temporary file in the same
    folder, fsync it, rename it over ``path``, fsync the folder. On any error the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=str(path.parent))
    try:
        if sys.platform != "win32":
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
