"""Workflows: orchestration of the 3D core, losses and models into generators of typed events.

Each workflow module defines:

- ``NAME``: the workflow id used on the wire and on the CLI (``run <NAME>``);
- ``add_arguments(parser)``: its CLI options (``--profile/--device/--seed/--out`` are added by the CLI);
- ``params_from_args(args) -> (params: dict, inputs: list[MeshInput])``;
- ``validate(params: dict, inputs: list[MeshInput], profile=None) -> dict``: returns normalised params or raises
  InputError; with a profile it also refuses options the profile cannot run (ModelUnavailable, with the profile's
  reason). The server calls it before a job is accepted, so bad input is rejected at once;
- ``run(params, inputs, ctx: JobContext) -> Iterator[Event]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from backend.errors import InputError

# workflow name -> module path; modules are imported lazily so `serve` starts fast.
WORKFLOWS: dict[str, str] = {
    "diagnostic": "backend.pipelines.diagnostic",
    "text-to-shape": "backend.pipelines.text_to_shape",
    "stylize": "backend.pipelines.stylize",
    "gallery": "backend.pipelines.theme_gallery",
    "image-to-shape": "backend.pipelines.image_to_shape",
}


def get_workflow(name: str) -> ModuleType:
    """Import and return the module of workflow ``name``; unknown names are an :class:`InputError`."""
    if name not in WORKFLOWS:
        raise InputError(f"unknown workflow {name!r}; known workflows: {', '.join(sorted(WORKFLOWS))}")
    return importlib.import_module(WORKFLOWS[name])

