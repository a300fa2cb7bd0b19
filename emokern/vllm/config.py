"""The plugin's per-engine settings (``additional_config={"emokern": {...}}``) and the
per-request mix (``SamplingParams(extra_args={"emotion": ...})``).

A mix is anything the mix grammar takes (:mod:`emokern.steering.mix`: ``"joy=2"``,
``"anger=rec"``, ``"sadness@1.5"``, ``"fear=erase"``, ``"anger<=0.5"``, ``"joy>=1"``, the
object form or its JSON). It is parsed once, at the front door (:func:`check_mix`: the HTTP
middleware, and vLLM's front end for every request), into its *normal form*: a dict of the
bank's emotions in the bank's order, each a non-zero push weight (float) or a dict of
``weight``/``level``/``min``/``max`` (standard scores), ``"rec"`` resolved to the emotion's
recipe (None: unsteered). Levels and bounds are opt-in per engine (``"levels": true``: the
op then takes per-slot bounds, :class:`~emokern.vllm.slots.SlotTable`); without it a mix that
has one is refused at the door, and the compiled graph is the one without bounds. Every
engine bounds ``|push weight|`` and ``|z|`` (``max_weight``, ``max_level``: the operator's,
else :func:`default_limits` of the bank), checked at the door too. The front end writes the
normal form back into the request's ``extra_args``; the engine core's cache salt
(:func:`cache_salt`) and the workers (:func:`mix_edits`) only read it. Tested in
``tests/vllm/test_slots.py`` and ``tests/test_mix_limits.py``."""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from emokern.bank import EmotionBank
from emokern.errors import failing
from emokern.steering.config import SPREADS, SteeringConfig
from emokern.steering.mix import (
    FLOAT32_MAX,
    REC,
    SCOPE,
    asks_rec,
    bank_edits,
    check_limits,
    edit_scope,
    format_mix,
    has_bounds,
    is_push,
    mix_to_edits,
    mix_to_weights,
    normalize_mix,
    raw_bounds,
)

__all__ = ["CONFIG_KEY", "EXTRA_KEY", "LIMIT_FACTOR", "MIN_MAX_LEVEL", "EmokernConfig", "bank_of",
           "cache_salt", "check_mix", "check_presets", "default_limits", "describe", "limits_of",
           "mix_edits", "normal_mix", "request_mix", "with_mix"]

CONFIG_KEY = "emokern"  # additional_config key
EXTRA_KEY = "emotion"  # SamplingParams.extra_args key (HTTP: vllm_xargs)


_fail = failing("emokern.vllm")

#: A preset's name: an identifier (letters, digits, ``_``, ``-``; not starting with a digit or
#: ``-``), never a mix term (every term has ``=``, ``@``, ``<=`` or ``>=``), an emotion of the
#: bank, or a word of the grammar.
PRESET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_RESERVED = ("none", "rec", "erase", "preset")

#: The default limits are this many times the furthest the bank's own recipes go
#: (:func:`default_limits`).
LIMIT_FACTOR = 4.0
#: The default ``max_level`` is never below this many standard scores.
MIN_MAX_LEVEL = 10.0


@dataclass(frozen=True)
class EmokernConfig:
    """Settings of one engine.

    ``bank``: a bank by name or path as :meth:`emokern.EmotionBank.named` takes it (``"default"``,
    ``"concept"``, ``"gemma3-270m-ev"``, a bank file); ``layers``: ``"auto"`` (the bank's
    recommended layers, the recipes' own bands steered beside them) or decoder-layer indices;
    ``band``: where a mix term without a layer scope applies, some of ``layers`` (None, the
    default: all of them, or for ``"auto"`` the recommended layers; an engine may steer more
    layers than the band so that requests can scope edits to them, ``anger[16-18]=1``);
    ``monitor``: keep readings; ``spread``:
    ``"divide"`` (each of the ``L`` layers adds ``w / L · v_l``) or ``"each"`` (``docs/design.md``
    §3); ``norm_preserving``; ``max_requests``: requests with slots alive at once (0: twice vLLM's
    ``max_num_seqs``); ``levels``: accept levels, caps, floors and erase in mixes (a calibrated
    bank; the op then reads per-slot bounds and the Gram matrix, so the engine's compiled graph
    differs from the default one, which has none); ``presets``: named mixes (``{"calm":
    "joy=1,anger<=0"}``, any grammar form) a request names instead of a mix
    (``extra_args={"emotion": "calm"}``), kept as ``(name, mix text)`` pairs and checked against the
    bank by :func:`check_presets`; ``max_weight``: the largest ``|push weight|`` a mix may ask for,
    ``max_level``: the largest ``|z|`` of a level, cap or floor (positive numbers; None, the
    default: :func:`default_limits` of the bank, which always admit the bank's own recipes). A mix
    beyond them — a request's, a preset's, or ``rec`` whose recipe is beyond an operator's tighter
    limit — is refused at the door (:func:`check_mix`, a 400 over HTTP); :func:`limits_of` gives the
    limits in force.
    """

    bank: str = "default"
    layers: str | tuple[int, ...] = "auto"
    band: tuple[int, ...] | None = None
    monitor: bool = True
    spread: str = "divide"
    norm_preserving: bool = False
    max_requests: int = 0
    levels: bool = False
    presets: tuple[tuple[str, str], ...] = ()
    max_weight: float | None = None
    max_level: float | None = None

    @classmethod
    def from_additional_config(cls, additional) -> EmokernConfig | None:
        """The settings under ``additional_config["emokern"]``, or None when absent."""
        if not isinstance(additional, Mapping) or CONFIG_KEY not in additional:
            return None
        raw = additional[CONFIG_KEY]
        if raw is True:
            raw = {}
        if not isinstance(raw, Mapping):
            _fail(TypeError, f"additional_config['{CONFIG_KEY}'] must be a dict, got "
                             f"{type(raw).__name__}")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            _fail(ValueError, f"unknown setting(s) {sorted(unknown)}; known: "
                              f"{sorted(cls.__dataclass_fields__)}")
        values = dict(raw)
        for key in ("layers", "band"):  # hashable (the settings key the bank cache); checked
            if isinstance(values.get(key), list):  # against the bank and model by steering()
                values[key] = tuple(values[key])
        if values.get("spread", "divide") not in SPREADS:  # early, before any bank loads
            _fail(ValueError, f"spread must be one of {SPREADS}, got {values['spread']!r}")
        if not isinstance(values.get("levels", False), bool):
            _fail(TypeError, f"additional_config['{CONFIG_KEY}']['levels'] must be true or false, "
                             f"got {values['levels']!r}")
        values["presets"] = _preset_pairs(values.get("presets") or {})
        for key in ("max_weight", "max_level"):
            values[key] = _limit(values.get(key), key)
        return cls(**values)

    def load_bank(self) -> EmotionBank:
        try:
            return EmotionBank.named(self.bank)
        except ValueError as exc:
            _fail(ValueError, str(exc).removeprefix("EmotionBank: "))

    def steering(self, bank: EmotionBank, n_model_layers: int) -> SteeringConfig:
        """These settings validated against ``bank`` and a model of ``n_model_layers`` decoder
        layers by the one place every steering setting is checked
        (:meth:`emokern.steering.config.SteeringConfig.resolve`, errors prefixed
        ``emokern.vllm:``): steered layers, spread (:attr:`SteeringConfig.scale`), norm
        handling and readings (every scheduled token; the slot table picks the generated
        ones)."""
        return SteeringConfig.resolve(bank, n_model_layers, layers=self.layers, band=self.band,
                                      spread=self.spread, norm_preserving=self.norm_preserving,
                                      monitor=self.monitor, who="emokern.vllm")


def _limit(value, key: str) -> float | None:
    """``additional_config["emokern"][key]`` (``max_weight``/``max_level``) checked: None
    (the bank's default) or a positive number within float32's range, as a float."""
    if value is None:
        return None
    where = f"additional_config['{CONFIG_KEY}']['{key}']"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(TypeError, f"{where} must be a positive number (or null: the bank's default), got "
                         f"{type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX):
        _fail(ValueError, f"{where} must be a positive number within float32's range "
                          f"(0 < {key} <= {FLOAT32_MAX:.4g}), got {value}")
    return value


def _preset_pairs(raw) -> tuple[tuple[str, str], ...]:
    """``additional_config["emokern"]["presets"]`` as hashable ``(name, mix text)`` pairs,
    names checked (the mixes are checked against the bank by :func:`check_presets`)."""
    if isinstance(raw, (tuple, list)):  # the pairs themselves (a config rebuilt from one)
        raw = dict(raw)
    if not isinstance(raw, Mapping):
        _fail(TypeError, f"additional_config['{CONFIG_KEY}']['presets'] must be a dict of "
                         f"name -> mix, got {type(raw).__name__}")
    pairs = []
    for name, mix in raw.items():
        if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) \
                or name.lower() in _RESERVED:
            _fail(ValueError, f"preset name {name!r} must be an identifier (letters, digits, "
                              f"'_', '-'), not one of {list(_RESERVED)}")
        if not isinstance(mix, (str, Mapping)):
            _fail(TypeError, f"preset {name!r} must be a mix (a string like 'joy=1,anger<=0' "
                             f"or a dict), got {type(mix).__name__}")
        try:
            text = format_mix(mix)
        except (TypeError, ValueError) as exc:
            reason = str(exc).removeprefix("format_mix: ").removeprefix("mix: ")
            _fail(type(exc), f"preset {name!r}: {reason}")
        pairs.append((name, text))
    return tuple(pairs)


def _compact(normal: Mapping, names: Sequence[str], argument: str) -> dict | None:
    """A checked mix (:func:`~emokern.steering.mix.normalize_mix`) in the engine's normal
    form: the bank's order, zero pushes dropped (a dict's zero ``weight`` too), no ``rec``
    left; None when nothing is left (unsteered)."""
    out = {}
    for name in names:
        if name not in normal:
            continue
        term = normal[name]
        fields = dict(term) if isinstance(term, dict) else {"weight": term}
        if fields.get("weight") == REC:
            _fail(ValueError, f"{argument}[{name!r}] is 'rec' but no bank gives recommended "
                              f"weights here")
        if fields.get("weight") == 0.0:
            del fields["weight"]
        if not fields:
            continue
        out[name] = float(fields["weight"]) if set(fields) == {"weight"} else \
            {k: v if k in SCOPE else float(v) for k, v in fields.items()}
    return out or None


def normal_mix(extra_args, names: Sequence[str], *, recommended=None,
               argument: str = f"extra_args['{EXTRA_KEY}']") -> dict | None:
    """A request's mix (``extra_args["emotion"]``) in normal form, or None when unsteered (no
    mix, an empty mix, or nothing but zero weights: identical to no steering).

    The mix is anything the mix grammar takes (:mod:`emokern.steering.mix`): the text form
    ``"joy=2,sadness@1.5,anger<=0.5"``, the object form ``{"joy": 2, "fear": "erase",
    "anger": {"max": 0.5}}`` or its JSON. ``rec`` is ``recommended(name)`` (the bank's
    :meth:`~emokern.EmotionBank.recommended`: a push or a level). The normal form maps each
    edited emotion, in ``names``' order, to its push weight (a float) or to a dict of
    ``weight``/``level``/``min``/``max`` (standard scores). It is idempotent. Errors
    (TypeError/ValueError) name ``argument`` (over HTTP: ``vllm_xargs['emotion']``), the
    emotion and the field.
    """
    if not extra_args or EXTRA_KEY not in extra_args:
        return None
    mix = extra_args[EXTRA_KEY]
    if mix is None:
        return None
    if not isinstance(mix, (str, Mapping)):
        _fail(TypeError, f"{argument} must be a dict or a string like 'joy=2,fear@0.5', got "
                         f"{type(mix).__name__}")
    normal = normalize_mix(mix, names, recommended=recommended, argument=argument,
                           who="emokern.vllm")
    return _compact(normal, names, argument)


def request_mix(extra_args, names: Sequence[str], *, recommended=None,
                argument: str = f"extra_args['{EXTRA_KEY}']") -> torch.Tensor | None:
    """The push weights ``[K]`` (user units, columns = ``names``) of a request's mix, or None
    when unsteered; a mix with a level or bound is an error here (pushes only: see
    :func:`normal_mix` and :func:`mix_edits` for the rest). Errors as :func:`normal_mix`'s."""
    normal = normal_mix(extra_args, names, recommended=recommended, argument=argument)
    if normal is None:
        return None
    for name, term in normal.items():
        if not is_push(term):
            _fail(ValueError, f"{argument}[{name!r}] is {format_mix({name: term})!r}, a level or "
                              f"bound: request_mix gives push weights only (mix_edits gives "
                              f"the bounds too)")
    return mix_to_weights([normal], names, argument, who="emokern.vllm")[0]


def with_mix(extra_args, mix: dict | None):
    """``extra_args`` (a new dict; None stays None) with its mix replaced by ``mix``, a normal
    form (its key dropped when None)."""
    if not extra_args:
        return extra_args
    out = {k: v for k, v in extra_args.items() if k != EXTRA_KEY}
    if mix is not None:
        out[EXTRA_KEY] = mix
    return out


def _engine_mix(extra_args, names: Sequence[str] | None = None) -> dict | None:
    """The normal form the front end wrote into ``extra_args`` (read, not parsed: a string is
    an error), zero pushes dropped; None when unsteered."""
    mix = extra_args.get(EXTRA_KEY) if extra_args else None
    if not mix:
        return None
    if not isinstance(mix, Mapping):  # the front end writes the normal form only
        _fail(TypeError, f"extra_args['{EXTRA_KEY}'] reached the engine unchecked "
                         f"({type(mix).__name__}); requests enter through vLLM's front end, "
                         f"which puts the mix in normal form")
    if names is not None:
        for name in mix:
            if name not in names:
                _fail(ValueError, f"extra_args['{EXTRA_KEY}'] names {name!r}, not an emotion of "
                                  f"this engine's bank {list(names)}")
    argument = f"extra_args['{EXTRA_KEY}']"
    normal = normalize_mix(mix, names, argument=argument, who="emokern.vllm")
    return _compact(normal, list(names) if names is not None else list(normal), argument)


def mix_edits(extra_args, names: Sequence[str], steering: SteeringConfig | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """What a worker makes of a request's mix in normal form: ``(weights [K], z_bounds
    [2, K] or None, scope [2, L, K] or None)`` (float32, columns = ``names``; ``z_bounds``
    lower and upper standard scores, ``±inf`` open, as
    :func:`~emokern.steering.mix.mix_to_edits`; ``scope`` the factor per position kind and
    steered layer of ``steering``, :func:`~emokern.steering.mix.edit_scope`, None for a mix
    without scope or without ``steering``), or None when unsteered. Parses no text (the
    front end did); an emotion not in ``names`` is an error (a request checked against
    another bank)."""
    normal = _engine_mix(extra_args, names)
    if normal is None:
        return None
    argument = f"extra_args['{EXTRA_KEY}']"
    weights, z_bounds = mix_to_edits([normal], names, argument, who="emokern.vllm")
    scope = None
    if steering is not None:
        scope = edit_scope([normal], names, steering.layers, steering.band,
                           positions=steering.positions, spread=steering.spread,
                           argument=argument, who="emokern.vllm", rows=False)
    return (weights[0], None if z_bounds is None else z_bounds[0],
            None if scope is None else scope[0])


def cache_salt(extra_args) -> str | None:
    """A prefix-cache salt for a request's mix in normal form (None for an unsteered request):
    KV computed under one mix (its pushes, levels and bounds) is only reused by requests with
    the same mix."""
    normal = _engine_mix(extra_args)
    if normal is None:
        return None
    text = format_mix(dict(sorted(normal.items())))
    return "emokern:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def bank_of(config: EmokernConfig) -> EmotionBank:
    """The bank of ``config``, loaded once per process (the front end checks every request's
    mix against it)."""
    return config.load_bank()


def default_limits(bank: EmotionBank) -> tuple[float, float]:
    """The default ``(max_weight, max_level)`` of an engine serving ``bank``: generous
    multiples (:data:`LIMIT_FACTOR`, 4) of the furthest the bank's own recipes go, so that
    they are always admitted while a weight or level orders of magnitude beyond anything
    measured (which drives the model to degenerate text or to inf) is refused.

    - ``max_weight`` = 4 × the largest ``|weight|`` the bank recommends (each emotion's
      :meth:`~emokern.EmotionBank.recommended_weight`, and the bank-wide
      :attr:`~emokern.EmotionBank.default_weight`): 48 on the shipped EV bank (fear's 12), 6 on
      the concept bank (its default weight, 1.5).
    - ``max_level`` = 4 × the largest ``|z|`` the recipes set or reach — a level recipe's
      ``z``, a push recipe's measured reading (``measured["reading"]``, the mean standard
      score of the text it steered), and never below :data:`MIN_MAX_LEVEL` (10; neutral text
      reads within about ±3): 27.55 on the shipped EV bank (sadness reads 6.89 at its
      recipe), 64 on the concept bank (fear's level recipe, z = 16).
    """
    weights = [abs(bank.default_weight)] + [abs(bank.recommended_weight(n)) for n in bank.names]
    levels = [MIN_MAX_LEVEL / LIMIT_FACTOR]
    for name in bank.names:
        recipe = bank.recommended(name)
        if recipe.mode == "level":
            levels.append(abs(recipe.strength))
        reading = recipe.measured.get("reading")
        if isinstance(reading, numbers.Real) and math.isfinite(reading):
            levels.append(abs(float(reading)))
    return (min(LIMIT_FACTOR * max(weights), FLOAT32_MAX),
            min(LIMIT_FACTOR * max(levels), FLOAT32_MAX))


@functools.lru_cache(maxsize=8)
def limits_of(config: EmokernConfig) -> tuple[float, float]:
    """The ``(max_weight, max_level)`` in force on an engine: the operator's
    (``config.max_weight`` / ``config.max_level``), else :func:`default_limits` of its
    bank."""
    default_weight, default_level = default_limits(bank_of(config))
    return (default_weight if config.max_weight is None else config.max_weight,
            default_level if config.max_level is None else config.max_level)


#: How an operator sets each limit (error messages).
_LIMIT_HOW = {key: f"emokern serve --{key.replace('_', '-')}, additional_config"
                   f"['{CONFIG_KEY}']['{key}']" for key in ("max_weight", "max_level")}


def check_mix(extra_args, config: EmokernConfig | None, *,
              argument: str = f"extra_args['{EXTRA_KEY}']") -> dict | None:
    """The front door's check: a request's mix in normal form (:func:`normal_mix` against
    ``config``'s bank, ``rec`` = the emotion's recipe; None when unsteered).
    ValueError/TypeError naming ``argument``, the emotion and the field for an unknown
    emotion, a non-finite, non-numeric or out-of-range number, conflicting terms, a malformed
    mix string, a level or bound (a ``rec`` whose recipe is a level included) sent to an
    engine without ``levels`` or with an uncalibrated bank, a push weight or level beyond the
    engine's limits (:func:`limits_of`; ``rec`` and presets included), or any mix sent to an
    engine that does not enable emokern (``config`` None). Nothing is applied when it
    raises."""
    if config is None:
        if extra_args and extra_args.get(EXTRA_KEY):
            _fail(ValueError, f"{argument} was given but this engine was started without "
                              f"emotion steering; enable it with additional_config="
                              f"{{'{CONFIG_KEY}': {{}}}} (emokern serve does)")
        return None
    presets = check_presets(config)
    mix = extra_args.get(EXTRA_KEY) if extra_args else None
    if isinstance(mix, str) and PRESET_NAME.fullmatch(mix.strip()) \
            and mix.strip().lower() not in _RESERVED and mix.strip() not in bank_of(config).names:
        # a bare name that is no emotion (those are malformed terms, reported as such)
        name = mix.strip()
        if name not in presets:
            _fail(ValueError, f"{argument} is {name!r}, not a mix and not a preset of this "
                              f"server (presets: {sorted(presets) or 'none'}); a mix is like "
                              f"'joy=2,fear@0.5'")
        return presets[name]
    return _checked_mix(extra_args, config, argument)


def _checked_mix(extra_args, config: EmokernConfig, argument: str) -> dict | None:
    bank = bank_of(config)
    normal = normal_mix(extra_args, bank.names, recommended=bank.recommended, argument=argument)
    if normal is None:
        return None
    if has_bounds(normal) and not config.levels:
        name, term = next((n, t) for n, t in normal.items() if not is_push(t))
        _fail(ValueError, f"{argument}[{name!r}] is {format_mix({name: term})!r}, a level or "
                          f"bound, but this engine was started without levels; enable them "
                          f"with additional_config={{'{CONFIG_KEY}': {{'levels': true}}}} "
                          f"(emokern serve --levels)")
    max_weight, max_level = limits_of(config)
    # the emotions whose edit is their recipe ('rec'), for the message (the mix is valid here)
    given = normalize_mix(extra_args[EXTRA_KEY], bank.names, argument=argument,
                          who="emokern.vllm")
    recipes = [n for n, t in given.items() if asks_rec(t)]
    check_limits(normal, max_weight=max_weight, max_level=max_level, argument=argument,
                 who="emokern.vllm", source="this server's limit", how=_LIMIT_HOW,
                 recipes=recipes)
    # A scope's layers must be steered by the engine: its steered layers are those of a model
    # as deep as the bank (every bank layer is inside the model it was made for).
    steering = config.steering(bank, max(bank.layers) + 1)
    edit_scope([normal], bank.names, steering.layers, steering.band,
               positions=steering.positions, spread=steering.spread, argument=argument,
               who="emokern.vllm", rows=False)
    if not has_bounds(normal):
        return normal
    # Calibrated bank; bounds that stay finite in float32 at every layer of the bank (a
    # superset of the steered ones), so that no worker can fail on them.
    _, z_bounds = bank_edits(bank, [normal], argument=argument, who="emokern.vllm")
    raw_bounds(z_bounds, bank.neutral_mean, bank.neutral_std, names=bank.names,
               layers=bank.layers, argument=argument, who="emokern.vllm")
    return normal


@functools.lru_cache(maxsize=8)
def check_presets(config: EmokernConfig) -> dict[str, dict | None]:
    """``config``'s presets, name → normal form (None: unsteered), each checked as a request's
    mix would be (:func:`check_mix`) against the bank. ValueError/TypeError naming the preset
    for a name that is an emotion of the bank or a mix the engine refuses."""
    out: dict[str, dict | None] = {}
    if not config.presets:
        return out
    names = bank_of(config).names
    for name, text in config.presets:
        if name in names:
            _fail(ValueError, f"preset name {name!r} is an emotion of the bank; choose another "
                              f"(a preset name must not read as a mix term)")
        argument = f"preset {name!r}"
        try:
            out[name] = _checked_mix({EXTRA_KEY: text}, config, argument)
        except (TypeError, ValueError) as exc:
            message = str(exc).removeprefix("emokern.vllm: ")
            _fail(type(exc), message if argument in message else f"{argument}: {message}")
    return out


def describe(config: EmokernConfig, n_model_layers: int) -> dict:
    """What ``GET /v1/emotions`` answers: the engine's emotions, steered layers (and the band
    a mix without scope steers), recommended
    weights and recipes, whether levels are on, the limits (``max_weight``, ``max_level``:
    :func:`limits_of`) and the mix grammar (JSON-ready)."""
    bank = bank_of(config)
    steering = config.steering(bank, n_model_layers)
    max_weight, max_level = limits_of(config)
    return {"object": "emotions", "bank": config.bank, "method": bank.method,
            "names": list(bank.names), "layers": list(steering.layers),
            "band": list(steering.band),
            "recommended_weights": {n: bank.recommended_weight(n) for n in bank.names},
            "recipes": {n: bank.recommended(n).mix_term() for n in bank.names},
            "spread": steering.spread, "norm_preserving": steering.norm_preserving,
            "monitor": steering.monitor is not None, "calibrated": bank.calibrated,
            "levels": config.levels,
            "max_weight": max_weight, "max_level": max_level,
            "presets": {name: format_mix(normal or {})
                        for name, normal in check_presets(config).items()},
            "mix": {"field": f"vllm_xargs.{EXTRA_KEY}",
                    "example": "joy=2,fear=0.5",
                    "preset": "a preset's name alone (e.g. \"calm\") stands for its mix",
                    "terms": {"joy=2": "push (the bank's units)",
                              "anger=rec": "the emotion's recipe (a push or a level)",
                              "sadness@1.5": "level: projection set to z = 1.5",
                              "fear=erase": "level at the neutral mean (z = 0)",
                              "anger<=0.5": "cap at z = 0.5",
                              "joy>=1": "floor at z = 1",
                              "anger[12;generated]=1": "scope: the edit at decoder layer 12 "
                                                       "(a steered one) on generated tokens "
                                                       "only"},
                    "limits": "|push weight| <= max_weight, |z| of a level, cap or floor "
                              "<= max_level (rec and presets included); beyond: 400",
                    "note": "weights in the bank's units, levels/caps/floors in standard "
                            "scores against the bank's neutral baseline (only with levels "
                            "on); a mix of all zeros is no steering"}}
