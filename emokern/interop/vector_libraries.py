"""Steering vectors from other Python libraries as emokern per-layer directions.

* **steering-vectors** (``SteeringVector``): ``layer_activations[l]`` is added to (and was
  measured at) the output of decoder block ``l`` when ``layer_type == "decoder_block"``:
  emokern's layer ``l``. Other layer types (attention, MLP, norms) act inside a block, where
  emokern does not steer, and are refused.
* **repeng** (``ControlVector``): ``directions[l]`` is measured at the output of decoder
  layer ``l`` (``hidden_states[l + 1]``; older releases read ``hidden_states[l]``, one layer
  earlier, as llama.cpp's generator does) and added there by its ``ControlModel`` (and
  written as llama.cpp's ``direction.l``): emokern's layer ``l``. Negative keys count from
  the end and need ``num_layers``.

Neither library is imported here: the objects are read by their attributes, so nothing needs
them installed. :func:`emokern.interop.llamacpp.bank_from_directions` turns the results into
a bank. Tested in ``tests/interop/test_vector_libraries.py``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import torch

from emokern.errors import failing

fail = failing("emokern.interop")

__all__ = ["from_repeng", "from_steering_vector"]


def _directions(raw, what: str, num_layers: int | None) -> dict[int, np.ndarray]:
    if not isinstance(raw, Mapping) or not raw:
        fail(ValueError, f"{what} must be a non-empty dict of layer -> vector, got {raw!r}")
    out: dict[int, np.ndarray] = {}
    for key, vector in raw.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            fail(TypeError, f"{what} has a non-integer layer key {key!r}")
        layer = int(key)
        if layer < 0:
            if num_layers is None:
                fail(ValueError, f"{what} has a negative layer {layer} (counted from the "
                                 f"end); pass num_layers to resolve it")
            layer += num_layers
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            fail(ValueError, f"{what}: layer {key} is outside a model of {num_layers} layers")
        if layer in out:
            fail(ValueError, f"{what} names layer {layer} twice (as {key} and another key)")
        if isinstance(vector, torch.Tensor):
            vector = vector.detach().to("cpu", torch.float32).numpy()
        array = np.asarray(vector, dtype=np.float32)
        if array.ndim != 1:
            fail(ValueError, f"{what}: layer {key}'s vector must be 1-D, got shape "
                             f"{list(array.shape)}")
        out[layer] = array.copy()
    return dict(sorted(out.items()))


def from_steering_vector(vector, *, num_layers: int | None = None) -> dict[int, np.ndarray]:
    """A steering-vectors ``SteeringVector`` as ``{emokern layer: vector [D] float32}``.

    Raises
    ------
    TypeError, ValueError
        Not a ``SteeringVector``-like object (no ``layer_activations``), a ``layer_type``
        other than ``"decoder_block"``, a non-1-D activation, a bad layer.
    """
    if not hasattr(vector, "layer_activations"):
        fail(TypeError, f"expected a steering_vectors.SteeringVector, got "
                        f"{type(vector).__name__}")
    layer_type = getattr(vector, "layer_type", "decoder_block")
    if layer_type != "decoder_block":
        fail(ValueError, f"a SteeringVector of layer_type {layer_type!r} acts inside a decoder "
                         f"block; emokern steers block outputs (layer_type 'decoder_block')")
    return _directions(vector.layer_activations, "SteeringVector.layer_activations",
                       num_layers)


def from_repeng(vector, *, num_layers: int | None = None) -> dict[int, np.ndarray]:
    """A repeng ``ControlVector`` as ``{emokern layer: vector [D] float32}`` (see the module
    docstring for the layer mapping).

    Raises
    ------
    TypeError, ValueError
        Not a ``ControlVector``-like object (no ``directions``), a negative layer without
        ``num_layers``, a non-1-D direction.
    """
    if not hasattr(vector, "directions"):
        fail(TypeError, f"expected a repeng.ControlVector, got {type(vector).__name__}")
    return _directions(vector.directions, "ControlVector.directions", num_layers)
