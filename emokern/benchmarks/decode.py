"""Measurements (a) and (b) of the generate benchmark: the decode step, steered vs unsteered.

(a) **decode overhead** — paired per-step A/B: on one KV-cache state (:class:`DecodeState`),
    time one decode forward of each arm (unsteered, emokern with a distinct mix per row and the
    monitor on, the naive baseline, the ``steering-vectors`` library when installed), crop the
    cache back (``DynamicCache.crop(-1)``) after each, and rotate the arms' order every round
    (:func:`paired_decode`). The ratio of a round is ``t_unsteered / t_arm`` (= steered
    tokens/s over unsteered tokens/s); the median over rounds is reported with its quartiles.
(b) **distinct vs shared mixes** at the largest batch, paired the same way
    (``t_shared / t_distinct``): emokern with one mix per row vs one mix for all rows; and the
    plain hooks, the per-row hook (:class:`~emokern.benchmarks.hook_baselines.PerRowSteering`,
    ``h.add_((W @ V)[:, None])``, the same distinct mixes) vs the naive hook adding one shared
    vector. Before timing, the per-row hook and emokern must give the same logits.

Tested in ``tests/benchmarks/test_generate.py`` (the generate benchmark's smoke test).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emokern.benchmarks.hook_baselines import (
    NaiveSteering,
    PerRowSteering,
    mix_rows,
    shared_deltas,
    steering_vectors_patch,
)
from emokern.benchmarks.workload import PROMPTS
from emokern.steering import steer
from emokern.tokens import encode_prompts, model_device

__all__ = ["DecodeState", "decode_overhead", "distinct_mixes", "paired_decode", "quantiles"]


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "q25", "q75", "n"}`` of ``values`` (all three equal for one value)."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": q[1], "q25": q[0], "q75": q[2], "n": len(ordered)}


def distinct_mixes(names: Sequence[str], batch: int, weight: float, seed: int) -> list[dict]:
    """``batch`` random mixes, each of two emotions with weights uniform in
    ``[-weight, 3 weight)``."""
    generator = torch.Generator().manual_seed(seed)
    mixes = []
    for _ in range(batch):
        chosen = torch.randperm(len(names), generator=generator)[:2].tolist()
        weights = (torch.rand(2, generator=generator) * 4 - 1) * weight
        mixes.append({names[k]: float(w) for k, w in zip(chosen, weights, strict=True)})
    return mixes


class DecodeState:
    """A batch after its prefill: the next input token, its attention mask and the cache.

    The batch is ``batch`` of :data:`~emokern.benchmarks.workload.PROMPTS` (cycled), chat
    formatted and left-padded; ``context`` is the padded prompt length.
    """

    def __init__(self, model: nn.Module, tokenizer, batch: int) -> None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        device = model_device(model)
        encoded = encode_prompts(tokenizer, prompts, device=device)
        with torch.inference_mode():
            out = model(**encoded, use_cache=True)
        self.model = model
        self.cache = out.past_key_values
        self.next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        ones = torch.ones(batch, 1, dtype=encoded["attention_mask"].dtype, device=device)
        self.attention_mask = torch.cat([encoded["attention_mask"], ones], dim=1)
        self.context = int(encoded["input_ids"].shape[1])

    def timed_step(self) -> float:
        """Seconds for one decode forward; the cache is cropped back afterwards."""
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(input_ids=self.next_tokens, attention_mask=self.attention_mask,
                       past_key_values=self.cache, use_cache=True)
            elapsed = time.perf_counter() - start
        self.cache.crop(-1)
        return elapsed


def paired_decode(state: DecodeState, arms: Mapping[str, Any], *, rounds: int,
                  warmup: int = 3, reference: str = "unsteered") -> dict[str, Any]:
    """Time one decode forward per arm per round, on the same cache state, rotating the order.

    ``arms`` maps a name to a context-manager factory (``None`` = no hooks) entered around
    each timed forward, outside the timing. Returns per-arm time quantiles (ms) and per-round
    ratios ``t_reference / t_arm`` with their quantiles.
    """
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            factory = arms[name]
            with factory() if factory is not None else contextlib.nullcontext():
                elapsed = state.timed_step()
            if r >= warmup:
                times[name].append(elapsed)
    result: dict[str, Any] = {"time_ms": {n: quantiles([t * 1e3 for t in times[n]])
                                          for n in names}}
    result["ratio"] = {n: quantiles([a / b for a, b in zip(times[reference], times[n],
                                                           strict=True)])
                       for n in names if n != reference}
    result["times_ms"] = {n: [round(t * 1e3, 4) for t in times[n]] for n in names}
    return result


def _steerer_factory(steerer):
    @contextlib.contextmanager
    def factory():
        steerer.install()
        try:
            yield
        finally:
            steerer.remove()

    return factory


def decode_overhead(model: nn.Module, tokenizer, bank, *, batch_sizes: Sequence[int],
                    layers: Sequence[int], rounds: int, include_steering_vectors: bool,
                    log=print) -> tuple[list[dict], dict]:
    """Measurements (a) and (b); see the module docstring.

    Returns
    -------
    (list of dict, dict)
        One row per batch size (``batch``, ``context``, ``rounds``, ``time_ms``, ``ratio``,
        ``times_ms``), and the summary of (b) at the largest batch.
    """
    names = list(bank.names)
    weight = bank.default_weight
    shared_mix = {names[0]: 2.0 * weight, names[3 % len(names)]: 0.5 * weight}
    deltas = shared_deltas(bank, shared_mix, layers)
    directions = {layer: bank.layer_vectors(layer) for layer in layers}
    rows = []
    mixes_result: dict[str, Any] = {}
    for batch in batch_sizes:
        state = DecodeState(model, tokenizer, batch)
        row_mixes = distinct_mixes(names, batch, weight, seed=batch)
        distinct = steer(model, bank, row_mixes, layers=list(layers), monitor=True)
        arms: dict[str, Any] = {
            "unsteered": None,
            "emokern": _steerer_factory(distinct),
            "naive": lambda: NaiveSteering(model, deltas, directions),
        }
        if include_steering_vectors:
            arms["steering_vectors"] = lambda: steering_vectors_patch(model, deltas)
        largest = batch == max(batch_sizes)
        if largest:
            shared = steer(model, bank, [shared_mix] * batch, layers=list(layers), monitor=True)
            arms["emokern_shared"] = _steerer_factory(shared)
            arms["per_row"] = functools.partial(PerRowSteering, model,
                                                mix_rows(names, row_mixes), directions)
            _check_same_logits(state, _steerer_factory(distinct), arms["per_row"])
        measured = paired_decode(state, arms, rounds=rounds)
        row = {"batch": batch, "context": state.context, "rounds": rounds, **measured}
        rows.append(row)
        msg = ", ".join(f"{n} {q['median']:.3f}" for n, q in measured["ratio"].items())
        log(f"  decode batch {batch:3d} (context {state.context}): "
            f"unsteered {measured['time_ms']['unsteered']['median']:.1f} ms/step; "
            f"tokens/s ratio vs unsteered: {msg}")
        if largest:
            mixes_result = _mixes_summary(measured, batch)
        del state
    return rows, mixes_result


def _check_same_logits(state: DecodeState, emokern_arm, hook_arm) -> None:
    """Check, then time: the per-row hook steers like emokern (same decode-step logits)."""
    logits = []
    for factory in (emokern_arm, hook_arm):
        with factory(), torch.inference_mode():
            logits.append(state.model(input_ids=state.next_tokens,
                                      attention_mask=state.attention_mask,
                                      past_key_values=state.cache, use_cache=True).logits)
        state.cache.crop(-1)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-3)


def _paired_ratio(measured: dict, numerator: str, denominator: str) -> dict[str, float]:
    """Quantiles of ``t_numerator / t_denominator`` paired per round."""
    return quantiles([a / b for a, b in zip(measured["times_ms"][numerator],
                                            measured["times_ms"][denominator], strict=True)])


def _mixes_summary(measured: dict, batch: int) -> dict:
    """(b): distinct vs shared mixes at the largest batch, emokern and the plain hooks."""
    times = measured["time_ms"]
    emokern = _paired_ratio(measured, "emokern_shared", "emokern")
    hooks = _paired_ratio(measured, "naive", "per_row")
    return {"batch": batch,
            "emokern_distinct_ms": times["emokern"]["median"],
            "emokern_shared_ms": times["emokern_shared"]["median"],
            "ratio_distinct_vs_shared": emokern["median"],
            "ratio_distinct_vs_shared_quartiles": emokern,
            "hook_distinct_ms": times["per_row"]["median"],
            "hook_shared_ms": times["naive"]["median"],
            "hook_ratio_distinct_vs_shared": hooks["median"],
            "hook_ratio_distinct_vs_shared_quartiles": hooks,
            "emokern_distinct_vs_unsteered": measured["ratio"]["emokern"],
            "hook_distinct_vs_unsteered": measured["ratio"]["per_row"],
            "emokern_distinct_vs_hook_distinct": _paired_ratio(measured, "per_row", "emokern")}
