"""End-to-end steering benchmark: emokern vs the naive forward-hook baseline, as ratios.

Used by ``bench/bench_generate.py`` (which writes ``bench/results/generate.*``) and by
``emokern bench generate [--model PATH] [--batch-sizes ...] [--out DIR]``. Three measurements,
all ratios taken within one run (whole-run wall time on shared machines varies by ±20–30%):

(a) **decode overhead** — paired per-step A/B: on one KV-cache state, time one decode forward
    of each arm (unsteered, emokern with a distinct mix per row and the monitor on, the naive
    baseline, the ``steering-vectors`` library when installed), crop the cache back
    (``DynamicCache.crop(-1)``) after each, and rotate the arms' order every round. The ratio
    of a round is ``t_unsteered / t_arm`` (= steered tokens/s over unsteered tokens/s); the
    median over rounds is reported with its quartiles.
(b) **distinct vs shared mixes** at the largest batch: emokern with one mix per row vs one mix
    for all rows, paired the same way (``t_shared / t_distinct``); and what the baseline pays
    for distinct mixes, one batch-1 forward per row, from (a)'s timings.
(c) **sweep** — 6 emotions × 7 weights × 8 prompts = 336 sequences of ``sweep_new_tokens``
    greedy tokens each (fixed length: ``min_new_tokens = max_new_tokens``, so both sides decode
    the same number of steps): emokern in ``ceil(336 / sweep_max_batch)`` batched ``generate``
    calls vs the baseline's loop over the 42 conditions, one batch of 8 prompts each. Wall
    clock ratio (split into prefill and decode), plus how many rows produced identical tokens.
    The default ``sweep_max_batch`` is 168 (2 calls), not 336: memory allows one call, but on
    a CPU the prefill of 336 prompts at once runs out of cache and is slower per token than in
    smaller batches (measured on the default model, 2 threads: 336 rows in 1 call 43–45 s,
    168 in 2 calls 34.5 s, 112 in 3 calls 34 s).

The naive baseline (:class:`NaiveSteering`) is the forward-hook approach of existing steering
libraries: one shared vector per batch returned as ``output + delta`` from a hook on each
steered layer, projections by a separate matmul appended to Python lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
SWEEP_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
TARGETS = {"decode": 0.98, "mixes": 0.98, "sweep": 3.0}
PROMPTS = (
    "Tell me about your weekend.",
    "Describe the house you grew up in.",
    "What happens when the power goes out at night?",
    "Write a short note to a colleague about the meeting tomorrow.",
    "How was the concert yesterday?",
    "Describe a walk through the old part of town.",
    "What did you find in the attic?",
    "Tell me about the letter that arrived this morning.",
)


# ------------------------------------------------------------------------ naive baseline


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
        from emokern.models import decoder_layers

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
        import steering_vectors  # noqa: F401
    except Exception:  # it pins transformers<5 and may fail in many ways
        return False
    return True


def steering_vectors_patch(model: nn.Module, deltas: Mapping[int, torch.Tensor]):
    """A context manager applying ``deltas`` with the ``steering-vectors`` library
    (``SteeringVector(...).apply(model)``: one additive forward hook per decoder block)."""
    from steering_vectors import SteeringVector

    parameter = next(model.parameters())
    vector = SteeringVector(
        layer_activations={layer: d.to(device=parameter.device, dtype=parameter.dtype)
                           for layer, d in deltas.items()},
        layer_type="decoder_block",
    )
    return vector.apply(model, multiplier=1.0)


# ------------------------------------------------------------------------ the bank


def benchmark_bank(model: nn.Module, tokenizer, *, model_name: str = "default",
                   names: Sequence[str] = EMOTIONS, seed: int = 0):
    """The bank to benchmark with: the shipped default bank for the default model when present
    (restricted to ``names``), else random vectors with realistic norms.

    Random vectors are unit directions scaled to a fifth of the mean hidden-state norm at each
    layer (measured on :data:`PROMPTS`), about the size of extracted emotion vectors; timing
    does not depend on their values.

    Returns
    -------
    (EmotionBank, str)
        The bank and a description of where it came from.
    """
    from emokern.bank import EmotionBank
    from emokern.models import decoder_layers, model_fingerprint
    from emokern.steer import encode_prompts

    if model_name == "default":
        try:
            bank = EmotionBank.load_default("ev")
            bank.check_compatible(model)
            if all(name in bank for name in names):
                return bank.select(list(names)), "shipped default bank (ev)"
        except (FileNotFoundError, ValueError):
            pass
    n_layers = len(decoder_layers(model))
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, list(PROMPTS), device=device)
    with torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    real = encoded["attention_mask"].bool()
    norms = torch.stack([h[real].float().norm(dim=-1).mean() for h in hidden[1:n_layers + 1]])
    generator = torch.Generator().manual_seed(seed)
    dim = hidden[0].shape[-1]
    vectors = torch.randn(n_layers, len(names), dim, generator=generator)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * (0.2 * norms.cpu())[:, None, None]
    bank = EmotionBank(vectors, list(names), list(range(n_layers)),
                       hidden_norm=norms.cpu().float(),
                       metadata={"fingerprint": model_fingerprint(model), "recommended_alpha": 1.0,
                                 "random": True})
    return bank, "random vectors, norm 0.2 x mean hidden norm per layer (no shipped bank)"


def middle_layers(bank, count: int) -> list[int]:
    """``count`` consecutive bank layers around the middle of the bank (all when fewer)."""
    layers = sorted(bank.layers)
    if len(layers) <= count:
        return layers
    start = (len(layers) - count) // 2
    return layers[start:start + count]


# ------------------------------------------------------------------------ (a), (b) decode A/B


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": q[1], "q25": q[0], "q75": q[2], "n": len(ordered)}


def _distinct_mixes(names: Sequence[str], batch: int, alpha: float, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    mixes = []
    for _ in range(batch):
        chosen = torch.randperm(len(names), generator=generator)[:2].tolist()
        weights = (torch.rand(2, generator=generator) * 4 - 1) * alpha
        mixes.append({names[k]: float(w) for k, w in zip(chosen, weights, strict=True)})
    return mixes


class _DecodeState:
    """A batch after its prefill: the next input token, its attention mask and the cache."""

    def __init__(self, model: nn.Module, tokenizer, batch: int) -> None:
        from emokern.steer import encode_prompts

        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        device = next(model.parameters()).device
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


def paired_decode(state: _DecodeState, arms: Mapping[str, Any], *, rounds: int,
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
    result: dict[str, Any] = {"time_ms": {n: _quantiles([t * 1e3 for t in times[n]])
                                          for n in names}}
    result["ratio"] = {n: _quantiles([a / b for a, b in zip(times[reference], times[n],
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
    """Measurements (a) and (b); see the module docstring."""
    from emokern.steer import steer

    names = list(bank.names)
    alpha = bank.recommended_alpha
    shared_mix = {names[0]: 2.0 * alpha, names[3 % len(names)]: 0.5 * alpha}
    deltas = shared_deltas(bank, shared_mix, layers)
    directions = {layer: bank.layer_vectors(layer) for layer in layers}
    rows = []
    mixes_result: dict[str, Any] = {}
    for batch in batch_sizes:
        state = _DecodeState(model, tokenizer, batch)
        distinct = steer(model, bank, _distinct_mixes(names, batch, alpha, seed=batch),
                         layers=list(layers), monitor=True)
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
        measured = paired_decode(state, arms, rounds=rounds)
        row = {"batch": batch, "context": state.context, "rounds": rounds, **measured}
        rows.append(row)
        msg = ", ".join(f"{n} {q['median']:.3f}" for n, q in measured["ratio"].items())
        log(f"  decode batch {batch:3d} (context {state.context}): "
            f"unsteered {measured['time_ms']['unsteered']['median']:.1f} ms/step; "
            f"tokens/s ratio vs unsteered: {msg}")
        if largest:
            mixes_result = _mixes_summary(measured, batch, rows)
        del state
    return rows, mixes_result


def _mixes_summary(measured: dict, batch: int, rows: list[dict]) -> dict:
    """(b): emokern distinct vs shared at the largest batch, and the baseline's loop cost."""
    rounds = zip(measured["times_ms"]["emokern_shared"], measured["times_ms"]["emokern"],
                 strict=True)
    paired = _quantiles([shared / distinct for shared, distinct in rounds])
    summary = {"batch": batch,
               "emokern_distinct_ms": measured["time_ms"]["emokern"]["median"],
               "emokern_shared_ms": measured["time_ms"]["emokern_shared"]["median"],
               "ratio_distinct_vs_shared": paired["median"],
               "ratio_distinct_vs_shared_quartiles": paired}
    one = next((r for r in rows if r["batch"] == 1), None)
    if one is not None and batch > 1:
        naive_loop_ms = one["time_ms"]["naive"]["median"] * batch
        summary["naive_loop_ms"] = naive_loop_ms
        summary["naive_shared_ms"] = measured["time_ms"]["naive"]["median"]
        summary["naive_ratio_distinct_vs_shared"] = summary["naive_shared_ms"] / naive_loop_ms
    return summary


# ------------------------------------------------------------------------ (c) sweep


def sweep_conditions(bank) -> list[dict[str, float]]:
    """The 42 conditions: each emotion at each of :data:`SWEEP_WEIGHTS` × recommended_alpha."""
    alpha = bank.recommended_alpha
    return [{name: weight * alpha} for name in bank.names for weight in SWEEP_WEIGHTS]


def _generate_options(tokenizer, new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
            "temperature": None, "top_p": None, "top_k": None,
            "pad_token_id": tokenizer.pad_token_id}


def _timed_generate(model, encoded, options) -> tuple[torch.Tensor, float, float]:
    """``model.generate`` split into prefill and decode seconds: a logits processor notes the
    time the first logits arrive (the end of the prefill forward)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstLogits(LogitsProcessor):
        first: float | None = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            return scores

    clock = FirstLogits()
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
    from emokern.steer import encode_prompts, steer

    device = next(model.parameters()).device
    rows = [(mix, prompt) for mix in sweep_conditions(bank) for prompt in PROMPTS]
    outputs, calls, prefill, decode = [], 0, 0.0, 0.0
    for start in range(0, len(rows), max_batch):
        chunk = rows[start:start + max_batch]
        encoded = encode_prompts(tokenizer, [p for _, p in chunk], device=device)
        with steer(model, bank, [m for m, _ in chunk], layers=list(layers), monitor=True) as s:
            out, pre, dec = _timed_generate(model, encoded, _generate_options(tokenizer,
                                                                              new_tokens))
        s.monitor.mean()
        outputs += list(out[:, encoded["input_ids"].shape[1]:].cpu())
        calls, prefill, decode = calls + 1, prefill + pre, decode + dec
    return outputs, calls, prefill, decode


def sweep_loop(model, tokenizer, bank, layers, *, new_tokens: int, patch):
    """The baseline: one batch of the 8 prompts per condition, ``patch(deltas)`` around it.

    Returns the generated tokens per row and the prefill and decode seconds.
    """
    from emokern.steer import encode_prompts

    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, list(PROMPTS), device=device)
    outputs, prefill, decode = [], 0.0, 0.0
    for mix in sweep_conditions(bank):
        deltas = shared_deltas(bank, mix, layers)
        with patch(deltas):
            out, pre, dec = _timed_generate(model, encoded, _generate_options(tokenizer,
                                                                              new_tokens))
        outputs += list(out[:, encoded["input_ids"].shape[1]:].cpu())
        prefill, decode = prefill + pre, decode + dec
    return outputs, prefill, decode


def _warm_up(model, tokenizer, bank, layers) -> None:
    """Load the compiled kernel and run each path once, so no timing includes first-call costs
    (JIT build or load of the extension, lazy initialisations in transformers)."""
    from emokern.ops import resolve_backend
    from emokern.steer import encode_prompts, steer

    resolve_backend(None, next(model.parameters()).device)
    encoded = encode_prompts(tokenizer, list(PROMPTS[:2]), device=next(model.parameters()).device)
    mix = {bank.names[0]: bank.recommended_alpha}
    options = _generate_options(tokenizer, 2)
    with torch.inference_mode():
        model.generate(**encoded, **options)
        with steer(model, bank, [mix, {}], layers=list(layers)):
            model.generate(**encoded, **options)
        with NaiveSteering(model, shared_deltas(bank, mix, layers)):
            model.generate(**encoded, **options)


def sweep(model, tokenizer, bank, layers, *, new_tokens: int, max_batch: int,
          include_steering_vectors: bool, log=print) -> dict[str, Any]:
    """Measurement (c); see the module docstring."""
    directions = {layer: bank.layer_vectors(layer) for layer in layers}
    _warm_up(model, tokenizer, bank, layers)
    result: dict[str, Any] = {"sequences": len(sweep_conditions(bank)) * len(PROMPTS),
                              "conditions": len(sweep_conditions(bank)),
                              "prompts": len(PROMPTS), "new_tokens": new_tokens,
                              "weights_x_alpha": list(SWEEP_WEIGHTS),
                              "alpha": bank.recommended_alpha, "max_batch": max_batch}
    start = time.perf_counter()
    fused, calls, prefill, decode = sweep_emokern(model, tokenizer, bank, layers,
                                                  new_tokens=new_tokens, max_batch=max_batch)
    result["emokern_s"] = time.perf_counter() - start
    result["emokern_prefill_s"], result["emokern_decode_s"] = prefill, decode
    result["emokern_generate_calls"] = calls
    log(f"  sweep emokern: {result['emokern_s']:.1f} s in {calls} generate call(s) "
        f"(prefill {prefill:.1f} s, decode {decode:.1f} s)")
    others = [("naive", lambda d: NaiveSteering(model, d, directions))]
    if include_steering_vectors:
        others.append(("steering_vectors", lambda d: steering_vectors_patch(model, d)))
    for name, patch in others:
        start = time.perf_counter()
        tokens, prefill, decode = sweep_loop(model, tokenizer, bank, layers,
                                             new_tokens=new_tokens, patch=patch)
        result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_prefill_s"], result[f"{name}_decode_s"] = prefill, decode
        result[f"speedup_vs_{name}"] = result[f"{name}_s"] / result["emokern_s"]
        result[f"decode_speedup_vs_{name}"] = decode / result["emokern_decode_s"]
        result[f"prefill_speedup_vs_{name}"] = prefill / result["emokern_prefill_s"]
        result[f"identical_rows_vs_{name}"] = sum(torch.equal(a, b) for a, b in
                                                  zip(fused, tokens, strict=True))
        log(f"  sweep {name} loop: {result[f'{name}_s']:.1f} s (prefill {prefill:.1f} s, decode "
            f"{decode:.1f} s) -> emokern {result[f'speedup_vs_{name}']:.2f}x faster "
            f"(decode {result[f'decode_speedup_vs_{name}']:.2f}x); "
            f"{result[f'identical_rows_vs_{name}']}/{len(fused)} rows token-identical")
    result["naive_generate_calls"] = result["conditions"]
    return result


# ------------------------------------------------------------------------ the whole run


def _machine() -> dict[str, Any]:
    import transformers

    import emokern

    try:
        backends = emokern.available_backends()
    except ImportError:
        backends = {"reference": True}
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "emokern": emokern.__version__,
        "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backends": backends,
    }
    if steering_vectors_available():
        import importlib.metadata

        info["steering_vectors"] = importlib.metadata.version("steering-vectors")
    return info


def run_generate_benchmark(
    model: str | nn.Module = "default",
    *,
    tokenizer=None,
    batch_sizes: Sequence[int] | None = None,
    n_layers: int = 10,
    rounds: int = 40,
    run_sweep: bool = True,
    sweep_new_tokens: int = 32,
    sweep_max_batch: int = 168,
    include_steering_vectors: bool | None = None,
    threads: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Run (a), (b) and (c) on ``model`` and return a JSON-able result (see the module docstring).

    Parameters
    ----------
    model : "default", a checkpoint path, or a loaded model (then pass ``tokenizer``)
    batch_sizes : list of int
        Decode batch sizes for (a); (b) runs at the largest. Default 1, 8, 32, 64.
    n_layers : int
        Steered layers (consecutive, around the middle of the bank).
    rounds : int
        Timed rounds per batch size in (a)/(b) (one forward per arm per round).
    run_sweep : bool
        Run (c).
    sweep_new_tokens, sweep_max_batch : int
        Tokens per sequence and the largest generate batch of emokern's sweep (see the module
        docstring for why 168 rather than all 336).
    include_steering_vectors : bool, optional
        Measure the ``steering-vectors`` library too; default: when it imports.
    threads : int, optional
        torch intra-op threads for the run (restored afterwards); default: torch's setting.
        On a machine shared with other work, 1 thread avoids parallel regions waiting for a
        descheduled thread, which makes every step several times slower and noisier.
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_generate_benchmark(
                model, tokenizer=tokenizer, batch_sizes=batch_sizes, n_layers=n_layers,
                rounds=rounds, run_sweep=run_sweep, sweep_new_tokens=sweep_new_tokens,
                sweep_max_batch=sweep_max_batch,
                include_steering_vectors=include_steering_vectors, log=log)
        finally:
            torch.set_num_threads(previous)
    from emokern.models import load_model

    batch_sizes = list(batch_sizes or DEFAULT_BATCH_SIZES)
    model_name = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise ValueError("run_generate_benchmark: pass tokenizer= with a loaded model")
    if include_steering_vectors is None:
        include_steering_vectors = steering_vectors_available()
    bank, bank_source = benchmark_bank(model, tokenizer, model_name=str(model_name))
    layers = middle_layers(bank, n_layers)
    log(f"emokern generate benchmark: {model_name}, layers {layers}, K = {bank.n_emotions} "
        f"({bank_source})")
    _warm_up(model, tokenizer, bank, layers)
    load_before = os.getloadavg()
    started = time.time()
    decode_rows, mixes = decode_overhead(model, tokenizer, bank, batch_sizes=batch_sizes,
                                         layers=layers, rounds=rounds,
                                         include_steering_vectors=include_steering_vectors,
                                         log=log)
    sweep_result = None
    if run_sweep:
        sweep_result = sweep(model, tokenizer, bank, layers, new_tokens=sweep_new_tokens,
                             max_batch=sweep_max_batch,
                             include_steering_vectors=include_steering_vectors, log=log)
    return {
        "benchmark": "generate",
        "model": str(model_name),
        "bank": bank_source,
        "layers": layers,
        "emotions": list(bank.names),
        "dtype": str(next(model.parameters()).dtype),
        "targets": TARGETS,
        "decode": decode_rows,
        "mixes": mixes,
        "sweep": sweep_result,
        "machine": _machine(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "elapsed_s": time.time() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------ reports


def _verdict(value: float, target: float) -> str:
    return "yes" if value >= target else "no"


def format_table(result: Mapping[str, Any]) -> str:
    """A markdown report of :func:`run_generate_benchmark`'s result."""
    lines = [f"Model {result['model']} ({result['dtype']}), steered layers {result['layers']}, "
             f"K = {len(result['emotions'])}; bank: {result['bank']}.", ""]
    arms = [a for a in ("emokern", "naive", "steering_vectors")
            if any(a in row["ratio"] for row in result["decode"])]
    lines += ["(a) decode tokens/s, steered / unsteered (paired per-step A/B, median [q25, q75]; "
              f"target >= {TARGETS['decode']})", ""]
    lines.append("| batch | context | unsteered ms/step | " + " | ".join(arms) + " | target met |")
    lines.append("|---:|---:|---:|" + "---:|" * len(arms) + ":---:|")
    for row in result["decode"]:
        cells = []
        for arm in arms:
            q = row["ratio"].get(arm)
            cells.append("-" if q is None
                         else f"{q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]")
        met = _verdict(row["ratio"]["emokern"]["median"], TARGETS["decode"])
        lines.append(f"| {row['batch']} | {row['context']} | "
                     f"{row['time_ms']['unsteered']['median']:.1f} | " + " | ".join(cells)
                     + f" | {met} |")
    mixes = result.get("mixes") or {}
    if mixes:
        lines += ["", f"(b) batch {mixes['batch']}: distinct mixes vs one shared mix "
                      f"(target >= {TARGETS['mixes']})", "",
                  "| system | shared ms/step | distinct ms/step | shared / distinct |",
                  "|---|---:|---:|---:|",
                  f"| emokern | {mixes['emokern_shared_ms']:.1f} | "
                  f"{mixes['emokern_distinct_ms']:.1f} | {mixes['ratio_distinct_vs_shared']:.3f} |"]
        if "naive_loop_ms" in mixes:
            lines.append(f"| naive hooks (one batch-1 forward per mix; {mixes['batch']} x "
                         f"the batch-1 step of (a)) | "
                         f"{mixes['naive_shared_ms']:.1f} | {mixes['naive_loop_ms']:.1f} | "
                         f"{mixes['naive_ratio_distinct_vs_shared']:.3f} |")
    sweep_result = result.get("sweep")
    if sweep_result:
        s = sweep_result
        lines += ["", f"(c) sweep: {s['conditions']} conditions x {s['prompts']} prompts = "
                      f"{s['sequences']} sequences x {s['new_tokens']} tokens (greedy, fixed "
                      f"length; target >= {TARGETS['sweep']}x)", "",
                  "| system | generate calls | wall s | prefill s | decode s | emokern speed-up "
                  "(wall / decode) | identical rows |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| emokern | {s['emokern_generate_calls']} | {s['emokern_s']:.1f} | "
                  f"{s['emokern_prefill_s']:.1f} | {s['emokern_decode_s']:.1f} | - | - |"]
        for name, label in (("naive", "naive hooks loop"),
                            ("steering_vectors", "steering-vectors loop")):
            if f"{name}_s" not in s:
                continue
            lines.append(f"| {label} | {s['naive_generate_calls']} | {s[f'{name}_s']:.1f} | "
                         f"{s[f'{name}_prefill_s']:.1f} | {s[f'{name}_decode_s']:.1f} | "
                         f"{s[f'speedup_vs_{name}']:.2f}x / "
                         f"{s[f'decode_speedup_vs_{name}']:.2f}x | "
                         f"{s[f'identical_rows_vs_{name}']}/{s['sequences']} |")
    load = result.get("load_average", {})
    if load:
        lines += ["", f"Load average (1/5/15 min) before {load['before']}, after {load['after']}; "
                      f"{result['machine']['cpu_count']} CPUs, "
                      f"{result['machine']['torch_threads']} torch threads."]
    return "\n".join(lines) + "\n"


def _publish(temporary: str, target: Path) -> None:
    """Give a finished temporary file the usual permissions (NamedTemporaryFile makes it 0600)
    and move it into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, target)


def plot_results(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw (a) and (c) into a PNG at ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [3, 2, 2]})
    ax = axes[0]
    batches = [row["batch"] for row in result["decode"]]
    x = range(len(batches))
    arms = [(a, label) for a, label in (("emokern", "emokern (distinct mix per row)"),
                                        ("naive", "naive hooks (one shared mix)"),
                                        ("steering_vectors", "steering-vectors (shared mix)"))
            if all(a in row["ratio"] for row in result["decode"])]
    width = 0.8 / max(len(arms), 1)
    for i, (arm, label) in enumerate(arms):
        med = [row["ratio"][arm]["median"] for row in result["decode"]]
        low = [m - row["ratio"][arm]["q25"] for m, row in zip(med, result["decode"], strict=True)]
        high = [row["ratio"][arm]["q75"] - m for m, row in zip(med, result["decode"], strict=True)]
        ax.bar([j + (i - (len(arms) - 1) / 2) * width for j in x], med, width,
               yerr=[low, high], capsize=3, label=label)
    ax.axhline(TARGETS["decode"], color="k", linestyle="--", linewidth=1, label="target 0.98")
    ax.set_xticks(list(x), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s, steered / unsteered")
    lows = [row["ratio"][a]["q25"] for row in result["decode"] for a, _ in arms]
    highs = [row["ratio"][a]["q75"] for row in result["decode"] for a, _ in arms]
    ax.set_ylim(min(0.8, min(lows, default=0.8) - 0.05), max(1.1, max(highs, default=1.1) + 0.05))
    ax.set_title(f"(a) decode overhead, {len(result['layers'])} layers, "
                 f"K = {len(result['emotions'])}")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    mixes = result.get("mixes") or {}
    if mixes:
        labels = ["emokern\nshared", "emokern\ndistinct"]
        values = [mixes["emokern_shared_ms"], mixes["emokern_distinct_ms"]]
        colors = ["C0", "C0"]
        if "naive_loop_ms" in mixes:
            labels += ["naive\nshared", "naive\ndistinct (loop)"]
            values += [mixes["naive_shared_ms"], mixes["naive_loop_ms"]]
            colors += ["C1", "C1"]
        bars = ax.bar(labels, values, color=colors)
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f} ms", ha="center",
                    va="bottom", fontsize=8)
        ax.set_ylabel("ms per decode step of the batch")
        ax.set_ylim(0, max(values) * 1.2)
        ax.set_title(f"(b) batch {mixes['batch']}: {mixes['batch']} mixes vs one")
    else:
        ax.set_axis_off()
    ax = axes[2]
    s = result.get("sweep")
    if s:
        labels, values = ["emokern"], [s["emokern_s"]]
        labels.append("naive loop")
        values.append(s["naive_s"])
        if "steering_vectors_s" in s:
            labels.append("steering-vectors loop")
            values.append(s["steering_vectors_s"])
        bars = ax.bar(labels, values, color=["C0", "C1", "C2"][:len(values)])
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f} s\n"
                    f"({value / s['emokern_s']:.1f}x)", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("wall clock (s)")
        ax.set_ylim(0, max(values) * 1.25)
        ax.set_title(f"(c) sweep: {s['sequences']} sequences x {s['new_tokens']} tokens")
    else:
        ax.set_axis_off()
    fig.suptitle(f"emokern steering on {result['model']} (CPU, {result['machine']['cpu_count']} "
                 f"cores)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png.tmp", delete=False) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _publish(tmp.name, path)
    plt.close(fig)
    return path


def save_results(result: Mapping[str, Any], out_dir: str | os.PathLike,
                 stem: str = "generate") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"),
                         (".md", format_table(result))):
        target = out / f"{stem}{suffix}"
        with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as tmp:
            tmp.write(text)
        _publish(tmp.name, target)
        written.append(target)
    written.append(plot_results(result, out / f"{stem}.png"))
    return written
