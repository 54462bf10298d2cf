"""``python -m backend bench blender-import``: runs ``tests/bench_blender_import.py`` in its own process.

The benchmark needs Blender's ``bpy`` module, which ``backend/`` never imports (DESIGN.md: the wall between the
rooms), so this only starts the script with the same interpreter and passes the options through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "bench_blender_import.py"


def main(argv: list[str]) -> int:
    if not SCRIPT.is_file():
        print(f"{SCRIPT} is missing (it ships with the repository, not with an installed backend)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(SCRIPT), *argv])
