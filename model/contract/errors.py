"""The one error type for unusable user input.

Every check of a request's inputs (audio, image, boxes, options) raises `InputError` naming the
field as the API and the CLI call it, so the server can answer HTTP 422 in the fal format
(`{"detail": [{"loc": ["body", field], "msg": reason, "type": ...}]}`) and the CLI can print it.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input that cannot be used: `field` names it, `reason` says why in plain words."""

    def __init__(self, field: str, reason: str, kind: str = "value_error"):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.kind = kind


class GenerationCancelled(RuntimeError):
    """The caller's cancel check asked to stop; raised between denoising steps."""
