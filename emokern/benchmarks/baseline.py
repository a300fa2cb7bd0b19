"""The baselines emokern is measured against: forward hooks that add one shared vector.

1. :class:`NaiveSteering` — the common forward-hook approach of existing steering libraries:
   one hook per steered decoder layer returns ``output + delta`` (one shared vector for the
   whole batch, every position), projections come from a separate matmul appended to Python
   lists, and different mixes run by looping over conditions, one batch each
   (:func:`emokern.benchmarks.sweep.sweep_loop`).
2. The published ``steering-vectors`` library (``pip install --no-deps steering-vectors``; it
   pins transformers<5 but works with 5.x, and imports scikit-learn), through
   ``SteeringVector(...).apply(model)`` (:func:`steering_vectors_patch`).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from emokern.models import decoder_layers

__all__ = ["NaiveSteering", "shared_deltas", "steering_vectors_available",
           "steering_vectors_patch", "steering_vectors_version"]


def shared_deltas(bank, mix: Mapping[str, float], layers: Sequence[int],
                  spread: str = "divide") -> dict[int, torch.Tensor]:
    """The vector each steered layer adds for one shared mix: ``s · Σ_k w_k v_{l,k}`` [D].

    ``s = 1 / len(layers)`` for ``spread="divide"`` (emokern's default), 1 for ``"each"``.
    """
    scale = 1.0 / len(layers) if spread == "divide" else 1.0
    deltas = {}
    for layer in layers:
        delta = torch.zeros(bank.dim, dtype=torch.float32)
        for name, weight in mix.items():
            delta += float(weight) * bank.vector(name, layer).float().cpu()
        deltas[layer] = delta * scale
    return deltas


class NaiveSteering:
    """The common forward-hook steering of existing libraries (the benchmark baseline).

    One forward hook per steered layer returns ``hidden + delta_l`` (a new tensor: the same
    vector for every row and every position, padding included), and — when
    ``directions`` is given — first appends the projections ``hidden @ unit_directions.T``
    ``[B, T, K]`` of the layer output to a Python list (``readings[layer]``). Different mixes
    need different batches.

    Parameters
    ----------
    model : transformers model
    deltas : dict int -> Tensor [D]
        The vector to add at the output of each decoder layer (see :func:`shared_deltas`).
    directions : dict int -> Tensor [K, D], optional
        Emotion directions to read at each layer (normalised here).
    """

    def __init__(self, model: nn.Module, deltas: Mapping[int, torch.Tensor],
                 directions: Mapping[int, torch.Tensor] | None = None) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.deltas = {layer: d.to(device=device, dtype=dtype) for layer, d in deltas.items()}
        self.directions = None
        if directions is not None:
            self.directions = {layer: (v.float() / v.float().norm(dim=-1, keepdim=True)).to(device)
                               for layer, v in directions.items()}
        self.readings: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.deltas}
        self._handles: list = []

    def _hook(self, layer: int):
        delta = self.deltas[layer]
        directions = None if self.directions is None else self.directions[layer]
        readings = self.readings[layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if directions is not None:
                readings.append((hidden.float() @ directions.T).detach())
            steered = hidden + delta
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def __enter__(self) -> NaiveSteering:
        for layer in self.deltas:
            self._handles.append(self.layers[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def steering_vectors_available() -> bool:
    """Whether the published ``steering-vectors`` library imports here."""
    try:
        import steering_vectors  # noqa: F401  (optional: installed --no-deps for comparisons)
    except Exception:  # it pins transformers<5 and may fail in many ways
        return False
    return True


def steering_vectors_version() -> str | None:
    """The installed ``steering-vectors`` version when it imports, else None."""
    if not steering_vectors_available():
        return None
    return importlib.metadata.version("steering-vectors")


def steering_vectors_patch(model: nn.Module, deltas: Mapping[int, torch.Tensor]):
    """A context manager applying ``deltas`` with the ``steering-vectors`` library
    (``SteeringVector(...).apply(model)``: one additive forward hook per decoder block)."""
    # Imported here: an optional dependency, only present for the comparison.
    from steering_vectors import SteeringVector

    parameter = next(model.parameters())
    vector = SteeringVector(
        layer_activations={layer: d.to(device=parameter.device, dtype=parameter.dtype)
                           for layer, d in deltas.items()},
        layer_type="decoder_block",
    )
    return vector.apply(model, multiplier=1.0)
