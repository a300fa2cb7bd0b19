"""The plugin's per-engine settings (``additional_config={"emokern": {...}}``) and the
per-request mix (``SamplingParams(extra_args={"emotion": ...})``).

A mix is parsed once, at the front door (:func:`check_mix`: the HTTP middleware, and vLLM's
front end for every request), into its *normal form*: a dict ``{name: weight}`` of the
bank's emotions with non-zero finite weights, in the bank's order, ``"rec"`` resolved
(None: unsteered). The front end writes that form back into the request's ``extra_args``;
the engine core's cache salt (:func:`cache_salt`) and the workers (:func:`mix_weights`)
only read it. Tested in ``tests/vllm/test_slots.py``."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emokern.bank import EmotionBank
from emokern.errors import failing
from emokern.steering.config import SPREADS, SteeringConfig
from emokern.steering.mix import mix_to_weights, parse_mix

__all__ = ["CONFIG_KEY", "EXTRA_KEY", "EmokernConfig", "bank_of", "cache_salt", "check_mix",
           "describe", "mix_weights", "normal_mix", "request_mix", "with_mix"]

CONFIG_KEY = "emokern"  # additional_config key
EXTRA_KEY = "emotion"  # SamplingParams.extra_args key (HTTP: vllm_xargs)


_fail = failing("emokern.vllm")


@dataclass(frozen=True)
class EmokernConfig:
    """Settings of one engine.

    ``bank``: ``"default"`` (the shipped EV bank), ``"ev"`` / ``"concept"`` (a shipped bank by
    method) or a path to a bank file; ``layers``: ``"auto"`` (the bank's recommended layers) or
    decoder-layer indices; ``monitor``: keep readings; ``spread``: ``"divide"`` (each of the
    ``L`` layers adds ``w / L · v_l``) or ``"each"`` (``docs/design.md`` §3);
    ``norm_preserving``; ``max_requests``: requests with slots alive at once (0: twice vLLM's
    ``max_num_seqs``).
    """

    bank: str = "default"
    layers: str | tuple[int, ...] = "auto"
    monitor: bool = True
    spread: str = "divide"
    norm_preserving: bool = False
    max_requests: int = 0

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
        layers = values.get("layers", "auto")
        if isinstance(layers, list):  # hashable (the settings key the bank cache); checked
            layers = tuple(layers)    # against the bank and model by steering()
        values["layers"] = layers
        if values.get("spread", "divide") not in SPREADS:  # early, before any bank loads
            _fail(ValueError, f"spread must be one of {SPREADS}, got {values['spread']!r}")
        return cls(**values)

    def load_bank(self) -> EmotionBank:
        if self.bank == "default":
            return EmotionBank.load_default()
        if self.bank in ("ev", "concept"):
            return EmotionBank.load_default(self.bank)
        if not Path(self.bank).is_file():
            _fail(ValueError, f"bank must be 'default', 'ev', 'concept' or a bank file; "
                              f"{self.bank!r} is none of these")
        return EmotionBank.load(self.bank)

    def steering(self, bank: EmotionBank, n_model_layers: int) -> SteeringConfig:
        """These settings validated against ``bank`` and a model of ``n_model_layers`` decoder
        layers by the one place every steering setting is checked
        (:meth:`emokern.steering.config.SteeringConfig.resolve`, errors prefixed
        ``emokern.vllm:``): steered layers, spread (:attr:`SteeringConfig.scale`), norm
        handling and readings (every scheduled token; the slot table picks the generated
        ones)."""
        return SteeringConfig.resolve(bank, n_model_layers, layers=self.layers,
                                      spread=self.spread, norm_preserving=self.norm_preserving,
                                      monitor=self.monitor, who="emokern.vllm")


def request_mix(extra_args, names: Sequence[str], *,
                recommended: Callable[[str], float] | None = None,
                argument: str = f"extra_args['{EXTRA_KEY}']") -> torch.Tensor | None:
    """The weights ``[K]`` (user units, columns = ``names``) of a request's
    ``extra_args["emotion"]``, or None when the request is unsteered (no mix, an empty mix, or
    all weights zero: identical to no steering).

    The mix is a dict ``{"joy": 2.0}`` or the text form ``"joy=2,fear=0.5"``
    (:func:`emokern.steering.parse_mix`); a weight ``"rec"`` is ``recommended(name)`` (the
    bank's :meth:`~emokern.EmotionBank.recommended_weight`). Errors (TypeError/ValueError)
    name ``argument`` (over HTTP: ``vllm_xargs['emotion']``).
    """
    if not extra_args or EXTRA_KEY not in extra_args:
        return None
    mix = extra_args[EXTRA_KEY]
    if mix is None:
        return None
    if isinstance(mix, str):
        try:
            mix = parse_mix(mix)
        except ValueError as exc:
            _fail(ValueError, f"{argument}: {str(exc).removeprefix('parse_mix: ')}")
    if not isinstance(mix, Mapping):
        _fail(TypeError, f"{argument} must be a dict or a string like 'joy=2,fear=0.5', got "
                         f"{type(mix).__name__}")
    if not mix:
        return None
    try:
        weights = mix_to_weights([mix], names, argument, recommended=recommended,
                                 who="emokern.vllm")[0]
    except (TypeError, ValueError) as exc:  # one mix, not a batch: no row index in the message
        raise type(exc)(str(exc).replace(f"{argument}[0]", argument)) from None
    return weights if bool(weights.ne(0).any()) else None


def normal_mix(extra_args, names: Sequence[str], *,
               recommended: Callable[[str], float] | None = None,
               argument: str = f"extra_args['{EXTRA_KEY}']") -> dict[str, float] | None:
    """A request's mix in normal form: ``{name: weight}`` over ``names`` (their order), the
    non-zero weights only, as :func:`request_mix` reads them; None when unsteered. Errors as
    :func:`request_mix`'s."""
    weights = request_mix(extra_args, names, recommended=recommended, argument=argument)
    if weights is None:
        return None
    return {n: float(w) for n, w in zip(names, weights.tolist(), strict=True) if w != 0.0}


def with_mix(extra_args, mix: dict[str, float] | None):
    """``extra_args`` (a new dict; None stays None) with its mix replaced by ``mix``, a normal
    form (its key dropped when None)."""
    if not extra_args:
        return extra_args
    out = {k: v for k, v in extra_args.items() if k != EXTRA_KEY}
    if mix is not None:
        out[EXTRA_KEY] = mix
    return out


def _normal_items(extra_args) -> list[tuple[str, float]]:
    mix = extra_args.get(EXTRA_KEY) if extra_args else None
    if not mix:
        return []
    if not isinstance(mix, Mapping):  # the front end writes the normal form only
        _fail(TypeError, f"extra_args['{EXTRA_KEY}'] reached the engine unchecked "
                         f"({type(mix).__name__}); requests enter through vLLM's front end, "
                         f"which puts the mix in normal form")
    return [(str(k), float(v)) for k, v in mix.items() if float(v) != 0.0]


def mix_weights(extra_args, names: Sequence[str]) -> torch.Tensor | None:
    """The weights ``[K]`` (float32, columns = ``names``) of a mix in normal form, or None when
    unsteered. Parses nothing (the front end did); an emotion not in ``names`` is an
    error (a request checked against another bank)."""
    items = _normal_items(extra_args)
    if not items:
        return None
    index = {n: i for i, n in enumerate(names)}
    weights = torch.zeros(len(names))
    for name, w in items:
        if name not in index:
            _fail(ValueError, f"extra_args['{EXTRA_KEY}'] names {name!r}, not an emotion of "
                              f"this engine's bank {list(names)}")
        weights[index[name]] = w
    return weights


def cache_salt(extra_args) -> str | None:
    """A prefix-cache salt for a request's mix in normal form (None for an unsteered request):
    KV computed under one mix is only reused by requests with the same mix."""
    items = sorted(_normal_items(extra_args))
    if not items:
        return None
    text = ",".join(f"{k}={v!r}" for k, v in items)
    return "emokern:" + hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def bank_of(config: EmokernConfig) -> EmotionBank:
    """The bank of ``config``, loaded once per process (the front end checks every request's
    mix against it)."""
    return config.load_bank()


def check_mix(extra_args, config: EmokernConfig | None, *,
              argument: str = f"extra_args['{EXTRA_KEY}']") -> dict[str, float] | None:
    """The front door's check: a request's mix in normal form (:func:`normal_mix` against
    ``config``'s bank; None when unsteered). ValueError/TypeError naming ``argument`` for an
    unknown emotion, a non-finite or non-numeric weight, a malformed mix string, or any mix
    sent to an engine that does not enable emokern (``config`` None)."""
    if config is None:
        if extra_args and extra_args.get(EXTRA_KEY):
            _fail(ValueError, f"{argument} was given but this engine was started without "
                              f"emotion steering; enable it with additional_config="
                              f"{{'{CONFIG_KEY}': {{}}}} (emokern serve does)")
        return None
    bank = bank_of(config)
    return normal_mix(extra_args, bank.names, recommended=bank.recommended_weight,
                      argument=argument)


def describe(config: EmokernConfig, n_model_layers: int) -> dict:
    """What ``GET /v1/emotions`` answers: the engine's emotions, steered layers and
    recommended weights (JSON-ready)."""
    bank = bank_of(config)
    steering = config.steering(bank, n_model_layers)
    return {"object": "emotions", "bank": config.bank, "method": bank.method,
            "names": list(bank.names), "layers": list(steering.layers),
            "recommended_weights": {n: bank.recommended_weight(n) for n in bank.names},
            "spread": steering.spread, "norm_preserving": steering.norm_preserving,
            "monitor": steering.monitor is not None, "calibrated": bank.calibrated,
            "mix": {"field": f"vllm_xargs.{EXTRA_KEY}",
                    "example": "joy=2,fear=0.5",
                    "note": "weights in the bank's units, 'rec' = the recommended weight; "
                            "a mix of all zeros is no steering"}}
