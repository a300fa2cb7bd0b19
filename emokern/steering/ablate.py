r"""Neuron ablation: scale chosen MLP intermediate neurons of a Hugging Face model.

``with emokern.ablate(model, neurons={layer: [ids]}, scale=0.0): model(...)`` multiplies the
listed intermediate neurons of each listed decoder layer's MLP by ``scale`` during every
forward (0 zeroes them), with the fused op ``emokern::scale_neurons_``.

Where: the MLP's intermediate activation is the input of its down projection, so the op runs
in a forward **pre-hook on the down projection**, in place on that input:

==================  ==========================  ==========================================
family              module                      its input (the ``F`` neurons)
==================  ==========================  ==========================================
Llama-like          ``layer.mlp.down_proj``     ``act_fn(gate_proj(x)) * up_proj(x)``
(SmolLM2, Llama, Qwen2, Mistral, Gemma)
GPT-2               ``layer.mlp.c_proj``        ``act(c_fc(x))``
GPT-NeoX / Pythia   ``layer.mlp.dense_4h_to_h`` ``act(dense_h_to_4h(x))``
OPT                 ``layer.fc2``               ``act(fc1(x))``
==================  ==========================  ==========================================

Any other layout is one clear ``ValueError`` at install, before any hook is placed.

Hot path: the index tensors are built once at install on each layer's device and the backend
is resolved once; a hook is one op call on the activation, with no allocation and no host sync,
so ablated models work under ``torch.compile`` and CUDA graphs. An empty neuron set leaves
every output bit-identical (the op touches nothing). Ablation modifies activations in place
and is for inference: a forward that records gradients is a clear error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from emokern.errors import failing
from emokern.models import decoder_layers
from emokern.ops import resolve_backend, runner_for

__all__ = ["MLP_LAYOUTS", "Ablator", "ablate", "mlp_down_projections"]

#: ``(attribute path below a decoder layer, family)``: the MLP's down projection, whose input
#: is the intermediate activation.
MLP_LAYOUTS = (("mlp.down_proj", "Llama-like"), ("mlp.c_proj", "GPT-2"),
               ("mlp.dense_4h_to_h", "GPT-NeoX"), ("fc2", "OPT"))


_fail = failing("emokern.ablate")


def _input_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    weight = getattr(module, "weight", None)  # transformers' GPT-2 Conv1D: weight [in, out]
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
            and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def mlp_down_projections(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """Each decoder layer's MLP down projection and its number of intermediate neurons ``F``.

    Returns
    -------
    list of (module, F), one per decoder layer

    Raises
    ------
    ValueError
        When a layer has none of the layouts of :data:`MLP_LAYOUTS` (named in the message).
    """
    out = []
    for index, layer in enumerate(decoder_layers(model)):
        found = None
        for path, _ in MLP_LAYOUTS:
            obj = layer
            for attr in path.split("."):
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            features = _input_features(obj) if isinstance(obj, nn.Module) else None
            if features is not None:
                found = (obj, features)
                break
        if found is None:
            known = ", ".join(f"layer.{p} ({family})" for p, family in MLP_LAYOUTS)
            _fail(ValueError, f"the MLP layout of {type(model).__name__} (decoder layer {index}, "
                              f"a {type(layer).__name__}) is not recognised: looked for a "
                              f"Linear/Conv1D down projection at {known}")
        out.append(found)
    return out


def _check_neurons(neurons, projections) -> dict[int, list[int]]:
    if not isinstance(neurons, Mapping):
        _fail(TypeError, f"neurons must be a mapping {{layer: [neuron ids]}}, got "
                         f"{type(neurons).__name__}")
    n_layers = len(projections)
    out: dict[int, list[int]] = {}
    for layer, ids in neurons.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) \
                or not 0 <= int(layer) < n_layers:
            _fail(ValueError, f"neurons has layer {layer!r}; the model's decoder layers are "
                              f"0..{n_layers - 1}")
        features = projections[int(layer)][1]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            _fail(TypeError, f"neurons[{layer}] must be a list of neuron ids, got "
                             f"{type(ids).__name__}")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) \
                    or not 0 <= int(i) < features:
                _fail(ValueError, f"neurons[{layer}] has id {i!r}; layer {layer}'s MLP has "
                                  f"{features} intermediate neurons (ids 0..{features - 1})")
        if len(set(int(i) for i in ids)) != len(ids):
            _fail(ValueError, f"neurons[{layer}] lists a neuron twice")
        if int(layer) in out:
            _fail(ValueError, f"neurons lists layer {int(layer)} twice")
        out[int(layer)] = sorted(int(i) for i in ids)
    return out


class Ablator:
    """Scaled MLP neurons of a transformers model; see :func:`ablate`."""

    def __init__(self, model: nn.Module, neurons: Mapping[int, Sequence[int]], *,
                 scale: float = 0.0, backend: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            _fail(TypeError, f"model must be a torch.nn.Module, got {type(model).__name__}")
        projections = mlp_down_projections(model)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
                or not math.isfinite(float(scale)):
            _fail(ValueError, f"scale must be a finite float, got {scale!r}")
        self.neurons = _check_neurons(neurons, projections)
        self.scale = float(scale)
        self.model = model
        self._modules = {layer: projections[layer][0] for layer in self.neurons}
        fallback = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._index: dict[int, torch.Tensor] = {}
        self._runners = {}
        for layer, module in self._modules.items():
            device = next((p.device for p in module.parameters()), fallback)
            self._index[layer] = torch.tensor(self.neurons[layer], dtype=torch.int64,
                                              device=device)
            if device not in self._runners:
                self._runners[device] = runner_for(
                    resolve_backend(backend, device, "scale_neurons_"), "scale_neurons_")
        self._handles: list = []

    @property
    def num_neurons(self) -> int:
        """How many neurons are scaled, over all layers."""
        return sum(len(ids) for ids in self.neurons.values())

    def install(self) -> Ablator:
        """Place the hooks (idempotent)."""
        if self._handles:
            return self
        for layer, module in self._modules.items():
            index = self._index[layer]
            run = self._runners[index.device]
            self._handles.append(module.register_forward_pre_hook(self._hook(run, index)))
        return self

    def _hook(self, run, index: torch.Tensor):
        scale = self.scale

        def pre_hook(module, args):
            act = args[0]
            if act.requires_grad and torch.is_grad_enabled():
                _fail(RuntimeError, "ablation scales activations in place and is for "
                                    "inference: run the forward under torch.no_grad() or "
                                    "torch.inference_mode()")
            run(act, index, scale)
            return None

        return pre_hook

    def remove(self) -> None:
        """Remove the hooks: the model computes as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Ablator:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def ablate(model: nn.Module, neurons: Mapping[int, Sequence[int]], *, scale: float = 0.0,
           backend: str | None = None) -> Ablator:
    r"""Scale chosen MLP intermediate neurons of ``model`` while the context is open.

    For each listed decoder layer :math:`l` and neuron :math:`j` in ``neurons[l]``, the MLP's
    intermediate activation :math:`a_{l,j}` (input of the down projection) becomes
    :math:`s \cdot a_{l,j}` at every token of every forward.

    Parameters
    ----------
    model : transformers causal LM
        Llama-like, GPT-2, GPT-NeoX or OPT layout (see the module docstring).
    neurons : mapping int -> sequence of int
        ``{decoder layer: [neuron ids]}``; ids distinct, in ``[0, F)``. Empty lists are fine.
    scale : float
        :math:`s`, finite; 0 ablates.
    backend : {"reference", "cpu", "triton"}, optional
        Force a backend of the op (default: the best one for each layer's device).

    Returns
    -------
    Ablator
        A context manager (``with ablate(...) as a:``); ``install()`` / ``remove()`` also work.

    Raises
    ------
    TypeError, ValueError
        Naming the bad argument (or the unrecognised MLP layout), before any hook is placed.

    Examples
    --------
    >>> with emokern.ablate(model, neurons={3: [10, 200], 7: [5]}):
    ...     logits = model(**enc).logits
    """
    return Ablator(model, neurons, scale=scale, backend=backend)
