"""The vLLM benchmark's baseline: the plugin's per-request sums done by a plain-PyTorch forward
hook instead of the packed op — the way one would write it without a fused op.

For each steered decoder layer, a forward hook on its output ``(hidden, residual)`` adds each
token's gathered mix, ``hidden += W[slot(t)] @ V`` (``W = slot_weights[l] [S, K]``, ``V [K,
D]``, ``slot(t) = token_slot[t]``, no steering where ``slot(t) < 0``) and, with readings on,
accumulates the projections ``<x, v_k> / ||v_k||`` of ``x = hidden + residual`` per slot with
``index_add_`` (``run_sum``, ``run_count``). No norm preservation, no ``last`` readings. A
Python hook with data-dependent indexing: the engine runs with ``enforce_eager=True``.

It takes the op's place in an engine that enables the plugin, through vLLM's documented
worker extension (``worker_extension_cls``, methods reached with ``collective_rpc``)::

    llm = LLM(model=PATH, enforce_eager=True, additional_config={"emokern": {...}},
              worker_extension_cls="emokern.benchmarks.vllm_hook.HookExtension")
    llm.collective_rpc("emokern_use_hook")  # before the first generate

The plugin keeps the slots, the token → slot index and the readings
(:meth:`emokern.vllm.runner.EngineSteering.unwrap_layers`); only the layer arithmetic changes.
Used by ``bench/bench_vllm.py``; tested in ``tests/benchmarks/test_vllm_hook.py``.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["EXTENSION", "HookExtension", "install_hook", "torch_hook"]

#: The ``worker_extension_cls`` value that adds :class:`HookExtension` to vLLM's workers.
EXTENSION = "emokern.benchmarks.vllm_hook.HookExtension"

log = logging.getLogger("vllm.emokern")


def torch_hook(vectors: torch.Tensor, table, i: int, monitor: bool):
    """The forward hook of steered layer ``i`` (see the module docstring).

    Parameters
    ----------
    vectors : Tensor [K, D] float32
        The layer's emotion vectors.
    table : emokern.vllm.slots.SlotTable
        The engine's slots (``slot_weights[i] [S, K]``, ``token_slot [N_max]``, running sums).
    i : int
        The layer's index among the steered layers.
    monitor : bool
        Accumulate readings.
    """
    units = (vectors / vectors.norm(dim=1, keepdim=True)).T.contiguous()  # [D, K]

    def hook(module, args, output):
        hidden, residual = output
        n = hidden.shape[0]
        slot = table.token_slot[:n].long()
        steered = slot >= 0
        index = slot.clamp_min(0)
        if monitor:
            proj = (hidden + residual) @ units  # [N, K]
            table.run_sum[i].index_add_(0, index, proj * steered[:, None])
            table.run_count[i].index_add_(0, index, steered.long())
        hidden += (table.slot_weights[i][index] * steered[:, None]) @ vectors
        return hidden, residual

    return hook


def install_hook(steering) -> int:
    """Replace the packed op of an :class:`~emokern.vllm.runner.EngineSteering` by
    :func:`torch_hook` on each steered layer; returns the number of layers hooked."""
    layers = steering.unwrap_layers()
    for i, (module, vectors) in enumerate(layers):
        module.register_forward_hook(torch_hook(vectors, steering.table, i,
                                                steering.config.monitor))
    return len(layers)


class HookExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls`` (:data:`EXTENSION`)."""

    def emokern_use_hook(self) -> int:
        """Hook this worker's steered layers (``collective_rpc("emokern_use_hook")``)."""
        from emokern.vllm.plugin import steering_of

        steering = steering_of(getattr(self, "model_runner", None))
        if steering is None:
            raise RuntimeError("emokern_use_hook: this engine does not enable emokern "
                               "(additional_config={'emokern': {...}})")
        count = install_hook(steering)
        log.info("emokern.vllm: plain-PyTorch hook on %d layers (benchmark baseline, eager)",
                 count)
        return count
