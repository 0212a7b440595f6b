"""The one exception type users see: a single actionable line, no traceback."""

from __future__ import annotations

__all__ = ["EoprepError", "SpecError"]


class EoprepError(Exception):
    """A failure caused by input or environment, reported as one line by the CLI."""


class SpecError(EoprepError):
    """A pipeline spec that does not validate; the message names the file and the key path."""
