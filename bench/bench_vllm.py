"""vLLM with emotion steering: (1) throughput of the emokern plugin (packed op in vLLM's
compiled graph) vs unsteered vLLM vs the plain-PyTorch alternative (a forward hook adding each
token's gathered mix, which forces eager mode); (2) the generate benchmark's 336-sequence
emotion x weight sweep as one vLLM call vs the Hugging Face per-condition hook loop. Ratios
from one run, written to ``bench/results/vllm.{json,md,png}``::

    .venv-vllm/bin/python -P bench/bench_vllm.py \\
        [--requests 64] [--tokens 32] [--repeats 6] [--layers 10] [--out bench/results]
        [--no-throughput] [--no-sweep] [--sweep-tokens 32] [--sweep-repeats 2]

**Throughput.** Five engines on the default model (float32), loaded one after the other and
then kept loaded (only one generates at a time): (1) unsteered, compiled, without the plugin;
(2) emokern, compiled: ``L`` steered layers (``--layers`` consecutive bank layers around the
middle), K = 6, every request with its own mix, readings on; (2b) emokern with levels on,
compiled, the same mixes each with a cap on its pushed emotion (``{"joy": {"weight": w, "max":
2}}``: the push, then every token whose projection exceeds z = 2 brought to it); (3) emokern
eager (``enforce_eager=True``); (4) the hook, ``enforce_eager=True``, same layers, mixes and
readings: the plugin's slots with a plain-PyTorch forward hook in place of the op
(:mod:`emokern.benchmarks.vllm_hook`, installed through vLLM's ``worker_extension_cls``:
``hidden += W[slot(t)] @ V`` and the projections summed per slot with ``index_add_``). The
hook cannot be compiled, so emokern eager / hook is the kernel's share of the speed-up and
emokern compiled / emokern eager the compiler's. Each
engine runs the ``--requests`` prompts once to warm up, then the engines take turns for
``--repeats`` rounds (the order rotating); throughput = generated tokens / wall seconds (fixed
length, ``ignore_eos``); the ratios are paired per round (median, quartiles), so the drift of
a shared machine hits all three. The steered tokens of (2) and (3) are compared (the same
math: the same greedy tokens but for float summation order).

**Sweep.** 6 emotions x 7 weights (x the bank's recommended weight) x 8 prompts = 336
sequences of ``--sweep-tokens`` greedy tokens (:mod:`emokern.benchmarks.mix_sweep`, the generate
benchmark's (c)). First, in this process, the Hugging Face side: emokern in batched
``generate`` calls (168 rows each) and the baseline, one ``generate`` call of the 8 prompts
per condition with a forward hook adding that condition's vector (readings on in both). Then
one vLLM engine with the plugin (compiled, same bank, layers, spread and units, readings on,
prefix caching off so every repeat computes every prompt) runs all 336 requests in ONE
``LLM.generate`` call, each request with its own mix (:mod:`emokern.benchmarks.serving`),
``--sweep-repeats`` times after a short warm-up. Reported: wall seconds, the speed-up over the
loop, and the share of vLLM rows token-identical to Hugging Face emokern's.

The engines' worker processes log which kernel backs the packed op; those lines are kept
(:class:`emokern.benchmarks.serving.CapturedLines`) and recorded with the results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
TARGET = 0.97
# What the engines' processes log and the results keep: the plugin's line (layers, emotions,
# the op's backend) and vLLM's OpenMP thread binding (which cores the worker computes on).
WORKER_LINES = r"emokern\.vllm:|ompmultiprocessing"
# vLLM's log prefix: "(Worker pid=123) INFO 11-28 21:17:35 [runner.py:103] "
_LOG_PREFIX = re.compile(r"^\(\S+ pid=\d+\) \w+ [\d\- :]+ \[[^\]]+\] ")
SWEEP_HF_MAX_BATCH = 168  # emokern's rows per Hugging Face generate call (the generate bench's)


def mixes(n: int) -> list[dict]:
    """``n`` distinct mixes over the six emotions (two emotions each)."""
    return [{EMOTIONS[i % 6]: round(2.0 + 0.1 * i, 2), EMOTIONS[(i + 1) % 6]: 0.5}
            for i in range(n)]


def capped(mix_list: list[dict], z: float = 2.0) -> list[dict]:
    """The mixes of ``mix_list`` with a cap at ``z`` on each one's first (pushed) emotion."""
    out = []
    for mix in mix_list:
        (first, weight), *rest = mix.items()
        out.append({first: {"weight": weight, "max": z}, **dict(rest)})
    return out


# ------------------------------------------------------------------------ throughput


def gpu_share(engines: int) -> dict:
    """On a CUDA machine, the share of GPU memory each of ``engines`` engines loaded side by
    side may take (vLLM's default, 0.9, lets only one load); nothing on a CPU."""
    import torch

    return {"gpu_memory_utilization": round(0.85 / engines, 2)} if torch.cuda.is_available() \
        else {}


def load_engine(name: str, args, layers: list[int], mix_list) -> dict:
    """One engine (``unsteered`` | ``emokern`` | ``emokern_levels`` | ``emokern_eager`` |
    ``hook``) and its sampling parameters (``mix_list``: one mix per request)."""
    from vllm import LLM, SamplingParams

    import emokern.vllm
    from emokern.benchmarks.vllm_hook import EXTENSION

    engine = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": args.requests,
              "seed": 0, **gpu_share(5)}
    if name == "unsteered":
        extra = {}
    else:
        extra = {"additional_config": {"emokern": {"bank": "default", "layers": layers,
                                                   "monitor": True,
                                                   "levels": name == "emokern_levels"}}}
    if name == "hook":
        extra["worker_extension_cls"] = EXTENSION
    compiled = name not in ("hook", "emokern_eager") and not args.eager
    if not compiled:
        engine["enforce_eager"] = True
    t0 = time.perf_counter()
    llm = LLM(model=str(emokern.vllm.default_model_dir()), **engine, **extra)
    if name == "hook":  # before the first generate: the hook takes the op's place
        llm.collective_rpc("emokern_use_hook")
    load_s = time.perf_counter() - t0
    print(f"{name}: loaded in {load_s:.0f} s", flush=True)
    params = [SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                             extra_args=None if name == "unsteered" else {"emotion": m})
              for m in mix_list]
    return {"llm": llm, "params": params, "load_s": round(load_s, 1), "rates": [],
            "compiled": compiled}


def timed_run(engine: dict, prompts) -> tuple[list, float]:
    """Generate every prompt once; (outputs, generated tokens per second)."""
    start = time.perf_counter()
    outs = engine["llm"].generate(prompts, engine["params"], use_tqdm=False)
    wall = time.perf_counter() - start
    return outs, sum(len(o.outputs[0].token_ids) for o in outs) / wall


def run_engines(args, layers, prompts, mix_list) -> dict:
    """Load the five engines (one after the other; they then stay loaded, idle but for the one
    generating), warm each up, then time them in alternating rounds (the order rotates each
    round), so machine drift hits all alike: ratios are paired per round."""
    import emokern.vllm
    from emokern.benchmarks.serving import close_engine

    names = ("unsteered", "emokern", "emokern_levels", "emokern_eager", "hook")
    engines = {n: load_engine(n, args, layers,
                              capped(mix_list) if n == "emokern_levels" else mix_list)
               for n in names}
    for name, engine in engines.items():
        outs, _ = timed_run(engine, prompts)  # warm-up: prefix cache, first-call costs
        engine["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        readings = emokern.vllm.readings(engine["llm"], outs) if name != "unsteered" else {}
        engine["reading_counts"] = sorted({r["count"] for r in readings.values()})
    for round_ in range(args.repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            engines[name]["rates"].append(timed_run(engines[name], prompts)[1])
        print("round", round_, {n: round(engines[n]["rates"][-1], 1) for n in names},
              flush=True)
    for engine in engines.values():
        close_engine(engine.pop("llm"))
    return engines


def throughput(args, layers, tokenizer) -> dict:
    """The throughput section of the results (see the module docstring)."""
    from emokern.tokens import chat_prompt_ids

    prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, [{"role": "user", "content":
                f"Tell me about day {i + 1} of your holiday."}])} for i in range(args.requests)]
    mix_list = mixes(args.requests)
    load_before = [round(x, 2) for x in os.getloadavg()]
    engines = run_engines(args, layers, prompts, mix_list)
    load_after = [round(x, 2) for x in os.getloadavg()]
    for e in engines.values():
        e["tok_s"] = [round(r, 2) for r in e.pop("rates")]
        e["median_tok_s"] = round(statistics.median(e["tok_s"]), 2)

    def paired(name: str) -> dict:
        ratios = [a / b for a, b in zip(engines[name]["tok_s"], engines["unsteered"]["tok_s"],
                                        strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        return {"median": round(statistics.median(ratios), 4), "q25": round(q[0], 4),
                "q75": round(q[2], 4), "per_round": [round(r, 4) for r in ratios]}
    identical = sum(a == b for a, b in zip(engines["emokern"]["tokens"],
                                           engines["hook"]["tokens"], strict=True))
    return {
        "requests": args.requests, "tokens": args.tokens, "repeats": args.repeats,
        "mixes": mix_list,
        "engines": {n: {k: e[k] for k in ("compiled", "load_s", "tok_s", "median_tok_s",
                                           "reading_counts")} for n, e in engines.items()},
        "ratios": {"emokern_over_unsteered": paired("emokern")["median"],
                   "hook_over_unsteered": paired("hook")["median"],
                   "emokern_over_hook": round(paired("emokern")["median"]
                                              / paired("hook")["median"], 4),
                   # Both eager: the kernel's share; compiled over eager: the compiler's.
                   "emokern_eager_over_hook": round(paired("emokern_eager")["median"]
                                                    / paired("hook")["median"], 4),
                   "emokern_over_emokern_eager": round(paired("emokern")["median"]
                                                       / paired("emokern_eager")["median"], 4),
                   # Caps in every mix: their cost beside unsteered and beside pushes only.
                   "levels_over_unsteered": paired("emokern_levels")["median"],
                   "levels_over_emokern": round(paired("emokern_levels")["median"]
                                                / paired("emokern")["median"], 4)},
        "paired": {n: paired(n) for n in ("emokern", "emokern_levels", "emokern_eager", "hook")},
        "capped_mixes": capped(mix_list),
        "target": TARGET, "identical_rows": identical,
        "load_before": load_before, "load_after": load_after,
    }


# ------------------------------------------------------------------------ sweep


def sweep_vs_hf(args, layers, model, tokenizer) -> dict:
    """The sweep section of the results (see the module docstring)."""
    import torch
    import transformers
    from vllm import LLM

    import emokern.vllm
    from emokern.bank import EmotionBank
    from emokern.benchmarks.hook_baselines import NaiveSteering
    from emokern.benchmarks.mix_sweep import sweep, sweep_loop
    from emokern.benchmarks.serving import (
        close_engine,
        first_differences,
        identical_rows,
        sampling_params,
        sweep_requests,
        timed_vllm_generate,
    )
    from emokern.benchmarks.workload import benchmark_bank

    torch.set_num_threads(args.hf_threads)
    bank, bank_source = benchmark_bank(model, tokenizer)
    if list(bank.names) != list(EmotionBank.load_default("ev").names):
        raise RuntimeError(f"the Hugging Face benchmark's bank ({bank_source}) is not the shipped "
                           f"EV bank the engine loads")
    if args.sweep_emotions:
        bank = bank.select(args.sweep_emotions)
    load_before = [round(x, 2) for x in os.getloadavg()]
    hf_tokens: dict = {}
    hf = sweep(model, tokenizer, bank, layers, new_tokens=args.sweep_tokens,
               max_batch=SWEEP_HF_MAX_BATCH, include_steering_vectors=False, tokens=hf_tokens)
    load_middle = [round(x, 2) for x in os.getloadavg()]
    prompts, mix_list = sweep_requests(tokenizer, bank)
    params = sampling_params(mix_list, args.sweep_tokens)
    engine = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": args.sweep_max_seqs,
              "seed": 0, "enable_prefix_caching": False, "enforce_eager": args.eager,
              **gpu_share(1),
              "additional_config": {"emokern": {"bank": "ev", "layers": layers,
                                                "spread": "divide", "monitor": True}}}
    previous_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.sweep_kv_gib)  # read by the worker
    try:
        t0 = time.perf_counter()
        llm = LLM(model=str(emokern.vllm.default_model_dir()), **engine)
        load_s = time.perf_counter() - t0
    finally:
        if previous_kv is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE")
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = previous_kv
    print(f"sweep engine: loaded in {load_s:.0f} s", flush=True)
    warm = len(bank.names) * 2  # a few requests of a few tokens: first-call costs
    timed_vllm_generate(llm, prompts[:warm], sampling_params(mix_list[:warm], 4))
    runs, walls = [], []
    for repeat in range(args.sweep_repeats):
        outs, wall = timed_vllm_generate(llm, prompts, params)
        runs.append([list(o.outputs[0].token_ids) for o in outs])
        walls.append(wall)
        print(f"sweep vLLM run {repeat}: {wall:.1f} s", flush=True)
    readings = emokern.vllm.readings(llm, outs)
    close_engine(llm)
    load_after = [round(x, 2) for x in os.getloadavg()]
    # The loop again, after vLLM: the drift of a shared machine between the two sides shows.
    directions = {layer: bank.layer_vectors(layer) for layer in layers}
    start = time.perf_counter()
    again, _, _ = sweep_loop(model, tokenizer, bank, layers, new_tokens=args.sweep_tokens,
                             patch=lambda deltas: NaiveSteering(model, deltas, directions))
    loop_after_s = time.perf_counter() - start
    print(f"sweep Hugging Face loop again: {loop_after_s:.1f} s", flush=True)
    loop_s = statistics.mean([hf["naive_s"], loop_after_s])
    vllm_tokens = runs[0]
    generated = sum(len(t) for t in vllm_tokens)
    wall = statistics.median(walls)
    return {
        "sequences": len(prompts), "conditions": hf["conditions"], "prompts": hf["prompts"],
        "new_tokens": args.sweep_tokens, "emotions": list(bank.names),
        "weights_x_alpha": hf["weights_x_alpha"], "alpha": hf["alpha"], "bank": bank_source,
        "hf": {k: round(v, 3) if isinstance(v, float) else v for k, v in hf.items()},
        "hf_transformers": transformers.__version__, "hf_torch_threads": torch.get_num_threads(),
        "vllm_engine": {k: v for k, v in engine.items() if k != "additional_config"}
        | {"emokern": engine["additional_config"]["emokern"], "kv_cache_gib": args.sweep_kv_gib,
           "load_s": round(load_s, 1), "compiled": not args.eager},
        "vllm_generate_calls": 1,
        "vllm_s": round(wall, 3), "vllm_s_per_repeat": [round(w, 3) for w in walls],
        "vllm_generated_tokens": generated,
        "vllm_tok_s": round(generated / wall, 2),
        "hf_loop_s_before_after": [round(hf["naive_s"], 3), round(loop_after_s, 3)],
        "hf_loop_s": round(loop_s, 3),
        "hf_loop_after_identical_rows": identical_rows(again, hf_tokens["naive"]),
        "hf_loop_tok_s": round(generated / loop_s, 2),
        "hf_emokern_tok_s": round(generated / hf["emokern_s"], 2),
        "speedup_vs_hf_loop": round(loop_s / wall, 3),
        "speedup_vs_hf_emokern": round(hf["emokern_s"] / wall, 3),
        "identical_rows_vs_hf_emokern": identical_rows(vllm_tokens, hf_tokens["emokern"]),
        "identical_rows_vs_hf_loop": identical_rows(vllm_tokens, hf_tokens["naive"]),
        "identical_rows_between_vllm_repeats": [identical_rows(vllm_tokens, r)
                                                for r in runs[1:]],
        "first_differing_step_vs_hf_emokern": first_differences(vllm_tokens,
                                                                hf_tokens["emokern"]),
        "reading_counts": sorted({r["count"] for r in readings.values()}),
        "requests_with_readings": len(readings),
        "load_before_hf": load_before, "load_after_hf": load_middle,
        "load_after_vllm": load_after,
        "load_after_hf_loop_again": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_named(result: dict) -> str:
    """`` (CPU model, kernel instruction set)`` from the run's machine info, when recorded."""
    info = result.get("machine_info") or {}
    if not info.get("cpu_model"):
        return ""
    isa = (info.get("cpu_kernel") or {}).get("isa")
    return f" ({info['cpu_model']}" + (f", kernel instruction set {isa})" if isa else ")")


def report_lines(result: dict) -> list[str]:
    """The markdown report of ``result``."""
    lines = ["# emokern in vLLM", "",
             f"vLLM {result['vllm']} (vllm-cpu), {result['machine']}"
             f"{_cpu_named(result)}; default model, float32; "
             f"steered layers {result['layers']} (L = {len(result['layers'])}), K = 6, spread "
             f"'divide', readings on.", ""]
    t = result.get("throughput")
    if t:
        r, e = t["ratios"], t["engines"]
        lines += [
            "## Throughput with per-request emotion mixes", "",
            f"{t['requests']} requests x {t['tokens']} generated tokens (greedy, ignore_eos), "
            f"{t['requests']} distinct mixes; the engines loaded side by side, warmed up, "
            f"then timed in {t['repeats']} alternating rounds (ratios paired per round, median "
            f"[q25, q75]).", "",
            "| engine | compiled | load s | tokens/s (median) | per round | / unsteered "
            "(paired) |",
            "|---|:---:|---:|---:|---|---:|"]
        for name, label in (("unsteered", "vLLM, no plugin"),
                            ("emokern", "emokern plugin (packed op in the graph)"),
                            ("emokern_levels", "emokern plugin, levels on, a cap in every mix "
                             "(packed op in the graph)"),
                            ("emokern_eager", "emokern plugin (eager)"),
                            ("hook", "plain-PyTorch forward hook (eager)")):
            if name not in e:  # results of an older run
                continue
            row = e[name]
            p = t["paired"].get(name)
            ratio = "1" if p is None else f"{p['median']:.3f} [{p['q25']:.3f}, {p['q75']:.3f}]"
            lines.append(f"| {label} | {'yes' if row['compiled'] else 'no'} | {row['load_s']} | "
                         f"{row['median_tok_s']} | {row['tok_s']} | {ratio} |")
        lines += [
            "",
            f"- emokern / unsteered = **{r['emokern_over_unsteered']:.3f}** (target >= "
            f"{t['target']}: {'met' if r['emokern_over_unsteered'] >= t['target'] else 'not met'}"
            f"); emokern / hook = **{r['emokern_over_hook']:.2f}x**"
            + (f" = kernel {r['emokern_eager_over_hook']:.2f}x (both eager) x compiler "
               f"{r['emokern_over_emokern_eager']:.2f}x (emokern compiled / eager)."
               if "emokern_eager_over_hook" in r else "."),
            *([f"- With a cap in every mix (`{{\"joy\": {{\"weight\": w, \"max\": 2}}}}`: "
               f"tokens above z = 2 on the pushed emotion brought to it), levels on / "
               f"unsteered = **{r['levels_over_unsteered']:.3f}** (target >= {t['target']}: "
               f"{'met' if r['levels_over_unsteered'] >= t['target'] else 'not met'}); / "
               f"emokern with pushes only = {r['levels_over_emokern']:.3f}."]
              if "levels_over_unsteered" in r else []),
            f"- Steered tokens identical between emokern and the hook: "
            f"{t['identical_rows']}/{t['requests']} requests; generated-token readings counted "
            f"per request: emokern {e['emokern']['reading_counts']}, hook "
            f"{e['hook']['reading_counts']} (= tokens - 1).",
            f"- Load average before {t['load_before']}, after {t['load_after']}.", ""]
    s = result.get("sweep")
    if s:
        hf = s["hf"]
        v = s["vllm_engine"]
        n = s["sequences"]
        lines += [
            f"## Sweep: {s['conditions']} conditions x {s['prompts']} prompts = {n} sequences "
            f"x {s['new_tokens']} tokens", "",
            f"Emotions {s['emotions']}, each at weights {s['weights_x_alpha']} x "
            f"{s['alpha']} (the bank's recommended weight), greedy, fixed length (Hugging Face "
            f"min_new_tokens = max_new_tokens; vLLM min_tokens = max_tokens, ignore_eos). "
            f"Hugging Face runs in this process (transformers {s['hf_transformers']}, "
            f"{s['hf_torch_threads']} torch thread(s); vLLM's worker computes on the cores its "
            f"OpenMP binding below names) before the vLLM engine is loaded, and its loop once "
            f"more after the engine is shut down (the mean of the two is used); the vLLM "
            f"call is timed {len(s['vllm_s_per_repeat'])} time(s) after a short warm-up "
            f"(median; prefix caching off, so each computes every prompt).", "",
            "| system | generate calls | wall s | generated tokens/s | vLLM speed-up | rows "
            "token-identical to vLLM |",
            "|---|---:|---:|---:|---:|---:|",
            f"| Hugging Face, per-condition forward-hook loop ({s['conditions']} calls of "
            f"{s['prompts']} prompts) | {hf['naive_generate_calls']} | {s['hf_loop_s']:.1f} "
            f"{s['hf_loop_s_before_after']} (before, after vLLM) | "
            f"{s['hf_loop_tok_s']:.1f} | **{s['speedup_vs_hf_loop']:.2f}x** | "
            f"{s['identical_rows_vs_hf_loop']}/{n} |",
            f"| Hugging Face, emokern (batches of {hf['max_batch']}) | "
            f"{hf['emokern_generate_calls']} | {hf['emokern_s']:.1f} | "
            f"{s['hf_emokern_tok_s']:.1f} | {s['speedup_vs_hf_emokern']:.2f}x | "
            f"{s['identical_rows_vs_hf_emokern']}/{n} |",
            f"| vLLM + emokern plugin ({'compiled' if v['compiled'] else 'eager'}, one "
            f"LLM.generate of {n} requests, a mix each) | 1 | {s['vllm_s']:.1f} "
            f"{s['vllm_s_per_repeat']} | {s['vllm_tok_s']:.1f} | - | - |", "",
            f"- vLLM vs Hugging Face emokern: **{s['identical_rows_vs_hf_emokern']}/{n}** rows "
            f"token-identical ({100 * s['identical_rows_vs_hf_emokern'] / n:.1f}%); where "
            f"rows differ, the first differing step: {s['first_differing_step_vs_hf_emokern']} "
            f"(both float32; vLLM's kernels sum in other orders than Hugging Face's, and a "
            f"greedy tie-break flips a whole continuation). Hugging Face emokern vs its hook "
            f"loop: {hf['identical_rows_vs_naive']}/{n}. vLLM repeats identical to the first: "
            f"{s['identical_rows_between_vllm_repeats']}.",
            f"- Readings: {s['requests_with_readings']} requests read, generated tokens "
            f"counted per request {s['reading_counts']} (= tokens - 1).",
            f"- Engine: max_num_seqs {v['max_num_seqs']}, KV cache {v['kv_cache_gib']} GiB, "
            f"loaded in {v['load_s']} s; emokern settings {json.dumps(v['emokern'])}.",
            f"- Load average before the Hugging Face runs {s['load_before_hf']}, after them "
            f"{s['load_after_hf']}, after vLLM {s['load_after_vllm']}, after the loop again "
            f"{s['load_after_hf_loop_again']}.", ""]
    lines += [f"Packed op backend: the workers logged {result['worker_op_backends']} "
              f"(one per engine that runs the packed op); in the main "
              f"process `emokern.ops.resolve_backend(None, cpu, 'steer_packed_')` gives "
              f"`{result['main_op_backend']}`. What the engines logged (each distinct message "
              f"once; every line in the JSON):", ""]
    messages = dict.fromkeys(_LOG_PREFIX.sub("", line).strip() for line in result["worker_log"])
    lines += [f"    {message}" for message in messages if message] or ["    (none)"]
    lines += ["", "A shared 2-core machine: other jobs ran alongside; ratios within one run.", "",
              "Command: `" + result["command"] + "`"]
    return lines


def write_results(result: dict, out: Path) -> None:
    from emokern.files import atomic_write, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vllm.json", result)
    write_text(out / "vllm.md", "\n".join(report_lines(result)) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = [k for k in ("throughput", "sweep") if result.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "throughput":
            t = result["throughput"]
            bars_of = {"unsteered": ("vLLM unsteered\n(compiled)", None, "#999999"),
                       "emokern": ("emokern plugin\n(compiled)", "emokern", "#2a7ab9"),
                       "emokern_levels": ("emokern + caps\n(compiled)", "emokern_levels",
                                          "#5b9bd5"),
                       "hook": ("PyTorch hook\n(eager)", "hook", "#d9822b")}
            names = [n for n in bars_of if n in t["engines"]]
            values = [t["engines"][n]["median_tok_s"] for n in names]
            labels = ["1.000" if bars_of[n][1] is None else
                      f"{t['paired'][bars_of[n][1]]['median']:.3f}" for n in names]
            ticks = [bars_of[n][0] for n in names]
            ax.set_ylabel("generated tokens/s")
            ax.set_title(f"{t['requests']} requests, {t['requests']} mixes, "
                         f"L = {len(result['layers'])}, K = 6", fontsize=10)
            colors = [bars_of[n][2] for n in names]
        else:
            s = result["sweep"]
            values = [s["hf_loop_s"], s["hf"]["emokern_s"], s["vllm_s"]]
            labels = [f"{v:.0f} s ({v / s['vllm_s']:.1f}x)" for v in values]
            ticks = [f"HF hook loop\n({s['conditions']} calls)",
                     f"HF emokern\n({s['hf']['emokern_generate_calls']} calls)",
                     "vLLM + emokern\n(1 call)"]
            ax.set_ylabel("wall clock (s)")
            ax.set_title(f"sweep: {s['sequences']} sequences x {s['new_tokens']} tokens, "
                         f"a mix each", fontsize=10)
            colors = ["#d9822b", "#7fb2d9", "#2a7ab9"]
        bars = ax.bar(ticks, values, color=colors)
        for bar, label in zip(bars, labels, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), label,
                    ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, max(values) * 1.18)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(out / "vllm.png", buffer.getvalue())


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--layers", type=int, default=10, help="steered layers (consecutive)")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--sweep-repeats", type=int, default=2)
    parser.add_argument("--sweep-max-seqs", type=int, default=256,
                        help="the sweep engine's max_num_seqs (vLLM's CPU default)")
    parser.add_argument("--sweep-kv-gib", type=int, default=2,
                        help="the sweep engine's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--sweep-emotions", type=lambda text: text.split(","),
                        help="a subset of the six (comma separated; development runs)")
    parser.add_argument("--hf-threads", type=int, default=1,
                        help="torch threads of the Hugging Face sweep (default 1: vLLM's CPU "
                             "worker computes on one core and keeps the other for its front "
                             "end)")
    parser.add_argument("--eager", action="store_true",
                        help="no compilation anywhere (development runs: plumbing only)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for flag in ("requests", "tokens", "repeats", "layers", "sweep_tokens", "sweep_repeats",
                 "sweep_max_seqs", "sweep_kv_gib", "hf_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not (args.throughput or args.sweep):
        parser.error("nothing to run: --no-throughput and --no-sweep")
    unknown = set(args.sweep_emotions or ()) - set(EMOTIONS)
    if unknown:
        parser.error(f"--sweep-emotions: unknown {sorted(unknown)}; known {list(EMOTIONS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; three are loaded
    # here, not at module level: vLLM's spawned processes re-import this module
    import torch
    import vllm

    import emokern
    from emokern.benchmarks.serving import CapturedLines
    from emokern.benchmarks.workload import middle_layers
    from emokern.machine import machine_info
    from emokern.ops import resolve_backend
    from emokern.vllm.runner import packed_op

    with CapturedLines(WORKER_LINES) as captured:
        packed_op(torch.device("cpu"))  # loads (or compiles) the CPU kernel once, before the
        # engines; each worker resolves it again (and logs the backend)
        main_backend = resolve_backend(None, torch.device("cpu"), "steer_packed_")
        bank = emokern.EmotionBank.load_default()
        layers = middle_layers(bank, args.layers)
        model, tokenizer = emokern.load_model("default")
        result = {"vllm": vllm.__version__,
                  "machine": f"{platform.processor() or platform.machine()}, "
                             f"{os.cpu_count()} CPUs",
                  "machine_info": machine_info(), "layers": layers, "eager": args.eager}
        if args.throughput:
            result["throughput"] = throughput(args, layers, tokenizer)
        if args.sweep:
            result["sweep"] = sweep_vs_hf(args, layers, model, tokenizer)
    result["worker_log"] = list(dict.fromkeys(captured.lines))
    result["worker_op_backends"] = [m.group(1) for line in captured.lines
                                    if (m := re.search(r"op backend on cpu: (\w+)", line))]
    result["main_op_backend"] = main_backend
    result["command"] = " ".join([".venv-vllm/bin/python -P bench/bench_vllm.py",
                                  *(argv if argv is not None else os.sys.argv[1:])])
    write_results(result, args.out)
    if "throughput" in result:
        print(json.dumps(result["throughput"]["ratios"]))
    if "sweep" in result:
        print(json.dumps({k: result["sweep"][k] for k in ("vllm_s", "speedup_vs_hf_loop",
                                                           "identical_rows_vs_hf_emokern")}))
    print("workers' op backends:", result["worker_op_backends"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
