"""Emotion mixes: the ``"sadness=1.5,fear=0.5"`` text form and the ``[B, K]`` weights the op
reads.

A *mix* gives each emotion a weight in the bank's units (1.0 adds one vector as extracted;
negative weights suppress), or ``"rec"``: the emotion's recommended weight
(:meth:`emokern.EmotionBank.recommended_weight`, measured per emotion by a sweep); a batch
carries one mix per sequence, as a list of dicts or as a float tensor ``[B, K]`` whose columns
follow the steered emotions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from emokern.errors import failing

fail = failing("emokern.steer")

__all__ = ["FLOAT32_MAX", "REC", "mix_to_weights", "parse_mix"]

#: The weight that stands for an emotion's recommended weight.
REC = "rec"

#: The largest magnitude a weight may have: the op reads float32 weights, and a finite Python
#: float above this becomes inf there (the finite float32 range is ``[-FLOAT32_MAX, FLOAT32_MAX]``).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _float32_range_error(where: str, weight) -> str:
    return (f"{where} is {weight}, outside float32's finite range "
            f"[-{FLOAT32_MAX:.4g}, {FLOAT32_MAX:.4g}] (the op reads float32 weights)")


def parse_mix(text: str) -> dict[str, float | str]:
    """Parse ``"sadness=1.5,fear=0.5"`` into ``{"sadness": 1.5, "fear": 0.5}``.

    An empty string, ``"none"`` or ``"{}"`` is the empty (unsteered) mix. Whitespace around
    names and numbers is ignored. A weight ``rec`` (``"anger=rec"``) is kept as the string
    ``"rec"``: :func:`mix_to_weights` resolves it to the emotion's recommended weight.

    Raises
    ------
    ValueError
        On a term without ``=``, an empty name, a weight that is not a finite number or does
        not fit float32 (``|w| > 3.4e38``, :data:`FLOAT32_MAX`), or a name given twice.

    Examples
    --------
    >>> parse_mix("joy=2")
    {'joy': 2.0}
    >>> parse_mix("sadness=1.5, fear=-0.5")
    {'sadness': 1.5, 'fear': -0.5}
    >>> parse_mix("anger=rec")
    {'anger': 'rec'}
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_mix: expected a string like 'joy=2,fear=0.5', got "
                        f"{type(text).__name__}")
    stripped = text.strip()
    if stripped.lower() in ("", "none", "{}"):
        return {}
    mix: dict[str, float | str] = {}
    for term in stripped.split(","):
        name, sep, number = term.partition("=")
        name, number = name.strip(), number.strip()
        if not sep or not name or not number:
            raise ValueError(f"parse_mix: bad term {term.strip()!r} in {text!r}; expected "
                             f"name=weight terms separated by commas, e.g. 'sadness=1.5,fear=0.5'")
        if number.lower() == REC:
            if name in mix:
                raise ValueError(f"parse_mix: {name!r} is given twice in {text!r}")
            mix[name] = REC
            continue
        try:
            weight = float(number)
        except ValueError:
            raise ValueError(f"parse_mix: weight of {name!r} must be a number, got {number!r} "
                             f"in {text!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"parse_mix: weight of {name!r} must be finite, got {number!r}")
        if abs(weight) > FLOAT32_MAX:
            raise ValueError("parse_mix: " + _float32_range_error(f"weight of {name!r}", number))
        if name in mix:
            raise ValueError(f"parse_mix: {name!r} is given twice in {text!r}")
        mix[name] = weight
    return mix


def mix_to_weights(mix, names: Sequence[str], argument: str = "mix", *,
                   recommended: Callable[[str], float] | None = None,
                   who: str = "emokern.steer") -> torch.Tensor:
    """Turn a mix (one dict per sequence, or a ``[B, K]`` tensor) into float32 weights ``[B, K]``.

    Parameters
    ----------
    mix : sequence of Mapping[str, float | "rec"] or Tensor [B, K]
        One dict per sequence (emotion name → weight, or ``"rec"``; names absent from a dict
        weigh 0), or a tensor whose columns follow ``names``.
    names : sequence of str
        The ``K`` emotions the columns stand for.
    argument : str
        The argument's name in error messages.
    recommended : callable, optional
        ``recommended(name)`` → the weight that ``"rec"`` stands for (the steerer passes
        :meth:`EmotionBank.recommended_weight`); without it ``"rec"`` is an error.
    who : str
        The entry point named in errors (``"emokern.steer"``, ``"emokern.vllm"``, ...).

    Returns
    -------
    Tensor [B, K] float32 on the CPU
        ``weights[b, k]`` = the weight of ``names[k]`` in row ``b`` (a copy: later changes to
        ``mix`` do not reach it).

    Raises
    ------
    TypeError, ValueError
        Naming the bad row and emotion: unknown emotion, non-finite or non-numeric weight, a
        weight outside float32's finite range (:data:`FLOAT32_MAX`; e.g. ``1e40``, finite in
        Python but inf in the float32 weights), wrong tensor shape, empty batch.
    """
    fail = failing(who)
    n_names = len(names)
    if isinstance(mix, torch.Tensor):
        if not mix.is_floating_point():
            fail(TypeError, f"{argument} tensor must be floating point, got {mix.dtype}")
        if mix.dim() != 2 or mix.shape[1] != n_names or mix.shape[0] < 1:
            fail(ValueError, f"{argument} tensor must be [B, K] with K = {n_names} "
                             f"(one column per emotion {list(names)}), got {list(mix.shape)}")
        source = mix.detach().to("cpu")
        bad = ~torch.isfinite(source)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            fail(ValueError, f"{argument}[{row}, {col}] ({names[col]!r}) must be finite, got "
                             f"{source[row, col].item()}")
        # A float64 weight can be finite yet overflow the float32 the op reads.
        big = source.abs() > FLOAT32_MAX
        if bool(big.any()):
            row, col = (int(i) for i in big.nonzero()[0])
            fail(ValueError, _float32_range_error(f"{argument}[{row}, {col}] ({names[col]!r})",
                                                  source[row, col].item()))
        return source.to(torch.float32).clone()
    if isinstance(mix, (str, bytes, Mapping)) or not isinstance(mix, Sequence):
        fail(TypeError, f"{argument} must be a list with one dict per sequence (emotion -> "
                        f"weight) or a [B, K] tensor, got {type(mix).__name__}")
    if len(mix) == 0:
        fail(ValueError, f"{argument} must have at least one row (one dict per sequence)")
    index = {name: k for k, name in enumerate(names)}
    weights = torch.zeros(len(mix), n_names, dtype=torch.float32)
    for row, entry in enumerate(mix):
        if not isinstance(entry, Mapping):
            fail(TypeError, f"{argument}[{row}] must be a dict of emotion -> weight, got "
                            f"{type(entry).__name__}")
        for name, weight in entry.items():
            if name not in index:
                fail(ValueError, f"{argument}[{row}] names unknown emotion {name!r}; the bank "
                                 f"has {list(names)}")
            if isinstance(weight, str) and weight.strip().lower() == REC:
                if recommended is None:
                    fail(ValueError, f"{argument}[{row}][{name!r}] is 'rec' but no bank gives "
                                     f"recommended weights here")
                weight = recommended(name)
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                fail(TypeError, f"{argument}[{row}][{name!r}] must be a number, got "
                                f"{type(weight).__name__}")
            if not math.isfinite(float(weight)):
                fail(ValueError, f"{argument}[{row}][{name!r}] must be finite, got {weight}")
            if abs(float(weight)) > FLOAT32_MAX:
                fail(ValueError, _float32_range_error(f"{argument}[{row}][{name!r}]", weight))
            weights[row, index[name]] = float(weight)
    return weights
