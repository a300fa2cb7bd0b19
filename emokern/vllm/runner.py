"""What the plugin does inside a vLLM worker: wrap the steered decoder layers, keep the slots,
fill each step's token → slot index.

One :class:`EngineSteering` per model runner (made after the model loads, before vLLM compiles
it). The wrapped decoder layer calls the packed op on its output ``(hidden, residual)``, whose
sum is the residual stream at the output of that layer (vLLM's Llama defers the residual add
to the next layer's fused add-norm), so the op steers exactly the state the Hugging Face path
steers (``docs/design.md`` §3: layer ``l`` = the output of decoder layer ``l``). The op and
its persistent buffers are traced into vLLM's compiled graph; between steps only the buffers'
contents change (:class:`~emokern.vllm.slots.SlotTable`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from emokern.ops import build
from emokern.vllm.config import EmokernConfig, request_mix
from emokern.vllm.slots import SlotTable

__all__ = ["EngineSteering", "packed_op"]

# A child of vLLM's logger, so the line shows with vLLM's own logging settings.
log = logging.getLogger("vllm.emokern")


def packed_op():
    """``torch.ops.emokern.steer_packed_`` (importing :mod:`emokern.ops` defines it); loads the
    compiled CPU kernel when it is ready without compiling, else the reference kernel runs."""
    if build.cpu_ready():
        build.load_cpu()
    return torch.ops.emokern.steer_packed_.default


def _decoder_layers(model) -> tuple[torch.nn.ModuleList, int]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or "Llama" not in type(model).__name__:
        raise ValueError(f"emokern.vllm: steering needs a Llama-family model (LlamaForCausalLM "
                         f"and its relatives); got {type(model).__name__}")
    return layers, getattr(inner, "start_layer", 0)


class EngineSteering:
    """The steering state of one vLLM model runner.

    Parameters
    ----------
    model : torch.nn.Module
        vLLM's ``LlamaForCausalLM`` (or a subclass), before compilation.
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
        self.layers = config.resolve_layers(bank, n_layers)
        scale = 1.0 / len(self.layers) if config.spread == "divide" else 1.0
        self.table = SlotTable(len(self.layers), len(self.names), max_requests, max_tokens,
                               scale=scale)
        op = packed_op()
        for i, layer in enumerate(self.layers):
            vectors = bank.layer_vectors(layer).to(torch.float32).contiguous()
            self._wrap(layers[layer - start], op, vectors, i)
        log.info("emokern.vllm: steering layers %s, emotions %s", list(self.layers),
                 list(self.names))

    def _wrap(self, module, op, vectors: torch.Tensor, i: int) -> None:
        table, norm_preserving = self.table, self.config.norm_preserving
        if self.config.monitor:
            running = (table.run_sum[i], table.run_count[i], table.run_last[i])
        else:
            running = (None, None, None)
        inner = module.forward

        def forward(positions, hidden_states, residual):
            hidden_states, residual = inner(positions, hidden_states, residual)
            op(hidden_states, residual, vectors, table.slot_weights, table.token_slot,
               norm_preserving, None, *running)
            return hidden_states, residual

        module.forward = forward

    # --------------------------------------------------------------- scheduler events

    def on_update(self, scheduler_output) -> None:
        """Before the runner updates its batch: free the slots of finished requests (keeping
        their readings) and restart preempted ones that resume (their recomputed tokens are
        counted again from zero)."""
        for req_id in scheduler_output.finished_req_ids:
            self.table.release(req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in getattr(cached, "resumed_req_ids", ()) or ():
            self.table.release(req_id, keep=False)

    def before_forward(self, runner, num_scheduled: np.ndarray) -> None:
        """After ``_prepare_inputs``: register new requests, write ``token_slot``."""
        batch = runner.input_batch
        req_ids = batch.req_ids[:batch.num_reqs]
        for req_id in req_ids:
            if not self.table.known(req_id):
                params = runner.requests[req_id].sampling_params
                extra = getattr(params, "extra_args", None) if params is not None else None
                self.table.add(req_id, request_mix(extra, self.names))
        self.table.fill(req_ids, num_scheduled, batch.num_computed_tokens_cpu,
                        batch.num_prompt_tokens)

    def readings(self, req_ids=None) -> dict:
        """Plain-Python readings (picklable across vLLM's processes); see
        :func:`emokern.vllm.readings`."""
        out = {}
        for req_id, r in self.table.readings(req_ids).items():
            out[req_id] = {"layers": list(self.layers), "names": list(self.names),
                           "mean": r["mean"].tolist(), "last": r["last"].tolist(),
                           "count": r["count"]}
        return out


def make(runner) -> EngineSteering | None:
    """The steering of ``runner`` (a vLLM GPU/CPU model runner) per its
    ``additional_config``, or None when the engine does not enable emokern."""
    config = EmokernConfig.from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return None
    sched = runner.vllm_config.scheduler_config
    max_requests = config.max_requests or 2 * sched.max_num_seqs
    return EngineSteering(runner.model, config, max_requests=max_requests,
                          max_tokens=sched.max_num_batched_tokens)
