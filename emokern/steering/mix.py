"""Emotion mixes: the one grammar every door speaks, parsed here and nowhere else.

A *mix* says, per emotion, how to edit the tokens a steerer covers. Text form (terms separated
by commas, whitespace ignored; ``""``, ``"none"`` and ``"{}"`` are the empty, unsteered mix):

==================  =========================================================================
``joy=2``           **push**: add 2 × the emotion's vector (the bank's units; negative
                    suppresses)
``anger=rec``       the emotion's **recipe** (:meth:`emokern.EmotionBank.recommended`): its
                    push weight, or its level
``sadness@1.5``     **level**: every covered token's projection set to the standard score
                    ``z = 1.5``
``fear=erase``      **erase**: a level at the neutral mean (``z = 0``)
``anger<=0.5``      **cap**: the projection brought down to ``z = 0.5`` where above it
``joy>=1``          **floor**: the projection brought up to ``z = 1`` where below it
==================  =========================================================================

Levels, caps and floors are in *calibrated units*: standard scores against the bank's neutral
baseline, per layer and emotion (:meth:`emokern.EmotionBank.standardize`); at steered layer
``l`` the raw projection target is ``μ_lk + z σ_lk`` (:func:`raw_bounds`), so ``sadness@1.5``
means the same on every layer and model. They need a calibrated bank. Semantics of the edit
(pushes first, then norm preservation, then the levels and bounds, solved exactly with the
Gram matrix of the directions): ``docs/design.md`` §2.

**Combinations**, per emotion: at most one push (``=w`` or ``=rec``), one cap and one floor,
and a push may go with a cap and/or a floor (``joy=2,joy<=3``: push, but never beyond
``z = 3``), with floor ≤ cap. A level (``@z``, ``erase``, or a ``rec`` whose recipe is a
level) stands alone: it sets the projection exactly, so a push of the same emotion would be
undone by it and a cap or floor beside it means nothing; two levels, two pushes, two caps or
two floors of one emotion are errors, as is an unknown emotion, a non-finite number, a number
beyond float32's range (:data:`FLOAT32_MAX`) or a cap below a floor. A server may bound
weights and levels further (:func:`check_limits`, on the normal form; the library sets no such
limit).

**Scope**, per emotion: by default an emotion's edits apply at every layer the steerer's
*band* covers (its ``layers``; ``"auto"``: the bank's recommended layers) and at every token it
steers. A scope narrows that: ``anger[12]=1`` pushes at decoder layer 12 only,
``fear[generated]@1.5`` sets the level on generated tokens only (the prompt is read as the
model wrote it), ``sadness[10-12;generated]=1`` both. Inside the brackets, ``;`` separates a
layer list (``12``, ``10,12``, ``10-12``) from a position (``all``, ``prompt``,
``generated``). A recipe (``rec``) brings its own band and positions when they are not the
bank's recommended layers and all tokens (:meth:`emokern.Recipe.mix_term`). A scope is given
once per emotion (on any of its terms, or identically on each). Its layers must be steered (a
steerer with ``layers="auto"`` steers the recipes' bands beside the recommended layers), and
with ``spread="divide"`` a scoped push spreads over its own layers: ``anger[12]=1`` adds the
full vector at layer 12 whatever else is steered. :func:`edit_scope` turns a batch of scopes
into the factor the op's weights and bounds get per position kind and layer.

**Object form** (Python or JSON; the *normal form* is this with ``rec`` resolved): an emotion
maps to a number (a push), ``"rec"``, ``"erase"``, or a dict of ``weight`` (a number or
``"rec"``), ``level``, ``min`` (floor) and ``max`` (cap), and the scope's ``layers`` (a list
of decoder layers) and ``positions``::

    {"joy": 2, "sadness": {"level": 1.5}, "anger": {"max": 0.5}, "fear": "erase",
     "surprise": {"weight": 1, "min": -1}, "disgust": {"weight": 1, "layers": [12],
     "positions": "generated"}}

A string that starts with ``{`` is read as that form in JSON. A batch carries one mix per
sequence: a list of dicts (or mix strings), or a float tensor ``[B, K]`` of push weights whose
columns follow the steered emotions. :func:`mix_to_edits` turns it into what the op reads:
push weights ``[B, K]`` and, when any row has a level or bound, ``z`` bounds ``[B, 2, K]``
(lower, upper; ``±inf`` open) that :func:`raw_bounds` turns into raw units per layer.
:func:`format_mix` writes a mix back as text. Tested in ``tests/steering/test_mix.py``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from emokern.errors import failing
from emokern.steering.config import POSITIONS

fail = failing("emokern.steer")

__all__ = ["ERASE", "FIELDS", "FLOAT32_MAX", "REC", "SCOPE", "asks_rec", "bank_edits",
           "check_limits", "edit_scope", "format_mix", "has_bounds", "has_scope", "is_push",
           "largest_edits", "mix_to_edits", "mix_to_weights", "normalize_mix", "parse_mix",
           "raw_bounds", "scope_of", "scoped_edits"]

#: The value that stands for an emotion's recipe (:meth:`emokern.EmotionBank.recommended`).
REC = "rec"
#: The value that stands for a level at the neutral mean (``z = 0``).
ERASE = "erase"
#: The keys of an emotion's dict in the object form: push weight, level, floor, cap.
FIELDS = ("weight", "level", "min", "max")
#: The keys that scope an emotion's edits: the decoder layers and the tokens they apply at.
SCOPE = ("layers", "positions")

#: The largest magnitude a number may have: the op reads float32 weights and bounds, and a
#: finite Python float above this becomes inf there (the finite float32 range is
#: ``[-FLOAT32_MAX, FLOAT32_MAX]``).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: Text operators, longest first, and the field each sets.
_OPERATORS = (("<=", "max"), (">=", "min"), ("@", "level"), ("=", "weight"))
_KIND = {"weight": "push", "level": "level", "min": "floor", "max": "cap"}
_INF = float("inf")

Term = float | str | dict


def _float32_range_error(where: str, value) -> str:
    return (f"{where} is {value}, outside float32's finite range "
            f"[-{FLOAT32_MAX:.4g}, {FLOAT32_MAX:.4g}] (the op reads float32 weights)")


def _number(value: float) -> str:
    """The shortest text that reads back as ``value`` (``2`` for 2.0, ``0.1``, ``1e+40``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


# ----------------------------------------------------------------------------- one term


def _check_number(value, where: str, fail_: Callable) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail_(TypeError, f"{where} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        fail_(ValueError, f"{where} must be finite, got {value}")
    if abs(float(value)) > FLOAT32_MAX:
        fail_(ValueError, _float32_range_error(where, value))
    return float(value)


def _combine(fields: dict, where: str, fail_: Callable) -> Term:
    """One emotion's fields (``weight``, ``level``, ``min``, ``max`` and the :data:`SCOPE`),
    checked for conflicts, in compact form: the weight alone when it is all there is, else a
    dict in :data:`FIELDS` then :data:`SCOPE` order (``{}``: no edit). A scope of all tokens
    is dropped (it is the default) once no ``rec`` is left that it would override."""
    if fields.get("positions") == "all" and fields.get("weight") != REC:
        fields = {k: v for k, v in fields.items() if k != "positions"}
    if not set(fields) - set(SCOPE) and fields:
        fail_(ValueError, f"{where} has a scope ({', '.join(sorted(fields))}) but no edit: "
                          f"give a push, level, cap or floor with it")
    if "level" in fields and set(fields) - set(SCOPE) != {"level"}:
        others = " and ".join(_KIND[f] for f in FIELDS if f in fields and f != "level")
        fail_(ValueError, f"{where} has a level and a {others}: a level sets the projection "
                          f"exactly, so nothing else may edit the same emotion (a push would be "
                          f"undone, a cap or floor means nothing)")
    if "min" in fields and "max" in fields and fields["min"] > fields["max"]:
        fail_(ValueError, f"{where} has a floor above its cap (min {fields['min']} > max "
                          f"{fields['max']})")
    if set(fields) == {"weight"}:
        return fields["weight"]
    return {f: fields[f] for f in FIELDS + SCOPE if f in fields}


def _check_layers(value, where: str, fail_: Callable) -> list[int]:
    """A scope's layers: one index or a non-empty list of distinct indices ``>= 0``, sorted."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not value:
        fail_(TypeError, f"{where} must be a layer index or a non-empty list of them, got "
                         f"{value!r}")
    for layer in value:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
            fail_(ValueError, f"{where} must hold decoder layer indices >= 0, got {layer!r}")
    if len(set(value)) != len(value):
        fail_(ValueError, f"{where} lists a layer twice: {list(value)}")
    return sorted(int(layer) for layer in value)


def _check_scope(key: str, value, where: str, fail_: Callable):
    if key == "layers":
        return _check_layers(value, where, fail_)
    if value not in POSITIONS:
        fail_(ValueError, f"{where} must be one of {list(POSITIONS)}, got {value!r}")
    return value


def _term(value, where: str, fail_: Callable) -> Term:
    """One emotion's value in the object form, checked, in compact form (a float or ``"rec"``
    for a push alone, else a dict of :data:`FIELDS`; ``"erase"`` becomes ``{"level": 0.0}``)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word == REC:
            return REC
        if word == ERASE:
            return {"level": 0.0}
        fail_(TypeError, f"{where} must be a number, 'rec', 'erase' or a dict of "
                         f"{'/'.join(FIELDS)}, got str {value!r}")
    if isinstance(value, Mapping):
        unknown = [key for key in value if key not in FIELDS + SCOPE]
        if unknown:
            fail_(ValueError, f"{where} has unknown field(s) {unknown}; the fields are "
                              f"{list(FIELDS + SCOPE)} (push weight, level, floor, cap; the "
                              f"scope's layers and positions)")
        fields = {}
        for key, item in value.items():
            if key == "weight" and isinstance(item, str) and item.strip().lower() == REC:
                fields[key] = REC
            elif key in SCOPE:
                fields[key] = _check_scope(key, item, f"{where}[{key!r}]", fail_)
            else:
                fields[key] = _check_number(item, f"{where}[{key!r}]", fail_)
        return _combine(fields, where, fail_)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail_(TypeError, f"{where} must be a number, 'rec', 'erase' or a dict of "
                         f"{'/'.join(FIELDS)}, got {type(value).__name__}")
    return _check_number(value, where, fail_)


def _fields(term: Term) -> dict:
    """A compact term as a dict of fields."""
    return dict(term) if isinstance(term, dict) else {"weight": term}


def _resolve(term: Term, name: str, recommended, where: str, fail_: Callable) -> Term:
    """``term`` with its ``rec`` weight replaced by the emotion's recipe: ``recommended(name)``
    is a :class:`~emokern.Recipe` (its :meth:`~emokern.Recipe.mix_term`), a weight or a term."""
    fields = _fields(term)
    if fields.get("weight") != REC:
        return term
    if recommended is None:
        fail_(ValueError, f"{where} is 'rec' but no bank gives recommended weights here")
    found = recommended(name)
    found = found.mix_term() if hasattr(found, "mix_term") else found
    resolved = _fields(_term(found, f"{where} ('rec': the recipe of {name!r})", fail_))
    if REC in resolved.values():
        fail_(ValueError, f"{where}: the recipe of {name!r} is 'rec' again")
    del fields["weight"]
    if "level" in resolved and set(fields) - set(SCOPE):
        fail_(ValueError, f"{where} is 'rec', and the recipe of {name!r} is a level "
                          f"(z = {resolved['level']:g}), which cannot go with a "
                          f"{' and a '.join(_KIND[f] for f in FIELDS if f in fields)}")
    # The recipe's scope where the term gives none: a scope written beside 'rec' wins.
    fields = {**resolved, **fields}
    return _combine(fields, where, fail_)


def asks_rec(term: Term) -> bool:
    """Whether a term, ``rec`` unresolved (:func:`normalize_mix` without ``recommended``), asks
    for the emotion's recipe: ``"rec"`` or a dict whose ``weight`` is ``"rec"``."""
    return _fields(term).get("weight") == REC


def is_push(term: Term) -> bool:
    """Whether a compact term is a push alone (no level, floor or cap; a scope may go with
    it)."""
    return not isinstance(term, dict) or set(term) - set(SCOPE) <= {"weight"}


def has_scope(term: Term) -> bool:
    """Whether a compact term carries a scope (its own layers or positions)."""
    return isinstance(term, dict) and any(key in term for key in SCOPE)


def scope_of(term: Term) -> tuple[tuple[int, ...] | None, str]:
    """``(layers or None, positions)`` of a compact term: None = the steerer's band."""
    fields = _fields(term)
    layers = fields.get("layers")
    return (None if layers is None else tuple(layers)), fields.get("positions", "all")


def has_bounds(mix: Mapping) -> bool:
    """Whether a mix in compact form holds a level, a floor or a cap."""
    return any(not is_push(term) for term in mix.values())


def largest_edits(mix: Mapping) -> tuple[float, float]:
    """``(largest |push weight|, largest |z| of a level, cap or floor)`` of a mix in compact
    form (``rec`` resolved; 0.0 where it has none): what :func:`check_limits` holds against
    ``max_weight`` and ``max_level``."""
    weight = level = 0.0
    for term in mix.values():
        for field, value in _fields(term).items():
            if field in SCOPE:
                continue
            if field == "weight":
                weight = max(weight, abs(float(value)))
            else:
                level = max(level, abs(float(value)))
    return weight, level


def check_limits(mix: Mapping, *, max_weight: float | None = None,
                 max_level: float | None = None, argument: str = "mix",
                 who: str = "emokern.steer", source: str = "the limit",
                 how: Mapping[str, str] | None = None, recipes: Sequence[str] = ()) -> None:
    """Refuse a mix in compact form (:func:`normalize_mix`, ``rec`` resolved) with a push
    weight beyond ``max_weight`` or a level, cap or floor beyond ``max_level`` (standard
    scores), in magnitude; None: no limit. The library itself sets none (only float32's range,
    checked when the mix is parsed); a server sets its operator's
    (:func:`emokern.vllm.config.check_mix`).

    Raises
    ------
    ValueError
        For the first term over its limit, naming ``argument``, the emotion, the kind of edit,
        its value and the limit: ``"mix['joy']: push weight 100 is beyond the limit
        max_weight = 48"``, then ``source`` in place of "the limit", and ``how[key]`` (how
        ``"max_weight"`` / ``"max_level"`` is set) in parentheses when given; for an emotion
        in ``recipes`` (those the mix asked ``rec`` of) the message says the value is its
        recipe. An unresolved ``rec`` is an error too (its recipe could be beyond the limit).
    """
    fail_ = failing(who)
    for name, term in mix.items():
        for field, value in _fields(term).items():
            if field in SCOPE:
                continue
            if value == REC:
                fail_(ValueError, f"{argument}[{name!r}] is 'rec', unresolved: the limits "
                                  f"apply to the recipe's weight or level")
            limit = max_weight if field == "weight" else max_level
            if limit is None or abs(value) <= limit:
                continue
            kind = "push weight" if field == "weight" else f"{_KIND[field]} z ="
            key = "max_weight" if field == "weight" else "max_level"
            hint = f" ({how[key]})" if how and key in how else ""
            recipe = (f" ('rec': the recipe of {name!r})"
                      if name in recipes and field in ("weight", "level") else "")
            fail_(ValueError, f"{argument}[{name!r}]: {kind} {_number(value)}{recipe} is beyond "
                              f"{source} {key} = {_number(limit)}{hint}")


# ----------------------------------------------------------------------------- text


def _split_terms(text: str) -> list[str]:
    """The comma-separated terms of a mix string; commas inside a scope's ``[...]`` stay."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _parse_scope(inside: str, label: str) -> dict:
    """The scope written inside ``[...]``: ``;``-separated parts, each a position word or a
    layer list (``12``, ``10,12``, ``10-12``)."""
    scope: dict = {}
    for part in (p.strip() for p in inside.split(";")):
        key = "positions" if part.lower() in POSITIONS else "layers"
        if key in scope:
            raise ValueError(f"parse_mix: {label} gives its {key} twice")
        if key == "positions":
            scope[key] = part.lower()
            continue
        layers: list[int] = []
        for item in (i.strip() for i in part.split(",")):
            low, _, high = item.partition("-")
            if not low.strip().isdigit() or (high and not high.strip().isdigit()):
                raise ValueError(f"parse_mix: {label}: {part!r} is neither a position "
                                 f"({', '.join(POSITIONS)}) nor layers like 12, 10,12 or 10-12")
            stop = int(high) if high else int(low)
            if stop < int(low):
                raise ValueError(f"parse_mix: {label}: layer range {item!r} runs backwards")
            layers.extend(range(int(low), stop + 1))
        scope[key] = _check_layers(layers, label, _raise_parse)
    return scope


def _parse_term(term: str, text: str) -> tuple[str, str, Term, dict]:
    """``(name, field, value, scope)`` of one text term such as ``joy>=1`` or
    ``anger[12;generated]=1``."""
    stripped = term.strip()
    cut = min((i for i in (stripped.find(c) for c in "<>@=") if i >= 0), default=-1)
    operator = next((op for op, _ in _OPERATORS if cut >= 0 and stripped.startswith(op, cut)),
                    None)
    name = stripped[:cut].strip() if cut >= 0 else ""
    number = stripped[cut + len(operator):].strip() if operator else ""
    if operator is None or not name or not number:
        raise ValueError(f"parse_mix: bad term {stripped!r} in {text!r}; expected terms like "
                         f"joy=2, anger=rec, sadness@1.5, fear=erase, anger<=0.5, joy>=1, "
                         f"anger[12;generated]=1 separated by commas")
    scope = {}
    if "[" in name or "]" in name:
        base, bracket, rest = name.partition("[")
        if not bracket or not rest.endswith("]") or "[" in rest or not base.strip():
            raise ValueError(f"parse_mix: bad scope in {stripped!r}; a scope follows the "
                             f"emotion's name, like anger[12]=1 or fear[10-12;generated]@1")
        name = base.strip()
        scope = _parse_scope(rest[:-1], f"the scope of {name!r} in {text!r}")
    field = dict(_OPERATORS)[operator]
    word = number.lower()
    if word in (REC, ERASE):
        if operator != "=":
            raise ValueError(f"parse_mix: bad term {stripped!r} in {text!r}: {word!r} goes "
                             f"after '=' ({name}={word})")
        return (name, "weight", REC, scope) if word == REC else (name, "level", 0.0, scope)
    label = f"{_KIND[field] if field != 'weight' else 'weight'} of {name!r}"
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"parse_mix: {label} must be a number, got {number!r} in "
                         f"{text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"parse_mix: {label} must be finite, got {number!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError("parse_mix: " + _float32_range_error(label, number))
    return name, field, value, scope


def _raise_parse(exc: type[Exception], message: str, who: str = "parse_mix"):
    raise exc(f"{who}: {message}")


def parse_mix(text: str) -> dict[str, Term]:
    """Parse a mix string (text grammar or JSON object form) into the compact object form.

    A push alone is a float (or ``"rec"``, resolved later by :func:`normalize_mix` /
    :func:`mix_to_edits` against a bank); anything else a dict of :data:`FIELDS`
    (``erase`` becomes ``{"level": 0.0}``). See the module docstring for the grammar and the
    combinations allowed.

    Raises
    ------
    ValueError
        On a malformed term, an empty name, a number that is not finite or does not fit
        float32 (``|x| > 3.4e38``, :data:`FLOAT32_MAX`), an edit given twice or conflicting
        terms of one emotion (naming the emotion and the terms), invalid JSON.

    Examples
    --------
    >>> parse_mix("joy=2")
    {'joy': 2.0}
    >>> parse_mix("sadness=1.5, fear=-0.5")
    {'sadness': 1.5, 'fear': -0.5}
    >>> parse_mix("anger=rec")
    {'anger': 'rec'}
    >>> parse_mix("sadness@1.5,fear=erase,joy=2,joy<=3")
    {'sadness': {'level': 1.5}, 'fear': {'level': 0.0}, 'joy': {'weight': 2.0, 'max': 3.0}}
    >>> parse_mix('{"anger": {"max": 0.5}}')
    {'anger': {'max': 0.5}}
    >>> parse_mix("anger[12;generated]=1")
    {'anger': {'weight': 1.0, 'layers': [12], 'positions': 'generated'}}
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_mix: expected a string like 'joy=2,fear@0.5', got "
                        f"{type(text).__name__}")
    stripped = text.strip()
    if stripped.lower() in ("", "none", "{}"):
        return {}
    if stripped.startswith("{"):
        try:
            loaded = json.loads(stripped)
        except ValueError as exc:
            raise ValueError(f"parse_mix: {text!r} starts with '{{' but is not valid JSON "
                             f"({exc})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"parse_mix: JSON mix must be an object, got {text!r}")
        out = {}
        for name, value in loaded.items():
            term = _term(value, f"{name!r}", _raise_parse)
            if term != {}:
                out[name] = term
        return out
    fields: dict[str, dict] = {}
    given: dict[tuple[str, str], str] = {}
    scopes: dict[str, dict] = {}
    for term in _split_terms(stripped):
        name, field, value, scope = _parse_term(term, text)
        if (name, field) in given:
            raise ValueError(f"parse_mix: {name!r} is given twice as a {_KIND[field]} "
                             f"({given[name, field]!r} and {term.strip()!r}) in {text!r}")
        given[name, field] = term.strip()
        fields.setdefault(name, {})[field] = value
        if scope:
            if scopes.setdefault(name, scope) != scope:
                raise ValueError(f"parse_mix: {name!r} has two different scopes in {text!r}; "
                                 f"give its scope once")
            fields[name].update(scope)
    return {name: _combine(f, f"{name!r} (in {text!r})", _raise_parse)
            for name, f in fields.items()}


def format_mix(mix: Mapping | str) -> str:
    """A mix as text, the inverse of :func:`parse_mix`: ``parse_mix(format_mix(m))`` is ``m``
    in compact form. Levels at 0 are written ``erase``; numbers as their shortest exact text.

    Examples
    --------
    >>> format_mix({"joy": 2.0, "sadness": {"level": 1.5}, "fear": "erase",
    ...             "anger": {"weight": "rec", "max": 0.5}})
    'joy=2,sadness@1.5,fear=erase,anger=rec,anger<=0.5'
    >>> format_mix({"anger": {"weight": 1, "layers": [10, 11, 12, 14], "positions": "generated"}})
    'anger[10-12,14;generated]=1'
    """
    normal = normalize_mix(mix, argument="mix", who="format_mix")
    terms = []
    for name, term in normal.items():
        fields = _fields(term)
        scope = _format_scope(fields)
        for field, value in fields.items():
            if field in SCOPE:
                continue
            label, scope = name + scope, ""  # the scope is written once, on the first term
            if field == "weight":
                terms.append(f"{label}={value if value == REC else _number(value)}")
            elif field == "level":
                terms.append(f"{label}=erase" if value == 0 else f"{label}@{_number(value)}")
            else:
                terms.append(f"{label}{'>=' if field == 'min' else '<='}{_number(value)}")
    return ",".join(terms)


def _format_scope(fields: Mapping) -> str:
    """``[layers;positions]`` of a term's scope (runs of layers as ranges), or ``""``."""
    parts = []
    if "layers" in fields:
        runs: list[list[int]] = []
        for layer in fields["layers"]:
            if runs and layer == runs[-1][-1] + 1:
                runs[-1].append(layer)
            else:
                runs.append([layer])
        parts.append(",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs))
    if "positions" in fields:
        parts.append(fields["positions"])
    return f"[{';'.join(parts)}]" if parts else ""


# ----------------------------------------------------------------------------- one mix


def normalize_mix(mix, names: Sequence[str] | None = None, *, recommended=None,
                  argument: str = "mix", who: str = "emokern.steer") -> dict[str, Term]:
    """One mix (a dict in the object form, or a mix string) in compact, checked form, with
    ``rec`` resolved when ``recommended`` is given.

    Parameters
    ----------
    mix : Mapping or str
    names : sequence of str, optional
        The emotions allowed (an unknown one is an error); any name without.
    recommended : callable, optional
        ``recommended(name)`` → the :class:`~emokern.Recipe` (``bank.recommended``), a push
        weight (``bank.recommended_weight``) or a term that ``rec`` stands for; without it
        ``rec`` is kept as is.
    argument, who : str
        The argument and entry point errors name.

    Returns
    -------
    dict
        Emotion → a float (a push alone; ``"rec"`` when unresolved) or a dict of
        :data:`FIELDS`, in the order given; emotions with an empty dict are dropped.
    """
    fail_ = failing(who)
    if isinstance(mix, str):
        try:
            mix = parse_mix(mix)
        except ValueError as exc:
            fail_(ValueError, f"{argument}: {str(exc).removeprefix('parse_mix: ')}")
    if not isinstance(mix, Mapping):
        fail_(TypeError, f"{argument} must be a dict of emotion -> weight (or edit) or a mix "
                         f"string like 'joy=2,fear@1', got {type(mix).__name__}")
    allowed = None if names is None else set(names)
    out = {}
    for name, value in mix.items():
        if allowed is not None and name not in allowed:
            fail_(ValueError, f"{argument} names unknown emotion {name!r}; the bank has "
                              f"{list(names)}")
        if not isinstance(name, str):
            fail_(TypeError, f"{argument} has a key {name!r} that is not an emotion name")
        where = f"{argument}[{name!r}]"
        term = _term(value, where, fail_)
        if recommended is not None:
            term = _resolve(term, name, recommended, where, fail_)
        if term != {}:
            out[name] = term
    return out


# ----------------------------------------------------------------------------- batches


def _tensor_weights(mix: torch.Tensor, names: Sequence[str], argument: str,
                    fail_: Callable) -> torch.Tensor:
    n_names = len(names)
    if not mix.is_floating_point():
        fail_(TypeError, f"{argument} tensor must be floating point, got {mix.dtype}")
    if mix.dim() != 2 or mix.shape[1] != n_names or mix.shape[0] < 1:
        fail_(ValueError, f"{argument} tensor must be [B, K] with K = {n_names} "
                          f"(one column per emotion {list(names)}), got {list(mix.shape)}")
    source = mix.detach().to("cpu")
    bad = ~torch.isfinite(source)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        fail_(ValueError, f"{argument}[{row}, {col}] ({names[col]!r}) must be finite, got "
                          f"{source[row, col].item()}")
    # A float64 weight can be finite yet overflow the float32 the op reads.
    big = source.abs() > FLOAT32_MAX
    if bool(big.any()):
        row, col = (int(i) for i in big.nonzero()[0])
        fail_(ValueError, _float32_range_error(f"{argument}[{row}, {col}] ({names[col]!r})",
                                               source[row, col].item()))
    return source.to(torch.float32).clone()


def _edits(mix, names: Sequence[str], argument: str, recommended, who: str, pushes_only: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None, list[dict] | None]:
    """Weights, ``z`` bounds and the rows' normal forms (None for the tensor form)."""
    fail_ = failing(who)
    if isinstance(mix, torch.Tensor):
        return _tensor_weights(mix, names, argument, fail_), None, None
    if isinstance(mix, (str, bytes, Mapping)) or not isinstance(mix, Sequence):
        fail_(TypeError, f"{argument} must be a list with one dict per sequence (emotion -> "
                         f"weight) or a [B, K] tensor, got {type(mix).__name__}")
    if len(mix) == 0:
        fail_(ValueError, f"{argument} must have at least one row (one dict per sequence)")
    index = {name: k for k, name in enumerate(names)}
    weights = torch.zeros(len(mix), len(names), dtype=torch.float32)
    bounds = torch.tensor([-_INF, _INF]).repeat(len(mix), len(names), 1).transpose(1, 2)
    bounded = False
    normals = []
    for row, entry in enumerate(mix):
        if not isinstance(entry, (Mapping, str)):
            fail_(TypeError, f"{argument}[{row}] must be a dict of emotion -> weight, got "
                             f"{type(entry).__name__}")
        normal = normalize_mix(entry, names, recommended=recommended,
                               argument=f"{argument}[{row}]", who=who)
        normals.append(normal)
        for name, term in normal.items():
            k = index[name]
            fields = _fields(term)
            if fields.get("weight") == REC:  # left unresolved: no recommended given
                fail_(ValueError, f"{argument}[{row}][{name!r}] is 'rec' but no bank gives "
                                  f"recommended weights here")
            if pushes_only and (not is_push(term) or has_scope(term)):
                fail_(ValueError, f"{argument}[{row}][{name!r}] is {format_mix({name: term})!r}"
                                  f", a level, bound or scope; {argument} takes numbers only "
                                  f"here")
            weights[row, k] = fields.get("weight", 0.0)
            for side, field in ((0, "min"), (1, "max"), (0, "level"), (1, "level")):
                if field in fields:
                    bounds[row, side, k] = fields[field]
                    bounded = True
    return weights, (bounds.contiguous() if bounded else None), normals


def mix_to_edits(mix, names: Sequence[str], argument: str = "mix", *, recommended=None,
                 who: str = "emokern.steer") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a batch of mixes into what the op reads: push weights and ``z`` bounds.

    Parameters
    ----------
    mix : sequence of (Mapping or str), or Tensor [B, K]
        One mix per sequence in the object form (emotion → number, ``"rec"``, ``"erase"`` or a
        dict of :data:`FIELDS`) or as a mix string (:func:`parse_mix`); emotions absent from a
        row are not edited. Or a float tensor of push weights whose columns follow ``names``.
    names : sequence of str
        The ``K`` emotions the columns stand for.
    argument : str
        The argument's name in error messages.
    recommended : callable, optional
        What ``rec`` stands for: ``recommended(name)`` → a :class:`~emokern.Recipe` (the
        steerer passes :meth:`EmotionBank.recommended`: a push weight or a level), a weight or
        a term; without it ``"rec"`` is an error.
    who : str
        The entry point named in errors (``"emokern.steer"``, ``"emokern.vllm"``, ...).

    Returns
    -------
    weights : Tensor [B, K] float32 on the CPU
        ``weights[b, k]`` = the push weight of ``names[k]`` in row ``b`` (a copy).
    z_bounds : Tensor [B, 2, K] float32 on the CPU, or None
        Lower (``[:, 0]``) and upper (``[:, 1]``) bound of each projection as a standard
        score: a level ``z`` is ``(z, z)``, a floor ``(z, inf)``, a cap ``(-inf, z)``,
        nothing ``(-inf, inf)``; None when no row has a level or a bound.

    Raises
    ------
    TypeError, ValueError
        Naming the row, emotion and field: unknown emotion, non-numeric, non-finite or beyond
        float32 (:data:`FLOAT32_MAX`), an unknown field, conflicting terms (a level beside
        anything else of the same emotion), a floor above a cap, ``rec`` without a bank,
        wrong tensor shape, empty batch.
    """
    return _edits(mix, names, argument, recommended, who, pushes_only=False)[:2]


def bank_edits(bank, mix, names: Sequence[str] | None = None, argument: str = "mix", *,
               who: str = "emokern.steer") -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`mix_to_edits` against an :class:`~emokern.EmotionBank`: columns ``names``
    (default the bank's), ``rec`` = the emotion's recipe (:meth:`EmotionBank.recommended`),
    and levels or bounds only with a calibrated bank (else one ValueError naming the first row
    and emotion that asks for one). What every door (steerer, CLI, vLLM) checks a mix with;
    :func:`scoped_edits` adds the scope."""
    return _bank_edits(bank, mix, names, argument, who)[:2]


def _bank_edits(bank, mix, names, argument: str, who: str):
    names = list(bank.names) if names is None else list(names)
    weights, z_bounds, normals = _edits(mix, names, argument, bank.recommended, who,
                                        pushes_only=False)
    if z_bounds is not None and not bank.calibrated:
        open_ = torch.tensor([-_INF, _INF])[:, None]
        row, k = (int(i) for i in (z_bounds != open_).any(dim=1).nonzero()[0])
        failing(who)(ValueError, f"{argument}[{row}][{names[k]!r}] asks for a level or bound, in "
                                 f"standard scores against the bank's neutral baseline, and "
                                 f"this bank has none (neutral_mean/neutral_std; "
                                 f"emokern.extract.neutral_baseline adds one)")
    return weights, z_bounds, normals


def scoped_edits(bank, mix, names: Sequence[str] | None = None, argument: str = "mix", *,
                 layers: Sequence[int], band: Sequence[int], positions: str = "all",
                 spread: str = "divide", who: str = "emokern.steer"
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`bank_edits` and the batch's :func:`edit_scope` at the steered ``layers``:
    ``(weights [B, K], z_bounds [B, 2, K] or None, scope [B, 2, L, K] or None)``."""
    names = list(bank.names) if names is None else list(names)
    weights, z_bounds, normals = _bank_edits(bank, mix, names, argument, who)
    if normals is None:  # the tensor form: push weights, no scope
        normals = [{}] * weights.shape[0]
    scope = edit_scope(normals, names, layers, band, positions=positions, spread=spread,
                       argument=argument, who=who)
    return weights, z_bounds, scope


def edit_scope(normals: Sequence[Mapping], names: Sequence[str], layers: Sequence[int],
               band: Sequence[int], *, positions: str = "all", spread: str = "divide",
               argument: str = "mix", who: str = "emokern.steer", rows: bool = True
               ) -> torch.Tensor | None:
    r"""Where each row's edits apply: the factor of its push weight, and whether its bounds
    hold, per position kind and steered layer.

    A term with layers :math:`\Lambda` (its scope, or the steerer's ``band``) and positions
    :math:`\Pi` gets, at steered layer ``l`` and position kind ``p``,

    .. math::

        s_{b,p,l,k} = [l \in \Lambda]\,[p \in \Pi] \cdot
            \begin{cases} 1/|\Lambda| & \text{spread = "divide"} \\
                           1 & \text{spread = "each"} \end{cases}

    The op then adds :math:`s\,w\,v` at that layer for those tokens, and the term's level or
    bounds hold where :math:`s > 0` (elsewhere they are open).

    Parameters
    ----------
    normals : sequence of dict
        The batch's mixes in normal form (``rec`` resolved), one per row.
    names : sequence of str
        The ``K`` columns.
    layers : sequence of int
        The ``L`` steered decoder layers.
    band : sequence of int
        Where a term without layers of its own applies (a subset of ``layers``).
    positions : {"all", "prompt", "generated"}
        The tokens the steerer steers: a term scoped to other tokens is an error.
    spread : {"divide", "each"}
    argument, who : str
        Named in errors.
    rows : bool
        Whether errors name the row (``mix[0]['joy']``; False for one request's mix:
        ``mix['joy']``).

    Returns
    -------
    Tensor [B, 2, L, K] float32, or None
        Axis 1: 0 = prompt tokens, 1 = generated tokens. None when no term has a scope: every
        edit then applies at the band's layers with the steerer's plain ``scale`` (``1 /
        len(band)`` or 1), at every token it steers.

    Raises
    ------
    ValueError
        A scope's layer that is not steered, or positions the steerer does not steer, naming
        the row and emotion.
    """
    fail_ = failing(who)
    layers, band = list(layers), list(band)
    if not any(has_scope(t) for row in normals for t in row.values()):
        return None
    scope = torch.zeros(len(normals), 2, len(layers), len(names))
    for row, normal in enumerate(normals):
        for k, name in enumerate(names):
            term = normal.get(name)
            own, kind = (None, "all") if term is None else scope_of(term)
            where = f"{argument}[{row}][{name!r}]" if rows else f"{argument}[{name!r}]"
            missing = [layer for layer in own or () if layer not in layers]
            if missing:
                fail_(ValueError, f"{where} steers layers {missing}, which this steerer does not "
                                  f"steer (it steers {layers}); add them to its layers")
            if kind != "all" and positions != "all" and kind != positions:
                fail_(ValueError, f"{where} steers {kind} tokens, and this steerer steers only "
                                  f"{positions} tokens")
            span = own or band
            factor = 1.0 / len(span) if spread == "divide" else 1.0
            for p, name_p in enumerate(("prompt", "generated")):
                if kind in ("all", name_p):
                    for i, layer in enumerate(layers):
                        if layer in span:
                            scope[row, p, i, k] = factor
    return scope


def mix_to_weights(mix, names: Sequence[str], argument: str = "mix", *, recommended=None,
                   who: str = "emokern.steer") -> torch.Tensor:
    """Push weights ``[B, K]`` of a batch of mixes: :func:`mix_to_edits` for callers that take
    pushes only (closed-loop targets, the tensor form); a level or bound, ``rec`` included
    when its recipe is a level, is an error naming the row and emotion.

    ``recommended(name)`` may give a push weight (:meth:`EmotionBank.recommended_weight`)
    or a :class:`~emokern.Recipe`.
    """
    return _edits(mix, names, argument, recommended, who, pushes_only=True)[0]


def raw_bounds(z_bounds: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *,
               names: Sequence[str] | None = None, layers: Sequence[int] | None = None,
               argument: str = "mix", who: str = "emokern.steer") -> torch.Tensor:
    r"""Bounds in calibrated units (standard scores) as raw projection bounds:
    :math:`\mu_{l,k} + z\,\sigma_{l,k}` (``±inf`` stays open), in float32.

    Parameters
    ----------
    z_bounds : Tensor [B, 2, K]
        From :func:`mix_to_edits`.
    mean, std : Tensor [K] or [L, K]
        The neutral baseline (:meth:`EmotionBank.neutral_stats`) of one layer or of ``L``.
    names, layers : optional
        The emotions and layers, for error messages.

    Returns
    -------
    Tensor [B, 2, K] (one layer) or [L, B, 2, K], float32, on ``mean``'s device

    Raises
    ------
    ValueError
        When a finite bound becomes inf in float32 (``|μ + zσ| > 3.4e38``), naming the row,
        emotion and layer.
    """
    z = z_bounds.detach().to(device=mean.device, dtype=torch.float64)
    mu, sigma = mean.detach().double(), std.detach().double()
    single = mu.dim() == 1
    if single:
        mu, sigma = mu[None], sigma[None]
    raw = mu[:, None, None, :] + z[None] * sigma[:, None, None, :]  # [L, B, 2, K]
    out = raw.float()
    bad = torch.isfinite(z)[None] & ~torch.isfinite(out)
    if bool(bad.any()):
        layer, row, side, k = (int(i) for i in bad.nonzero()[0])
        name = names[k] if names is not None else k
        at = f" at layer {layers[layer]}" if layers is not None else ""
        failing(who)(ValueError, f"{argument}[{row}][{name!r}]: z = {z[row, side, k].item():g} "
                                 f"is {raw[layer, row, side, k].item():.4g} in raw units{at}, "
                                 f"outside float32's finite range")
    return out[0] if single else out
