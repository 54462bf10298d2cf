"""The wire protocol package, ``shared/``: inside the built extension it is the sub-package ``.shared`` (copied by
``build_addon.py``); when the add-on runs from a repository checkout it is the top-level ``shared`` package.

Importing this needs ``pyzmq`` (bundled as a wheel in the extension).
"""

from __future__ import annotations

try:
    from .shared import client, connection, mesh, protocol
except ImportError as _exc:  # pragma: no cover - depends on how the add-on is installed
    if "zmq" in str(_exc):
        raise
    from shared import client, connection, mesh, protocol  # type: ignore[no-redef]

__all__ = ["client", "connection", "mesh", "protocol"]
