"""Errors a person can act on.

Every error that reaches an artist (CLI, Blender report, ``failed`` message) is a :class:`StepstoneError` with a
stable machine ``code`` and a one-paragraph human ``message``. Tracebacks are for logs only.
"""

from __future__ import annotations


class StepstoneError(Exception):
    """Base class: ``code`` is stable (used on the wire), ``message`` is for people."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class InputError(StepstoneError):
    """The request or its meshes/images are unusable (empty mesh, NaN vertices, prompt too long...)."""

    code = "bad_input"


class ModelUnavailable(StepstoneError):
    """A weight file or model is missing, or the profile cannot run this workflow."""

    code = "model_unavailable"


class Cancelled(StepstoneError):
    """The job's cancel token fired; raised at the next check point."""

    code = "cancelled"

    def __init__(self, message: str = "cancelled by request"):
        super().__init__(message)
