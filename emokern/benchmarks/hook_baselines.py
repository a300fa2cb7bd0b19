"""The baselines emokern is measured against: plain forward hooks.

1. :class:`NaiveSteering` — the common forward-hook approach of existing steering libraries:
   one hook per steered decoder layer returns ``output + delta`` (one shared vector for the
   whole batch, every position), projections come from a separate matmul appended to Python
   lists, and different mixes run by looping over conditions, one batch each
   (:func:`emokern.benchmarks.mix_sweep.sweep_loop`).
2. :class:`PerRowSteering` — the plain PyTorch a user would write for a distinct mix per row
   of one batch: one hook per steered layer adding ``(W @ V_l)[:, None]`` in place (``W``
   ``[B, K]`` the rows' weights, ``V_l`` ``[K, D]`` the layer's vectors), with the same
   projection reads as (1).
3. The published ``steering-vectors`` library (``pip install --no-deps steering-vectors``; it
   pins transformers<5 but works with 5.x, and imports scikit-learn), through
   ``SteeringVector(...).apply(model)`` (:func:`steering_vectors_patch`).

Tested in ``tests/benchmarks/test_generate.py`` (the hooks against emokern's logits).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from emokern.models import decoder_layers

__all__ = ["NaiveSteering", "PerRowSteering", "mix_rows", "parity_on_default_model",
           "shared_deltas", "steering_vectors_available", "steering_vectors_patch",
           "steering_vectors_version"]


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


def mix_rows(names: Sequence[str], mixes: Sequence[Mapping[str, float]]) -> torch.Tensor:
    """The weights ``W`` ``[B, K]`` (float32) of one mix per row: ``W[b, k] = mixes[b][names[k]]``
    (0 where a mix leaves an emotion out). An emotion not in ``names`` is a ValueError."""
    rows = []
    for b, mix in enumerate(mixes):
        unknown = set(mix) - set(names)
        if unknown:
            raise ValueError(f"mix_rows: mixes[{b}] names {sorted(unknown)}, not in {list(names)}")
        rows.append([float(mix.get(name, 0.0)) for name in names])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(names))


def _read_hidden(hidden: torch.Tensor, directions: torch.Tensor | None,
                 readings: list[torch.Tensor]) -> None:
    """The baselines' monitor: projections ``hidden @ directions.T`` ``[B, T, K]`` appended."""
    if directions is not None:
        readings.append((hidden.float() @ directions.T).detach())


def _unit_directions(directions, device) -> dict[int, torch.Tensor] | None:
    if directions is None:
        return None
    return {layer: (v.float() / v.float().norm(dim=-1, keepdim=True)).to(device)
            for layer, v in directions.items()}


class _LayerHooks:
    """A context manager that registers ``self._hook(l)`` as a forward hook on decoder layer
    ``l`` for every key ``l`` of ``self.readings`` on entry and removes them on exit."""

    layers: nn.ModuleList
    readings: dict[int, list[torch.Tensor]]
    _handles: list

    def _hook(self, layer: int):
        raise NotImplementedError

    def __enter__(self):
        for layer in self.readings:
            self._handles.append(self.layers[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NaiveSteering(_LayerHooks):
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
        self.directions = _unit_directions(directions, device)
        self.readings: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.deltas}
        self._handles: list = []

    def _hook(self, layer: int):
        delta = self.deltas[layer]
        directions = None if self.directions is None else self.directions[layer]
        readings = self.readings[layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            _read_hidden(hidden, directions, readings)
            steered = hidden + delta
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook


class PerRowSteering(_LayerHooks):
    """A distinct mix per row with plain forward hooks: what a user would write by hand.

    One forward hook per steered decoder layer ``l`` adds each row's own offset to every
    position of that row, in place::

        hidden[b, t] += s · Σ_k W[b, k] · V_l[k]        i.e.  hidden.add_((W @ (s · V_l))[:, None])

    with ``s = 1 / len(vectors)`` for ``spread="divide"`` (emokern's default) or 1 for
    ``"each"``, the same units as :func:`emokern.steer`. Like :class:`NaiveSteering` it first
    appends the projections ``hidden @ unit(V_l).T`` ``[B, T, K]`` of the layer output to
    ``readings[l]`` (when ``read``), and it steers padding too.

    Parameters
    ----------
    model : transformers model
    weights : Tensor [B, K]
        Each row's weights in the bank's units (:func:`mix_rows`); the batch must have ``B``
        rows.
    vectors : dict int -> Tensor [K, D]
        The emotion vectors of each steered layer (``bank.layer_vectors(l)``).
    read : bool
        Keep the projection readings.
    spread : "divide" | "each"
    """

    def __init__(self, model: nn.Module, weights: torch.Tensor,
                 vectors: Mapping[int, torch.Tensor], *, read: bool = True,
                 spread: str = "divide") -> None:
        if spread not in ("divide", "each"):
            raise ValueError(f"PerRowSteering: spread must be 'divide' or 'each', got {spread!r}")
        if weights.dim() != 2 or any(v.dim() != 2 or v.shape[0] != weights.shape[1]
                                     for v in vectors.values()):
            raise ValueError(f"PerRowSteering: weights must be [B, K] and every layer's vectors "
                             f"[K, D]; got weights {tuple(weights.shape)}, vectors "
                             f"{[tuple(v.shape) for v in vectors.values()]}")
        self.model = model
        self.layers = decoder_layers(model)
        parameter = next(model.parameters())
        scale = 1.0 / len(vectors) if spread == "divide" else 1.0
        self.weights = weights.to(device=parameter.device, dtype=torch.float32)
        self.vectors = {layer: (v.float() * scale).to(parameter.device)
                        for layer, v in vectors.items()}
        self.directions = _unit_directions(vectors, parameter.device) if read else None
        self.readings: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.vectors}
        self._handles: list = []

    def _hook(self, layer: int):
        weights, vectors = self.weights, self.vectors[layer]
        directions = None if self.directions is None else self.directions[layer]
        readings = self.readings[layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[0] != weights.shape[0]:
                raise ValueError(f"PerRowSteering: a batch of {hidden.shape[0]} rows, but "
                                 f"weights for {weights.shape[0]}")
            _read_hidden(hidden, directions, readings)
            hidden.add_((weights @ vectors).to(hidden.dtype)[:, None])
            return output

        return hook


def steering_vectors_available() -> bool:
    """Whether the published ``steering-vectors`` library is installed (then it must import).

    Only its absence reads as "not available": an installed copy whose import fails (a missing
    dependency of its own, an incompatible transformers) raises, so the comparison with it
    cannot be skipped silently by a breakage.
    """
    try:
        import steering_vectors  # noqa: F401  (optional: installed --no-deps for comparisons)
    except ModuleNotFoundError as exc:
        if exc.name != "steering_vectors":  # installed, but something it imports is missing
            raise
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


def parity_on_default_model() -> dict[str, float]:
    """Check, on the default model, that the naive hooks (and ``steering-vectors`` when
    installed) give emokern's logits for one shared mix (``python bench/hook_parity.py``).

    Returns
    -------
    dict
        ``naive`` (and ``steering_vectors``): the largest ``|fused - baseline|`` over the real
        tokens; ``moved``: the largest ``|fused - unsteered|``, the scale they compare to.
    """
    # Imported on use: the workload loads the benchmark bank, steering runs the fused op.
    from emokern.benchmarks.workload import PROMPTS, benchmark_bank, middle_layers
    from emokern.models import load_model
    from emokern.steering import steer
    from emokern.tokens import encode_prompts

    model, tokenizer = load_model("default")
    bank, source = benchmark_bank(model, tokenizer)
    layers = middle_layers(bank, 10)
    mix = {bank.names[0]: 2.0 * bank.default_weight}
    encoded = encode_prompts(tokenizer, list(PROMPTS[:4]))
    with torch.inference_mode():
        with steer(model, bank, [mix] * 4, layers=layers, positions="all"):
            fused = model(**encoded).logits
        with NaiveSteering(model, shared_deltas(bank, mix, layers)):
            naive = model(**encoded).logits
        plain = model(**encoded).logits
    real = encoded["attention_mask"].bool()
    out = {"naive": float((fused - naive)[real].abs().max()),
           "moved": float((fused - plain)[real].abs().max())}
    print(f"bank: {source}; layers {layers}; mix {mix}")
    print(f"max |fused - naive| over real tokens: {out['naive']:.2e} "
          f"(steering moved the logits by up to {out['moved']:.2f})")
    if steering_vectors_available():
        deltas = shared_deltas(bank, mix, layers)
        with torch.inference_mode(), steering_vectors_patch(model, deltas):
            library = model(**encoded).logits
        out["steering_vectors"] = float((fused - library)[real].abs().max())
        print(f"max |fused - steering-vectors|: {out['steering_vectors']:.2e}")
    return out
