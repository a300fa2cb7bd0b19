"""Projection levels and bounds on the CPU kernel: what a call with bounds costs beside the same
call with only additive weights, and beside the same call with readings on.

For each shape and dtype, side by side in one run (rounds interleave the variants, ratios are
medians of per-round ratios, as in ``bench/bench_ops.py``), every variant one
``torch.ops.emokern.steer_`` call on the same tensors (no Python wrapper: the kernel's cost):

``add``
    additive weights only: no readings, no bounds;
``read``
    the same with readings on (running statistics: the monitor's call);
``guard``
    ``add`` with an upper bound on one emotion that no row reaches in this call (a guard rail:
    the cost of checking alone);
``caps``
    ``add`` with bounds: an upper bound on two emotions at the 90th percentile of their
    projections after the push (about one row in five out of bounds and corrected), the other
    emotions open;
``caps_read``
    ``caps`` with readings on;
``levels``
    ``add`` with a level on every emotion (every row corrected: the erase / level case).

Ratios: caps/add (target: at most :data:`TARGET`), guard/add, caps/read, caps_read/read,
read/add, levels/add.
Every variant is first checked against :func:`emokern.ops.reference.ref_steer_`. With one
torch thread each round is also timed in thread CPU time (``time.thread_time``): on a shared
machine the wall clock also counts the time the thread waits for a CPU, the CPU time does not.

Full run (4 shapes, fp32 and bf16, one thread; about a minute on 2 cores), writing
``bench/results/levels-<cpu>.{json,md}``::

    python bench/bench_levels.py [--dtypes fp32,bf16] [--threads 1[,2]] [--rounds 40]
                                 [--max-seconds 6] [--stem levels-amd-epyc] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from emokern.benchmarks.ops import DTYPES, OpInputs, OpShape, machine_info
from emokern.files import write_json, write_text
from emokern.ops import build, unit_gram
from emokern.ops.reference import ref_steer_

RESULTS = Path(__file__).resolve().parent / "results"
#: The issue's target: a call with clamps costs at most this much more than the same call with
#: only additive weights.
TARGET = 1.15
VARIANTS = ("add", "read", "guard", "caps", "caps_read", "levels")
INF = float("inf")


def level_shapes() -> list[OpShape]:
    """Prefill (a batch of prompts, one long prompt) and decode (one row per sequence)."""
    return [OpShape("prefill", 4, 512, 576, 6), OpShape("prefill", 1, 2048, 576, 8),
            OpShape("decode", 64, 1, 576, 6), OpShape("decode", 256, 1, 2048, 8)]


class LevelInputs(OpInputs):
    """The op benchmark's seeded tensors of one (shape, dtype), plus the bounds of each
    variant."""

    def __init__(self, shape: OpShape, dtype: torch.dtype, seed: int = 0):
        super().__init__(shape, dtype, seed)
        b, k = shape.batch, shape.n_vec
        self.gram = unit_gram(self.vectors)
        # Projections after the push (no norm preservation): p + sum_j w_j ||v_j|| G_j.
        p_after = (self.pristine.float() @ self.unit.T
                   + ((self.weights * self.vectors.norm(dim=1)) @ self.gram)[:, None, :])
        self.caps = torch.empty(b, 2, k)
        self.caps[:, 0], self.caps[:, 1] = -INF, INF
        cap = torch.quantile(p_after.reshape(-1, k)[:, :2], 0.9, dim=0)
        self.caps[:, 1, :2] = cap
        self.guard = torch.empty(b, 2, k)
        self.guard[:, 0], self.guard[:, 1] = -INF, INF
        self.guard[:, 1, 0] = p_after[..., 0].max() + 1.0
        self.levels = torch.empty(b, 2, k)
        self.levels[:, 0] = self.levels[:, 1] = p_after.reshape(-1, k).mean(dim=0)
        self.corrected = float(((p_after[..., :2] > cap).any(dim=-1)).float().mean())

    def run(self, variant: str) -> None:
        run = self.running.tensors() if variant in ("read", "caps_read") else (None, None, None)
        bounds = {"guard": self.guard, "caps": self.caps, "caps_read": self.caps,
                  "levels": self.levels}.get(variant)
        gram = self.gram if bounds is not None else None
        torch.ops.emokern.steer_.default(self.hidden, self.vectors, self.weights, None, False,
                                         None, *run, bounds, gram)


def check_variant(inp: LevelInputs, variant: str) -> None:
    """One call from the pristine state against the reference (flash-attention's rule would be
    stricter; here the dtype's tolerance, as the op benchmark checks)."""
    bounds = {"guard": inp.guard, "caps": inp.caps, "caps_read": inp.caps,
              "levels": inp.levels}.get(variant)
    want = inp.pristine.float().clone()
    ref_steer_(want, inp.vectors, inp.weights, None, False, None, None, None, None, bounds,
               inp.gram if bounds is not None else None)
    inp.reset()
    inp.run(variant)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[inp.dtype]
    torch.testing.assert_close(inp.hidden.float(), want, rtol=tol, atol=tol * 4)
    inp.reset()


def time_variants(inp: LevelInputs, rounds: int, max_seconds: float, cpu_clock: bool,
                  min_round_seconds: float = 3e-3) -> tuple[dict, dict]:
    """Per-call seconds of each variant in each round (wall clock, and thread CPU time when
    ``cpu_clock``); the variants alternate within a round. Every call starts from the pristine
    state (restored untimed: a call repeated on its own output would find more rows at their
    caps, pushed over again)."""
    for v in VARIANTS:
        for _ in range(3):
            inp.reset()
            inp.run(v)
    inp.reset()
    start = time.perf_counter()
    inp.run("add")
    calls = max(1, min(2000, int(min_round_seconds / max(time.perf_counter() - start, 1e-7))))
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    started = time.perf_counter()
    for done in range(rounds):
        for v in VARIANTS:
            spent_wall = spent_cpu = 0.0
            for _ in range(calls):
                inp.reset()
                c0, t0 = time.thread_time(), time.perf_counter()
                inp.run(v)
                spent_wall += time.perf_counter() - t0
                spent_cpu += time.thread_time() - c0
            wall[v].append(spent_wall / calls)
            cpu[v].append(spent_cpu / calls)
        if done >= 4 and time.perf_counter() - started > max_seconds:
            break
    return wall, (cpu if cpu_clock else {})


def _ratio(num, den) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    return {"caps/add": _ratio(times["caps"], times["add"]),
            "guard/add": _ratio(times["guard"], times["add"]),
            "caps/read": _ratio(times["caps"], times["read"]),
            "caps_read/read": _ratio(times["caps_read"], times["read"]),
            "read/add": _ratio(times["read"], times["add"]),
            "levels/add": _ratio(times["levels"], times["add"])}


def measure_case(shape: OpShape, dtype: str, rounds: int, max_seconds: float) -> dict[str, Any]:
    inp = LevelInputs(shape, DTYPES[dtype])
    for v in VARIANTS:
        check_variant(inp, v)
    threads = torch.get_num_threads()
    wall, cpu = time_variants(inp, rounds, max_seconds, cpu_clock=threads == 1)
    row: dict[str, Any] = {"kind": shape.kind, "batch": shape.batch, "seq_len": shape.seq_len,
                           "dim": shape.dim, "n_vec": shape.n_vec, "dtype": dtype,
                           "threads": threads, "isa": build.cpu_isa(),
                           "rows_corrected_by_caps": inp.corrected, "rounds": len(wall["add"]),
                           "median_us": {v: statistics.median(t) * 1e6 for v, t in wall.items()},
                           "ratios": ratios(wall)}
    if cpu:
        row["cpu_median_us"] = {v: statistics.median(t) * 1e6 for v, t in cpu.items()}
        row["cpu_ratios"] = ratios(cpu)
    clock = row.get("cpu_ratios", row["ratios"])
    row["meets_target"] = clock["caps/add"] <= TARGET
    return row


def _label(row) -> str:
    return f"{row['kind']} {row['batch']}×{row['seq_len']}×{row['dim']}, K={row['n_vec']}"


def format_table(rows, machine) -> str:
    load, load_end = machine.get("load_average"), machine.get("load_average_end")
    lines = [
        "# Projection levels and bounds on the CPU kernel: cost beside additive weights", "",
        f"torch {machine.get('torch')}, CPU {machine.get('cpu_model')!r} "
        f"({machine.get('cpu_detail')}), {machine.get('cpu_count')} cores, kernel instruction "
        f"set {machine.get('cpu_isa')}"
        + (f", 1-min load average at start {load[0]:.1f}" if load else "")
        + (f", at end {load_end[0]:.1f}" if load_end else "")
        + (f", CPUs busy with other processes at start: {machine['busy_cpus_at_start']:.1f}"
           if machine.get("busy_cpus_at_start") is not None else "") + ".", "",
        "Each variant is one `torch.ops.emokern.steer_` call (no wrapper) on the same tensors: "
        "add = additive weights only; read = with running statistics; caps = add with an upper "
        "bound on two emotions at the 90th percentile of their projections after the push "
        "(corr. = the share of rows it corrects); guard = add with an upper bound on one "
        "emotion that no row reaches (the cost of checking); caps+read = caps with running "
        "statistics; "
        "levels = add with a level on every emotion (every row corrected). Ratios are medians "
        "of per-round ratios (variants interleaved). With 1 thread the times and ratios are "
        "thread CPU time (the wall clock of a shared machine also counts waiting for a CPU; "
        "its ratios are in the JSON); with 2 threads, wall clock. "
        f"Target: caps/add ≤ {TARGET} (✗ marks a miss).", "",
        "| case | dtype | threads | add µs | read µs | caps µs | corr. | caps/add | guard/add "
        "| caps/read | caps+read/read | read/add | levels/add |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        us = row.get("cpu_median_us", row["median_us"])
        r = row.get("cpu_ratios", row["ratios"])
        mark = "" if row["meets_target"] else " ✗"
        lines.append(
            f"| {_label(row)} | {row['dtype']} | {row['threads']} | {us['add']:.1f} | "
            f"{us['read']:.1f} | {us['caps']:.1f} | {row['rows_corrected_by_caps']:.0%} | "
            f"{r['caps/add']:.2f}{mark} | {r['guard/add']:.2f} | {r['caps/read']:.2f} | "
            f"{r['caps_read/read']:.2f} | "
            f"{r['read/add']:.2f} | {r['levels/add']:.2f} |")
    met = sum(row["meets_target"] for row in rows)
    lines += ["", f"caps/add ≤ {TARGET}: {met}/{len(rows)} rows."]
    return "\n".join(lines) + "\n"


def cpu_detail() -> str:
    """Family and model from /proc/cpuinfo (e.g. "family 23 model 1": AMD Zen 1)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
    model = re.search(r"^model\s*:\s*(\d+)", text, re.M)
    return f"family {family.group(1) if family else '?'} model {model.group(1) if model else '?'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", default="1",
                        help="torch threads, e.g. 1,2 (on a machine other processes keep busy, "
                             "a second thread's waits for a CPU dominate the wall clock)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--max-seconds", type=float, default=6.0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--stem", default="levels-amd-epyc")
    args = parser.parse_args(argv)
    if not build.load_cpu():
        raise SystemExit("the CPU kernel is not available (see `emokern info`)")
    machine = machine_info()
    machine["cpu_detail"] = cpu_detail()
    previous = torch.get_num_threads()
    rows = []
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for shape in level_shapes():
                for dtype in args.dtypes.split(","):
                    row = measure_case(shape, dtype, args.rounds, args.max_seconds)
                    rows.append(row)
                    r = row.get("cpu_ratios", row["ratios"])
                    print(f"{_label(row)} {dtype} {threads}t: caps/add {r['caps/add']:.2f}, "
                          f"guard/add {r['guard/add']:.2f}, caps/read {r['caps/read']:.2f}, "
                          f"levels/add {r['levels/add']:.2f}",
                          flush=True)
    finally:
        torch.set_num_threads(previous)
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    table = format_table(rows, machine)
    print()
    print(table)
    out = Path(args.out)
    document = {"machine": machine, "target_caps_over_add": TARGET, "rows": rows}
    for path in (write_json(out / f"{args.stem}.json", document),
                 write_text(out / f"{args.stem}.md", table)):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
