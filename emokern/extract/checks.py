"""Argument checks shared by the extraction methods: all run before any generation or forward,
so a bad argument fails in milliseconds with a message that names it."""

from __future__ import annotations

from collections.abc import Sequence

from emokern.models import decoder_layers

__all__ = ["check_layers", "check_names", "check_positive_int", "num_decoder_layers"]


def num_decoder_layers(model) -> int:
    """The number of decoder layers of ``model``."""
    return len(decoder_layers(model))


def check_layers(layers, num_layers: int) -> list[int]:
    """``layers`` as a sorted list of distinct decoder-layer indices in ``[0, num_layers)``;
    None means every layer, an int one layer."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(f"layers must be None or a sequence of ints, got "
                        f"{type(layers).__name__}") from None
    if not layers:
        raise ValueError("layers must not be empty (None means every layer)")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layers must be in [0, {num_layers}) for this model "
                             f"({num_layers} decoder layers), got {layer}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a layer, got {layers}")
    return sorted(layers)


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (TypeError / ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_names(names, known: Sequence[str], argument: str, what: str) -> list[str]:
    """``names`` as a list of distinct names, each in ``known``.

    Parameters
    ----------
    names : sequence of str
        Not a single str (a common slip: ``emotions="joy"``).
    known : sequence of str
    argument : str
        The argument's name, for messages (e.g. ``"emotions"``).
    what : str
        What a name is, for messages (e.g. ``"emotion"``, ``"category"``).
    """
    if isinstance(names, str):
        raise TypeError(f"{argument} must be a sequence of names, not a single str; wrap it in "
                        f"a list, e.g. [{names!r}]")
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{argument} must be a sequence of names, got "
                        f"{type(names).__name__}") from None
    if not names:
        raise ValueError(f"{argument} must not be empty")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument} must hold str names, got {name!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{argument} has unknown {what} {unknown}; known: {', '.join(known)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{argument} repeats {dupes}")
    return names
