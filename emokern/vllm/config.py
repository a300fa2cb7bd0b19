"""The plugin's per-engine settings (``additional_config={"emokern": {...}}``) and the
per-request mix (``SamplingParams(extra_args={"emotion": ...})``)."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emokern.bank import EmotionBank
from emokern.steering.mix import parse_mix
from emokern.steering.steerer import SPREADS

__all__ = ["CONFIG_KEY", "EXTRA_KEY", "EmokernConfig", "cache_salt", "request_mix"]

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
    ``norm_preserving``; ``max_requests``: steered requests alive at once (0: twice vLLM's
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
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if not isinstance(layers, str):
            if not isinstance(layers, Sequence) or not layers or not all(
                    isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in layers):
                _fail(ValueError, f"layers must be 'auto' or a non-empty list of ints, got "
                                  f"{layers!r}")
            layers = tuple(int(v) for v in layers)
        elif layers != "auto":
            _fail(ValueError, f"layers must be 'auto' or a list of ints, got {layers!r}")
        values["layers"] = layers
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
        chosen = (tuple(int(i) for i in bank.recommended_layers) if self.layers == "auto"
                  else tuple(self.layers))
        if len(set(chosen)) != len(chosen):
            _fail(ValueError, f"layers lists a layer twice: {list(chosen)}")
        for layer in chosen:
            if not 0 <= layer < n_model_layers:
                _fail(ValueError, f"layer {layer} is outside the model, which has "
                                  f"{n_model_layers} decoder layers")
            if layer not in bank.layers:
                _fail(ValueError, f"layer {layer} has no vectors in the bank, which covers "
                                  f"layers {list(bank.layers)}")
        return chosen


def request_mix(extra_args, names: Sequence[str]) -> torch.Tensor | None:
    """The weights ``[K]`` (user units, columns = ``names``) of a request's
    ``extra_args["emotion"]``, or None when the request is unsteered (no mix, an empty mix, or
    all weights zero: identical to no steering).

    The mix is a dict ``{"joy": 2.0}`` or the text form ``"joy=2,fear=0.5"``
    (:func:`emokern.steering.parse_mix`).
    """
    if not extra_args or EXTRA_KEY not in extra_args:
        return None
    mix = extra_args[EXTRA_KEY]
    if isinstance(mix, str):
        mix = parse_mix(mix)
    if mix is None:
        return None
    if not isinstance(mix, Mapping):
        _fail(TypeError, f"extra_args['{EXTRA_KEY}'] must be a dict or a string like "
                         f"'joy=2,fear=0.5', got {type(mix).__name__}")
    index = {name: k for k, name in enumerate(names)}
    weights = torch.zeros(len(names))
    for name, weight in mix.items():
        if name not in index:
            _fail(ValueError, f"extra_args['{EXTRA_KEY}'] names unknown emotion {name!r}; the "
                              f"bank has {list(names)}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(
                float(weight)):
            _fail(ValueError, f"extra_args['{EXTRA_KEY}'][{name!r}] must be a finite number, "
                              f"got {weight!r}")
        weights[index[name]] = float(weight)
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
