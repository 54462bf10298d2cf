"""Stepstone backend: generation and stylization stages (torch, open_clip, diffusers), never imports bpy."""

import os as _os

# OpenMP threads that wait at a barrier sleep instead of spinning (read once, when torch loads libgomp, so it is set
# here, before any torch import of the backend). With the default (spinning), torch's 2 threads on 2 cores that
# other processes also use made the README main job 2-4x slower in wall time and CPU time (issue 15: 25-43 s and
# 18-29 s CPU vs 11-12 s and 8 s); an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
