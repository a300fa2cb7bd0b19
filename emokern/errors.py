"""The one way emokern reports a bad argument: the exception type the caller catches, with a
message prefixed by the public entry point the user called (``emokern.steer:``,
``emokern.steer_packed_:``, ``EmotionBank:``, ``emokern.vllm:``), raised before anything is
modified. Tested in ``tests/test_errors.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

__all__ = ["fail", "failing"]


def fail(exc: type[Exception], message: str, who: str) -> NoReturn:
    """Raise ``exc(f"{who}: {message}")``.

    Parameters
    ----------
    exc : type of Exception
        What the caller catches: ``TypeError`` for a wrong type, ``ValueError`` for a wrong
        value or shape, ``RuntimeError`` for a state that forbids the call.
    message : str
        Names the argument and what was expected.
    who : str
        The public entry point the user called, e.g. ``"emokern.steer"``.
    """
    raise exc(f"{who}: {message}")


def failing(who: str) -> Callable[..., NoReturn]:
    """:func:`fail` with ``who`` defaulting to one entry point:
    ``failing("emokern.steer")(ValueError, "...")``; a third argument still overrides it."""

    def bound(exc: type[Exception], message: str, caller: str = who) -> NoReturn:
        fail(exc, message, caller)

    return bound
