"""Steering Hugging Face models: a different emotion mix per sequence, with running readings.

::

    import emokern
    with emokern.steer(model, bank, mix=[{"joy": 2.0}, {"sadness": 1.5, "fear": 0.5}, {}]) as s:
        out = model.generate(**enc, max_new_tokens=64)
    s.monitor.mean()       # [B, L, K]

``emokern.steer`` is the function :func:`steer` (this package is ``emokern.steering``). The
modules, from the bottom up:

* :mod:`~emokern.steering.mix` — mixes, the one grammar every door speaks: pushes
  (``joy=2``), recipes (``anger=rec``), levels (``sadness@1.5``, ``fear=erase``), caps
  (``anger<=0.5``) and floors (``joy>=1``) in text, dict or JSON form; :func:`parse_mix`,
  :func:`format_mix`, :func:`mix_to_edits` (one mix per sequence → ``[B, K]`` weights and
  ``[B, 2, K]`` bounds in standard scores), :func:`raw_bounds`, :func:`mix_to_weights`;
* :mod:`~emokern.steering.config` — :class:`SteeringConfig`: every setting (layers,
  positions, spread, monitor, ...) validated once against a bank and a layer count, shared by
  the steerer and the vLLM plugin;
* :mod:`~emokern.steering.adapters` — transformers plumbing: the module that runs the
  decoder layers, the arguments of a forward, the past length, a layer's device;
* :mod:`~emokern.steering.monitor` — :class:`Monitor`, the running readings;
* :mod:`~emokern.steering.steerer` — :class:`Steerer` and :func:`steer`: the hooks, the
  preallocated decode step, how weights spread over layers (its docstring explains how it
  works; ``docs/design.md`` gives the op's exact semantics and the layer convention);
* :mod:`~emokern.steering.generation` — :func:`generate`, prompts and mixes in, texts and
  readings out;
* :mod:`~emokern.steering.ablate` — :func:`ablate` (``emokern.ablate``): the other
  intervention on a model, scaling MLP neurons during every forward (op
  ``emokern::scale_neurons_``).
"""

from emokern.steering.config import POSITIONS, SPREADS, SteeringConfig, check_layers
from emokern.steering.generation import generate
from emokern.steering.mix import format_mix, mix_to_edits, mix_to_weights, parse_mix, raw_bounds
from emokern.steering.monitor import Monitor
from emokern.steering.steerer import Steerer, steer

__all__ = ["POSITIONS", "SPREADS", "Monitor", "Steerer", "SteeringConfig", "check_layers",
           "format_mix", "generate", "mix_to_edits", "mix_to_weights", "parse_mix", "raw_bounds",
           "steer"]
