"""The plugin's per-engine settings (``additional_config={"emokern": {...}}``) and the
per-request mix (``SamplingParams(extra_args={"emotion": ...})``)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emokern.bank import EmotionBank
from emokern.steering.mix import mix_to_weights, parse_mix
from emokern.steering.steerer import SPREADS, check_layers

__all__ = ["CONFIG_KEY", "EXTRA_KEY", "EmokernConfig", "bank_of", "cache_salt", "check_mix",
           "describe", "request_mix"]

CONFIG_KEY = "emokern"  # additional_config key
EXTRA_KEY = "emotion"  # SamplingParams.extra_args key (HTTP: vllm_xargs)


def _fail(exc: type[Exception], message: str):
    raise exc(f"emokern.vllm: {message}")


@dataclass(frozen=True)
class EmokernConfig:
    """Settings of one engine.

    ``bank``: ``"default"`` (the shipped EV bank), ``"ev"`` / ``"concept"`` (a shipped bank by
    method) or a path to a bank file; ``layers``: ``"auto"`` (the bank's recommended layers) or
    decoder-layer indices; ``monitor``: keep readings; ``spread``: ``"divide"`` (each of the
    ``L`` layers adds ``w / L · v_l``) or ``"each"`` (``docs/design.md`` §3);
    ``norm_preserving``; ``max_requests``: requests with slots alive at once (0: twice vLLM's
    ``max_num_seqs``); ``impl``: ``"op"`` (the packed op, inside vLLM's compiled graph) or
    ``"hook"`` (a plain-PyTorch forward hook doing the same sums — the benchmark's baseline;
    needs ``enforce_eager=True``, no norm preservation, no ``last`` readings).
    """

    bank: str = "default"
    layers: str | tuple[int, ...] = "auto"
    monitor: bool = True
    spread: str = "divide"
    norm_preserving: bool = False
    max_requests: int = 0
    impl: str = "op"

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
            layers = tuple(layers)    # against the bank and model by resolve_layers
        values["layers"] = layers
        if values.get("impl", "op") not in ("op", "hook"):
            _fail(ValueError, f"impl must be 'op' or 'hook', got {values['impl']!r}")
        if values.get("spread", "divide") not in SPREADS:
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

    def resolve_layers(self, bank: EmotionBank, n_model_layers: int) -> tuple[int, ...]:
        """The steered decoder layers (:func:`emokern.steering.check_layers`)."""
        return check_layers(self.layers, bank, n_model_layers, who="emokern.vllm")


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
        weights = mix_to_weights([mix], names, argument, recommended=recommended)[0]
    except (TypeError, ValueError) as exc:  # one mix, not a batch: no row index in the message
        message = str(exc).removeprefix("emokern.steer: ").replace(f"{argument}[0]", argument)
        _fail(type(exc), message)
    return weights if bool(weights.ne(0).any()) else None


def cache_salt(extra_args) -> str | None:
    """A prefix-cache salt for a request's mix (None for an unsteered request): KV computed
    under one mix is only reused by requests with the same mix. Validates nothing (the worker
    does); an unparsable mix gets its own salt from its text."""
    if not extra_args or EXTRA_KEY not in extra_args:
        return None
    mix = extra_args[EXTRA_KEY]
    try:
        if isinstance(mix, str):
            mix = parse_mix(mix)
        items = sorted((str(k), float(v)) for k, v in dict(mix).items() if float(v) != 0.0)
    except (TypeError, ValueError):
        items = [("?", repr(mix))]
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
              argument: str = f"extra_args['{EXTRA_KEY}']") -> None:
    """Refuse a request's mix before it reaches the engine: ValueError/TypeError naming
    ``argument`` for an unknown emotion, a non-finite or non-numeric weight, a malformed mix
    string, or any mix sent to an engine that does not enable emokern (``config`` None)."""
    if config is None:
        if extra_args and extra_args.get(EXTRA_KEY):
            _fail(ValueError, f"{argument} was given but this engine was started without "
                              f"emotion steering; enable it with additional_config="
                              f"{{'{CONFIG_KEY}': {{}}}} (emokern serve does)")
        return
    bank = bank_of(config)
    request_mix(extra_args, bank.names, recommended=bank.recommended_weight, argument=argument)


def describe(config: EmokernConfig, n_model_layers: int) -> dict:
    """What ``GET /v1/emotions`` answers: the engine's emotions, steered layers and
    recommended weights (JSON-ready)."""
    bank = bank_of(config)
    layers = config.resolve_layers(bank, n_model_layers)
    return {"object": "emotions", "bank": config.bank, "method": bank.method,
            "names": list(bank.names), "layers": list(layers),
            "recommended_weights": {n: bank.recommended_weight(n) for n in bank.names},
            "spread": config.spread, "norm_preserving": config.norm_preserving,
            "monitor": config.monitor, "calibrated": bank.calibrated,
            "mix": {"field": f"vllm_xargs.{EXTRA_KEY}",
                    "example": "joy=2,fear=0.5",
                    "note": "weights in the bank's units, 'rec' = the recommended weight; "
                            "a mix of all zeros is no steering"}}
