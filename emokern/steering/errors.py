"""The one way steering reports a bad argument: the exception type the caller catches, with a
message prefixed ``emokern.steer:`` (the public function the user called)."""

from __future__ import annotations

from typing import NoReturn

__all__ = ["fail"]


def fail(exc: type[Exception], message: str) -> NoReturn:
    """Raise ``exc("emokern.steer: " + message)``."""
    raise exc(f"emokern.steer: {message}")
