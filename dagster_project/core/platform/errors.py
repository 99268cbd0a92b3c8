"""The platform's error type, shared by local.py and supervision.py."""

from __future__ import annotations


class PlatformError(RuntimeError):
    """A platform operation could not be done; the message says what and where."""
