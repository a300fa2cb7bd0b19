"""What the plugin does inside a vLLM worker: wrap the steered decoder layers, keep the slots,
fill each step's token → slot index.

One :class:`EngineSteering` per model runner (made after the model loads, before vLLM compiles
it). The wrapped decoder layer calls the packed op on its output ``(hidden, residual)``, whose
sum is the residual stream at the output of that layer (vLLM's Llama defers the residual add
to the next layer's fused add-norm), so the op steers exactly the state the Hugging Face path
steers (``docs/design.md`` §3: layer ``l`` = the output of decoder layer ``l``). The op and
its persistent buffers are traced into vLLM's compiled graph; between steps only the buffers'
contents change (:class:`~emokern.vllm.slots.SlotTable`). What it reads of vLLM's model runner
comes through :mod:`emokern.vllm.internals`.

Tested in ``tests/vllm/test_engine.py`` and ``tests/vllm/test_layouts.py`` (need vLLM).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from emokern.ops import resolve_backend, runner_for, unit_gram
from emokern.vllm import internals
from emokern.vllm.config import EmokernConfig, check_presets, mix_edits
from emokern.vllm.slots import SlotTable

__all__ = ["EngineSteering", "packed_op"]

# A child of vLLM's logger, so the line shows with vLLM's own logging settings.
log = logging.getLogger("vllm.emokern")


def packed_op(device: torch.device) -> tuple[Callable[..., None], str]:
    """The callable the wrapped layers run, and its backend: the packed op on ``device``.

    Normally the dispatcher entry ``torch.ops.emokern.steer_packed_``, so that vLLM's compiler
    traces one op (with its fake kernel) into the graph; resolving the backend first makes that
    entry run the fastest kernel (it loads the compiled CPU kernel, compiling it once into the
    shared extension cache when no build exists, or registers the Triton kernel as the op's
    CUDA kernel). A backend forced with ``EMOKERN_BACKEND`` runs through its own runner
    (:func:`emokern.ops.runner_for`), which fails clearly when that backend is unavailable.
    """
    backend = resolve_backend(None, device, "steer_packed_")
    if os.environ.get("EMOKERN_BACKEND"):
        return runner_for(backend, "steer_packed_"), backend
    return torch.ops.emokern.steer_packed_.default, backend


#: vLLM decoder-layer classes (and their subclasses: Mistral, Phi-3, ...) whose forward
#: returns ``(hidden, residual)`` with the residual stream = their sum: the layouts steered.
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Gemma3DecoderLayer")


def _decoder_layers(model) -> tuple[torch.nn.ModuleList, int]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not any(
            cls.__name__ in SUPPORTED_LAYERS for cls in type(layers[0]).__mro__):
        kind = type(layers[0]).__name__ if isinstance(layers, torch.nn.ModuleList) and len(
            layers) else "no model.layers"
        raise ValueError(f"emokern.vllm: steering supports vLLM models whose decoder layers are "
                         f"{', '.join(SUPPORTED_LAYERS)} or their subclasses (Llama, SmolLM2, "
                         f"Mistral, Qwen2, Gemma 3, ...); got {type(model).__name__} ({kind})")
    return layers, getattr(inner, "start_layer", 0)


class EngineSteering:
    """The steering state of one vLLM model runner.

    Parameters
    ----------
    model : torch.nn.Module
        A vLLM model whose decoder layers are one of :data:`SUPPORTED_LAYERS`, before
        compilation.
    config : EmokernConfig
    max_requests : int
        Steered requests alive at once.
    max_tokens : int
        vLLM's ``max_num_batched_tokens``.
    """

    def __init__(self, model, config: EmokernConfig, *, max_requests: int, max_tokens: int):
        layers, start = _decoder_layers(model)
        bank = config.load_bank()
        hidden = model.config.hidden_size if hasattr(model, "config") else None
        if hidden is not None and hidden != bank.dim:
            raise ValueError(f"emokern.vllm: the bank's vectors have D = {bank.dim} but the "
                             f"model's hidden size is {hidden}: a bank of another model?")
        n_layers = start + len(layers)
        self.config = config
        self.names = tuple(bank.names)
        self.steering = config.steering(bank, n_layers)
        self.layers = self.steering.layers
        # Neutral baseline of the steered layers (summary readings in standard scores; levels).
        self.neutral = bank.neutral_stats(list(self.layers)) if bank.calibrated else None
        if config.levels and self.neutral is None:
            raise ValueError("emokern.vllm: levels (additional_config['emokern']['levels']) "
                             "are standard scores against the bank's neutral baseline, and "
                             "this bank has none")
        device = next(model.parameters()).device  # buffers and vectors live beside the model
        self.table = SlotTable(len(self.layers), len(self.names), max_requests, max_tokens,
                               scale=self.steering.scale, device=device,
                               band=[layer in self.steering.band for layer in self.layers],
                               neutral=self.neutral if config.levels else None)
        op, self.backend = packed_op(device)
        #: ``(module, vectors [K, D])`` of each steered layer, in :attr:`layers` order.
        self.steered: list[tuple[torch.nn.Module, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            vectors = bank.layer_vectors(layer).to(device=device, dtype=torch.float32)
            self._wrap(layers[layer - start], op, vectors.contiguous(), i)
        log.info("emokern.vllm: steering layers %s, emotions %s (op backend on %s: %s)",
                 list(self.layers), list(self.names), device.type, self.backend)

    def _wrap(self, module, op, vectors: torch.Tensor, i: int) -> None:
        table, norm_preserving = self.table, self.steering.norm_preserving
        if self.steering.monitor is not None:
            running = (table.run_sum[i], table.run_count[i], table.run_last[i])
        else:
            running = (None, None, None)
        # Levels on: the slots' bounds at this layer and the Gram matrix of its directions
        # (computed once). Off: the op's call, and so the compiled graph, is the plain one.
        leveled = (table.bounds[i], unit_gram(vectors)) if table.levels else ()
        inner = module.forward

        def forward(*args, **kwargs):
            hidden_states, residual = inner(*args, **kwargs)
            op(hidden_states, residual, vectors, table.slot_weights[i], table.token_slot,
               norm_preserving, None, *running, *leveled)
            return hidden_states, residual

        module.forward = forward  # an instance attribute: unwrap_layers deletes it
        self.steered.append((module, vectors))

    def unwrap_layers(self) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        """Remove the op from the steered layers (their own forward again) and return
        :attr:`steered`: the way for another implementation of the same sums over the same
        :attr:`table` to take the op's place before the first forward (the benchmark's
        plain-PyTorch baseline, :mod:`emokern.benchmarks.vllm_hook`). Slots, token → slot
        index and readings stay the plugin's."""
        for module, _ in self.steered:
            if "forward" in vars(module):
                del module.forward
        return list(self.steered)

    # --------------------------------------------------------------- scheduler events

    def on_update(self, scheduler_output) -> None:
        """Before the runner updates its batch: free the slots of finished requests, keeping
        their readings. A preempted request keeps its slots: when it resumes, the tokens vLLM
        recomputes go to its replay slot (:class:`~emokern.vllm.slots.SlotTable`)."""
        for req_id in internals.finished_ids(scheduler_output):
            self.table.release(req_id)

    def before_forward(self, runner, num_scheduled: np.ndarray) -> None:
        """After ``_prepare_inputs``: register new requests, write ``token_slot``."""
        req_ids, num_computed, num_prompt = internals.batch_state(runner)
        for req_id in req_ids:
            if not self.table.known(req_id):
                edits = mix_edits(internals.request_extra_args(runner, req_id), self.names,
                                  self.steering)
                weights, z_bounds, scope = (None, None, None) if edits is None else edits
                self.table.add(req_id, weights, read=self.steering.monitor is not None,
                               running=req_ids, z_bounds=z_bounds, scope=scope)
        self.table.fill(req_ids, num_scheduled, num_computed, num_prompt)

    def readings(self, req_ids=None, family: bool = False) -> dict:
        """Plain-Python readings (picklable across vLLM's processes); see
        :func:`emokern.vllm.readings`. Empty when the engine keeps no readings."""
        if self.steering.monitor is None:
            return {}
        out = {}
        for req_id, r in self.table.readings(req_ids, family=family).items():
            mean = r["mean"]
            summary = mean if self.neutral is None else (mean - self.neutral[0]) / self.neutral[1]
            out[req_id] = {"layers": list(self.layers), "names": list(self.names),
                           "mean": _plain(mean), "last": _plain(r["last"]), "count": r["count"],
                           "prompt_mean": _plain(r["prompt_mean"]),
                           "prompt_count": r["prompt_count"],
                           "readings": dict(zip(self.names, _plain(summary.mean(0)), strict=True)),
                           "standardized": self.neutral is not None}
        return out


def _plain(values: torch.Tensor):
    """A tensor as nested lists, NaN as None (valid JSON)."""
    return [_plain(v) for v in values] if values.dim() else (
        None if values.isnan() else float(values))


def make(runner) -> EngineSteering | None:
    """The steering of ``runner`` (a vLLM GPU/CPU model runner) per its
    ``additional_config``, or None when the engine does not enable emokern."""
    additional, max_num_seqs, max_tokens = internals.engine_sizes(runner)
    config = EmokernConfig.from_additional_config(additional)
    if config is None:
        return None
    check_presets(config)  # a bad preset stops the engine at start, not its first request
    max_requests = config.max_requests or 2 * max_num_seqs
    if max_requests < max_num_seqs:
        raise ValueError(f"emokern.vllm: max_requests ({max_requests}) must be at least vLLM's "
                         f"max_num_seqs ({max_num_seqs}): every running request may need "
                         f"a slot")
    return EngineSteering(runner.model, config, max_requests=max_requests,
                          max_tokens=max_tokens)
