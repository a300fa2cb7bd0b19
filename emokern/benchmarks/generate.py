"""End-to-end steering benchmark: emokern vs the naive forward-hook baseline, as ratios.

Used by ``bench/bench_generate.py`` (which writes ``bench/results/generate.*``) and by
``emokern bench generate [--model PATH] [--batch-sizes ...] [--out DIR]``. Three measurements,
all ratios taken within one run (whole-run wall time on shared machines varies by ±20–30%):

(a) **decode overhead** — steered over unsteered decode tokens/s, paired per step, at each
    batch size, for emokern (a distinct mix per row, monitor on), the naive hooks and the
    ``steering-vectors`` library (:mod:`emokern.benchmarks.decode`);
(b) **distinct vs shared mixes** at the largest batch, emokern and the plain hooks (one
    shared vector vs a per-row ``h.add_((W @ V)[:, None])``) (:mod:`emokern.benchmarks.decode`);
(c) **sweep** — 336 sequences, emokern in batched ``generate`` calls vs the baseline's loop
    over the 42 conditions (:mod:`emokern.benchmarks.mix_sweep`).

This module runs them (:func:`run_generate_benchmark`) and reports the result
(:func:`format_table`, :func:`plot_results`, :func:`save_results`). The workload (prompts,
bank, layers) is in :mod:`emokern.benchmarks.workload`, the baselines in
:mod:`emokern.benchmarks.hook_baselines`.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emokern.benchmarks.decode import decode_overhead
from emokern.benchmarks.hook_baselines import steering_vectors_available, steering_vectors_version
from emokern.benchmarks.mix_sweep import sweep, warm_up
from emokern.benchmarks.workload import benchmark_bank, middle_layers
from emokern.files import atomic_write, write_text
from emokern.machine import machine_info
from emokern.models import load_model
from emokern.ops import available_backends

__all__ = ["DEFAULT_BATCH_SIZES", "TARGETS", "format_table", "machine_record", "plot_results",
           "run_generate_benchmark", "save_results"]

DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
TARGETS = {"decode": 0.98, "mixes": 0.98, "sweep": 3.0}


# ------------------------------------------------------------------------ the whole run


def machine_record() -> dict[str, Any]:
    """:func:`emokern.machine.machine_info` plus the op backends available here (reported
    without compiling) and the ``steering-vectors`` version when it imports."""
    info = machine_info()
    info["backends"] = available_backends()
    version = steering_vectors_version()
    if version is not None:
        info["steering_vectors"] = version
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
    warm_up(model, tokenizer, bank, layers)
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
        "machine": machine_record(),
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
        lines += ["", f"(b) batch {mixes['batch']}: {mixes['batch']} distinct mixes vs one shared "
                      f"mix, paired per step (target >= {TARGETS['mixes']})", "",
                  "| system | shared ms/step | distinct ms/step | shared / distinct "
                  "| distinct, tokens/s vs unsteered |",
                  "|---|---:|---:|---:|---:|"]
        for label, key, tag in (("emokern", "emokern", "ratio"),
                                ("plain hooks (shared: naive `h + delta`; distinct: per-row "
                                 "`h.add_((W @ V)[:, None])`)", "hook", "hook_ratio")):
            if f"{key}_distinct_ms" not in mixes:  # results of older versions of this harness
                continue
            q = mixes[f"{tag}_distinct_vs_shared_quartiles"]
            u = mixes[f"{key}_distinct_vs_unsteered"]
            lines.append(f"| {label} | {mixes[f'{key}_shared_ms']:.1f} | "
                         f"{mixes[f'{key}_distinct_ms']:.1f} | {q['median']:.3f} "
                         f"[{q['q25']:.3f}, {q['q75']:.3f}] | {u['median']:.3f} "
                         f"[{u['q25']:.3f}, {u['q75']:.3f}] |")
        if "emokern_distinct_vs_hook_distinct" in mixes:
            q = mixes["emokern_distinct_vs_hook_distinct"]
            lines += ["", f"Distinct mixes, per-row hook time / emokern time (paired): "
                          f"{q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]."]
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
        for name, label in (("per_row", "per-row hooks, emokern's batches"),
                            ("naive", "naive hooks loop"),
                            ("steering_vectors", "steering-vectors loop")):
            if f"{name}_s" not in s:
                continue
            calls = s.get(f"{name}_generate_calls", s["naive_generate_calls"])
            lines.append(f"| {label} | {calls} | {s[f'{name}_s']:.1f} | "
                         f"{s[f'{name}_prefill_s']:.1f} | {s[f'{name}_decode_s']:.1f} | "
                         f"{s[f'speedup_vs_{name}']:.2f}x / "
                         f"{s[f'decode_speedup_vs_{name}']:.2f}x | "
                         f"{s[f'identical_rows_vs_{name}']}/{s['sequences']} |")
    load = result.get("load_average", {})
    if load:
        lines += ["", f"Load average (1/5/15 min) before {load['before']}, after {load['after']}; "
                      f"{result['machine']['cpu_count']} CPUs "
                      f"({result['machine'].get('cpu_model', 'CPU model unknown')}, kernel "
                      f"instruction set {result['machine'].get('cpu_kernel', {}).get('isa')}), "
                      f"{result['machine']['torch_threads']} torch threads."]
    return "\n".join(lines) + "\n"


def plot_results(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw (a) and (c) into a PNG at ``path`` (atomically)."""
    # Imported here: matplotlib is heavy and only needed for the figure.
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
        if "hook_distinct_ms" in mixes:
            labels += ["hook\nshared", "hook\nper-row"]
            values += [mixes["hook_shared_ms"], mixes["hook_distinct_ms"]]
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())



def save_results(result: Mapping[str, Any], out_dir: str | os.PathLike,
                 stem: str = "generate") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``, atomically."""
    out = Path(out_dir)
    return [write_text(out / f"{stem}.json", json.dumps(result, indent=2) + "\n"),
            write_text(out / f"{stem}.md", format_table(result)),
            plot_results(result, out / f"{stem}.png")]
