"""Measurement (c) of the generate benchmark: a sweep of emotions × weights × prompts.

6 emotions × 7 weights (:data:`SWEEP_WEIGHTS` × the bank's recommended weight) × 8 prompts =
336 sequences of ``new_tokens`` greedy tokens each (fixed length: ``min_new_tokens =
max_new_tokens``, so both sides decode the same number of steps): emokern in
``ceil(336 / max_batch)`` batched ``generate`` calls (:func:`sweep_emokern`) vs the baseline's
loop over the 42 conditions, one batch of 8 prompts each (:func:`sweep_loop`: the ratio
mostly measures batching), and against the per-row hook a user would write for the same job
(:class:`~emokern.benchmarks.hook_baselines.PerRowSteering`, one offset per row) in batches of
the same size as emokern's (:func:`sweep_per_row`: the ratio measures the kernel and the
readings, not the batching). Wall-clock ratios (split into prefill and decode), plus how many
rows produced identical tokens.

The default ``max_batch`` of the benchmark is 168 (2 calls), not 336: memory allows one call,
but on a CPU the prefill of 336 prompts at once runs out of cache and is slower per token than
in smaller batches (measured on the default model, 2 threads: 336 rows in 1 call 43–45 s, 168
in 2 calls 34.5 s, 112 in 3 calls 34 s).

Tested in ``tests/benchmarks/test_generate.py`` (a two-condition sweep).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from emokern.benchmarks.hook_baselines import (
    NaiveSteering,
    PerRowSteering,
    mix_rows,
    shared_deltas,
    steering_vectors_patch,
)
from emokern.benchmarks.workload import PROMPTS
from emokern.ops import resolve_backend
from emokern.steering import steer
from emokern.tokens import encode_prompts, model_device

__all__ = ["SWEEP_WEIGHTS", "generate_options", "sweep", "sweep_conditions", "sweep_emokern",
           "sweep_loop", "sweep_per_row", "timed_generate", "warm_up"]

SWEEP_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)


def sweep_conditions(bank) -> list[dict[str, float]]:
    """The 42 conditions: each emotion at each of :data:`SWEEP_WEIGHTS` × the bank's default
    weight."""
    unit = bank.default_weight
    return [{name: weight * unit} for name in bank.names for weight in SWEEP_WEIGHTS]


def generate_options(tokenizer, new_tokens: int) -> dict[str, Any]:
    """``model.generate`` options for exactly ``new_tokens`` greedy tokens per row."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
            "temperature": None, "top_p": None, "top_k": None,
            "pad_token_id": tokenizer.pad_token_id}


class _FirstLogits(LogitsProcessor):
    """Notes the time the first logits arrive (the end of the prefill forward)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def timed_generate(model, encoded, options) -> tuple[torch.Tensor, float, float]:
    """``model.generate`` split into prefill and decode seconds: a logits processor notes the
    time the first logits arrive (the end of the prefill forward)."""
    clock = _FirstLogits()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**encoded, **options, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
    return out, clock.first - start, end - clock.first


def sweep_emokern(model, tokenizer, bank, layers, *, new_tokens: int, max_batch: int):
    """All 336 sequences through emokern in ``ceil(336 / max_batch)`` generate calls.

    Returns the generated tokens per row, the number of calls and the seconds spent in the
    prefill and decode phases of ``generate``.
    """
    device = model_device(model)
    rows = [(mix, prompt) for mix in sweep_conditions(bank) for prompt in PROMPTS]
    outputs, calls, prefill, decode = [], 0, 0.0, 0.0
    for start in range(0, len(rows), max_batch):
        chunk = rows[start:start + max_batch]
        encoded = encode_prompts(tokenizer, [p for _, p in chunk], device=device)
        with steer(model, bank, [m for m, _ in chunk], layers=list(layers), monitor=True) as s:
            out, pre, dec = timed_generate(model, encoded, generate_options(tokenizer,
                                                                            new_tokens))
        s.monitor.mean()
        outputs += list(out[:, encoded["input_ids"].shape[1]:].cpu())
        calls, prefill, decode = calls + 1, prefill + pre, decode + dec
    return outputs, calls, prefill, decode


def sweep_per_row(model, tokenizer, bank, layers, *, new_tokens: int, max_batch: int):
    """All 336 sequences in the same ``generate`` calls as :func:`sweep_emokern`, steered by
    plain per-row forward hooks (:class:`PerRowSteering`, with its projection readings).

    Returns the generated tokens per row and the prefill and decode seconds.
    """
    device = model_device(model)
    rows = [(mix, prompt) for mix in sweep_conditions(bank) for prompt in PROMPTS]
    vectors = {layer: bank.layer_vectors(layer).to(device) for layer in layers}
    outputs, prefill, decode = [], 0.0, 0.0
    for start in range(0, len(rows), max_batch):
        chunk = rows[start:start + max_batch]
        encoded = encode_prompts(tokenizer, [p for _, p in chunk], device=device)
        with PerRowSteering(model, mix_rows(bank.names, [m for m, _ in chunk]).to(device),
                            vectors):
            out, pre, dec = timed_generate(model, encoded, generate_options(tokenizer,
                                                                            new_tokens))
        outputs += list(out[:, encoded["input_ids"].shape[1]:].cpu())
        prefill, decode = prefill + pre, decode + dec
    return outputs, prefill, decode


def sweep_loop(model, tokenizer, bank, layers, *, new_tokens: int, patch):
    """The baseline: one batch of the 8 prompts per condition, ``patch(deltas)`` around it.

    Returns the generated tokens per row and the prefill and decode seconds.
    """
    encoded = encode_prompts(tokenizer, list(PROMPTS), device=model_device(model))
    outputs, prefill, decode = [], 0.0, 0.0
    for mix in sweep_conditions(bank):
        deltas = shared_deltas(bank, mix, layers)
        with patch(deltas):
            out, pre, dec = timed_generate(model, encoded, generate_options(tokenizer,
                                                                            new_tokens))
        outputs += list(out[:, encoded["input_ids"].shape[1]:].cpu())
        prefill, decode = prefill + pre, decode + dec
    return outputs, prefill, decode


def warm_up(model, tokenizer, bank, layers) -> None:
    """Load the compiled kernel and run each path once, so no timing includes first-call costs
    (JIT build or load of the extension, lazy initialisations in transformers)."""
    device = model_device(model)
    resolve_backend(None, device)
    encoded = encode_prompts(tokenizer, list(PROMPTS[:2]), device=device)
    mix = {bank.names[0]: bank.default_weight}
    options = generate_options(tokenizer, 2)
    with torch.inference_mode():
        model.generate(**encoded, **options)
        with steer(model, bank, [mix, {}], layers=list(layers)):
            model.generate(**encoded, **options)
        with NaiveSteering(model, shared_deltas(bank, mix, layers)):
            model.generate(**encoded, **options)


def sweep(model, tokenizer, bank, layers, *, new_tokens: int, max_batch: int,
          include_steering_vectors: bool, log=print,
          tokens: dict[str, list[torch.Tensor]] | None = None) -> dict[str, Any]:
    """Measurement (c); see the module docstring.

    ``tokens``, when given, receives each system's generated tokens (``"emokern"``,
    ``"naive"``, ...: one ``[new_tokens]`` tensor per row, in the order of
    :func:`sweep_conditions` × prompts), for comparisons with other engines.

    Returns
    -------
    dict
        The sweep's size, each system's wall, prefill and decode seconds, emokern's speed-ups
        over each loop and the number of token-identical rows.
    """
    directions = {layer: bank.layer_vectors(layer) for layer in layers}
    warm_up(model, tokenizer, bank, layers)
    result: dict[str, Any] = {"sequences": len(sweep_conditions(bank)) * len(PROMPTS),
                              "conditions": len(sweep_conditions(bank)),
                              "prompts": len(PROMPTS), "new_tokens": new_tokens,
                              # The result keys of the committed results (bench/results).
                              "weights_x_alpha": list(SWEEP_WEIGHTS),
                              "alpha": bank.default_weight, "max_batch": max_batch}
    start = time.perf_counter()
    fused, calls, prefill, decode = sweep_emokern(model, tokenizer, bank, layers,
                                                  new_tokens=new_tokens, max_batch=max_batch)
    result["emokern_s"] = time.perf_counter() - start
    result["emokern_prefill_s"], result["emokern_decode_s"] = prefill, decode
    result["emokern_generate_calls"] = calls
    if tokens is not None:
        tokens["emokern"] = fused
    log(f"  sweep emokern: {result['emokern_s']:.1f} s in {calls} generate call(s) "
        f"(prefill {prefill:.1f} s, decode {decode:.1f} s)")
    def loop(patch):
        return lambda: sweep_loop(model, tokenizer, bank, layers, new_tokens=new_tokens,
                                  patch=patch)

    others = [("per_row", lambda: sweep_per_row(model, tokenizer, bank, layers,
                                                new_tokens=new_tokens, max_batch=max_batch)),
              ("naive", loop(lambda d: NaiveSteering(model, d, directions)))]
    if include_steering_vectors:
        others.append(("steering_vectors", loop(lambda d: steering_vectors_patch(model, d))))
    for name, run in others:
        start = time.perf_counter()
        rows, prefill, decode = run()
        result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_prefill_s"], result[f"{name}_decode_s"] = prefill, decode
        if tokens is not None:
            tokens[name] = rows
        result[f"speedup_vs_{name}"] = result[f"{name}_s"] / result["emokern_s"]
        result[f"decode_speedup_vs_{name}"] = decode / result["emokern_decode_s"]
        result[f"prefill_speedup_vs_{name}"] = prefill / result["emokern_prefill_s"]
        result[f"identical_rows_vs_{name}"] = sum(torch.equal(a, b) for a, b in
                                                  zip(fused, rows, strict=True))
        log(f"  sweep {name}: {result[f'{name}_s']:.1f} s (prefill {prefill:.1f} s, decode "
            f"{decode:.1f} s) -> emokern {result[f'speedup_vs_{name}']:.2f}x faster "
            f"(decode {result[f'decode_speedup_vs_{name}']:.2f}x); "
            f"{result[f'identical_rows_vs_{name}']}/{len(fused)} rows token-identical")
    result["naive_generate_calls"] = result["conditions"]
    result["per_row_generate_calls"] = calls
    return result
