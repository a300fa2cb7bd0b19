"""The one way steering reports a bad argument: the exception type the caller catches, with a
message prefixed ``emokern.steer:`` (the public function the user called)."""

from __future__ import annotations

from typing import NoReturn

__all__ = ["fail"]


def fail(exc: type[Exception], message: str, who: str = "emokern.steer") -> NoReturn:
    """Raise ``exc(who + ": " + message)`` (``who``: the public entry point the user called,
    ``emokern.steer`` unless a serving engine's settings are being checked)."""
    raise exc(f"{who}: {message}")
