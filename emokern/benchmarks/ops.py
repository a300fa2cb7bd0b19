r"""The op benchmark: the fused ``steer_`` against what plain PyTorch does with the same tensors.

For each shape and dtype, side by side in one run (rounds interleave the variants, so ratios
are paired and survive a noisy machine):

``fused``
    :func:`emokern.steer_` on the CPU backend, Python wrapper included, with running statistics
    and without ``proj_out`` — the public call a decode step makes.
``fused_op``
    The same kernel through ``torch.ops.emokern.steer_`` (no Python wrapper): the kernel's own
    cost, to split the wrapper's share off.
``naive``
    What a forward hook of today's steering libraries runs: the projections
    ``h.float() @ unit.T`` into a new tensor, ``h + (w @ V)[:, None, :]`` into a new tensor,
    then the running update ``sum += p.sum(1)``, ``count += T``, ``last = p[:, -1]``.
``torch``
    The best plain-PyTorch in-place sequence with preallocated buffers: ``matmul(..., out=)``
    for the projections, ``mm(w, V, out=)`` and ``h.add_`` (``addmm_`` in float32 decode),
    ``sum(..., out=)`` and in-place running updates.
``torch_native`` (bf16, fp16)
    The same in-place sequence in the tensors' own dtype, as a user writing bf16 code does:
    ``mm(h, unit.T)`` in bf16/fp16 (oneDNN's low-precision kernels, float32 accumulation
    inside), ``h.add_(delta)``. ×torch is against the faster of ``torch`` and this.
``copy``
    ``out.copy_(hidden)`` into a preallocated tensor: a memory-bandwidth reference that reads
    one buffer and writes another.
``inplace``
    ``hidden.mul_(1.0)``: reads and writes the same buffer, as the op does; the in-place
    bandwidth reference.
``bare_op``
    One bare in-place op on the same tensor, ``h.add_(delta[:, None, :])``: the floor a decode
    call's dispatch can reach.

Every variant is checked against :func:`emokern.ops.reference.ref_steer_` before it is timed.
Each row records the instruction set the kernel ran (:func:`emokern.ops.build.cpu_isa`:
``avx512``, ``avx2``, ``neon``, ``default``; ``EMOKERN_CPU_CAPABILITY`` caps it before the
kernel loads) and the thread count.
Bandwidth counts one read and one write of ``hidden``:
:math:`\text{GB/s} = 2 B T D \cdot \text{itemsize} / t`.

:func:`run_ops_benchmark` returns one row per (shape, dtype); :func:`format_ratio_table` turns
rows into the markdown table; :func:`save_results` writes both atomically.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from emokern.files import write_json, write_text
from emokern.machine import busy_cpus
from emokern.machine import machine_info as common_machine_info
from emokern.ops import build, steer_
from emokern.ops.reference import ref_steer_
from emokern.ops.running import RunningProjections

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("fused", "fused_op", "naive", "torch", "torch_native", "copy", "inplace", "bare_op")

#: Targets of the op benchmark: the fused op against plain PyTorch on the same tensors.
TARGETS = {
    "prefill_speedup_vs_naive": 2.0,         # fused at least 2x faster than the naive hook
    "prefill_speedup_vs_torch": 1.0,         # faster than the best in-place torch sequence
    "prefill_copy_fraction_fp32": 0.7,       # float32: at least 70% of copy bandwidth
    "prefill_copy_fraction_lowp": 0.5,       # bf16/fp16: at least half of copy bandwidth
    "decode_speedup_vs_torch": 1.0,          # faster than the best torch sequence
    "decode_speedup_vs_naive": 1.0,          # faster than naive at every shape
    "decode_fused_over_bare": 1.5,           # wrapper included, at most 1.5x one bare add_
}


@dataclass(frozen=True)
class OpShape:
    """One benchmark shape: ``hidden [batch, seq_len, dim]``, ``n_vec`` emotion vectors."""

    kind: str  # "decode" or "prefill"
    batch: int
    seq_len: int
    dim: int
    n_vec: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"{self.kind} B={self.batch} T={self.seq_len} D={self.dim} K={self.n_vec}"


def decode_shapes() -> list[OpShape]:
    """B in {1, 8, 64, 256}, T = 1, D in {576, 2048, 4096}, K in {1, 8, 32}."""
    return [OpShape("decode", b, 1, d, k)
            for d in (576, 2048, 4096) for k in (1, 8, 32) for b in (1, 8, 64, 256)]


def prefill_shapes() -> list[OpShape]:
    """B*T in {4096, 32768, 262144} at D = 576 and 65536 at D = 2048, K = 8. The largest
    tensors exceed the L3 cache (262144 x 576 float32 is 604 MB)."""
    return [OpShape("prefill", 1, 4096, 576, 8), OpShape("prefill", 4, 8192, 576, 8),
            OpShape("prefill", 8, 32768, 576, 8), OpShape("prefill", 2, 32768, 2048, 8)]


def headline_shapes() -> list[OpShape]:
    """A small grid for quick runs and pytest-benchmark."""
    return [OpShape("decode", 1, 1, 576, 8), OpShape("decode", 8, 1, 2048, 8),
            OpShape("decode", 64, 1, 4096, 32), OpShape("decode", 256, 1, 4096, 32),
            OpShape("prefill", 4, 8192, 576, 8), OpShape("prefill", 2, 32768, 2048, 8)]


# ----------------------------------------------------------------------------- the variants


class OpInputs:
    """Seeded tensors of one (shape, dtype) and every variant's preallocated buffers.

    ``pristine`` keeps the initial ``hidden``; the variants steer ``hidden`` in place call after
    call (the values drift by ``delta`` per call, harmless at benchmark lengths).
    """

    def __init__(self, shape: OpShape, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        b, t, d, k = shape.batch, shape.seq_len, shape.dim, shape.n_vec
        self.shape, self.dtype = shape, dtype
        self.pristine = torch.randn(b, t, d, generator=gen).to(dtype)
        self.hidden = self.pristine.clone()
        self.vectors = torch.randn(k, d, generator=gen)
        self.unit = self.vectors / self.vectors.norm(dim=1, keepdim=True)
        self.weights = torch.randn(b, k, generator=gen) * 0.1
        self.running = RunningProjections(b, k)
        # Buffers of the plain-torch in-place variant.
        self.proj = torch.empty(b, t, k)
        self.proj_sum = torch.empty(b, k)
        self.delta = torch.empty(b, d)
        self.delta_lowp = torch.empty(b, d, dtype=dtype)
        self.hidden_f32 = torch.empty(b, t, d) if dtype != torch.float32 else None
        # The dtype's own sequence: unit vectors and projections in the storage dtype.
        self.unit_lowp = self.unit.to(dtype)
        self.proj_lowp = torch.empty(b, t, k, dtype=dtype)
        # The copy target and the bare op's operand.
        self.out = torch.empty_like(self.hidden)
        self.bare_delta = (self.weights @ self.vectors).to(dtype)

    def reset(self) -> None:
        self.hidden.copy_(self.pristine)
        self.running.reset()


def run_fused(inp: OpInputs) -> None:
    steer_(inp.hidden, inp.vectors, inp.weights, running=inp.running, backend="cpu")


def run_fused_op(inp: OpInputs) -> None:
    run = inp.running
    torch.ops.emokern.steer_.default(inp.hidden, inp.vectors, inp.weights, None, False, None,
                                     run.sum, run.count, run.last)


def run_naive(inp: OpInputs) -> torch.Tensor:
    h = inp.hidden
    p = h.float() @ inp.unit.T                                   # [B, T, K], new
    steered = h + (inp.weights @ inp.vectors).to(h.dtype)[:, None, :]  # new
    inp.running.sum += p.sum(1)
    inp.running.count += h.shape[1]
    inp.running.last.copy_(p[:, -1])
    return steered


def run_torch_inplace(inp: OpInputs) -> None:
    h, run = inp.hidden, inp.running
    seq_len = h.shape[1]
    x = h
    if inp.hidden_f32 is not None:  # float32 projections of low-precision rows
        inp.hidden_f32.copy_(h)
        x = inp.hidden_f32
    if seq_len == 1:
        p = inp.proj.view(h.shape[0], -1)
        torch.mm(x.view(h.shape[0], -1), inp.unit.T, out=p)
        if h.dtype == torch.float32:
            h.view(h.shape[0], -1).addmm_(inp.weights, inp.vectors)
        else:
            torch.mm(inp.weights, inp.vectors, out=inp.delta)
            inp.delta_lowp.copy_(inp.delta)
            h.view(h.shape[0], -1).add_(inp.delta_lowp)
        run.sum.add_(p)
        run.count.add_(1)
        run.last.copy_(p)
        return
    torch.matmul(x, inp.unit.T, out=inp.proj)
    torch.mm(inp.weights, inp.vectors, out=inp.delta)
    if h.dtype == torch.float32:
        h.add_(inp.delta[:, None, :])
    else:
        inp.delta_lowp.copy_(inp.delta)
        h.add_(inp.delta_lowp[:, None, :])
    torch.sum(inp.proj, dim=1, out=inp.proj_sum)
    run.sum.add_(inp.proj_sum)
    run.count.add_(seq_len)
    run.last.copy_(inp.proj[:, -1])


def run_torch_native(inp: OpInputs) -> None:
    h, run = inp.hidden, inp.running
    seq_len = h.shape[1]
    torch.matmul(h, inp.unit_lowp.T, out=inp.proj_lowp)  # bf16/fp16 projections
    torch.mm(inp.weights, inp.vectors, out=inp.delta)
    inp.delta_lowp.copy_(inp.delta)
    h.add_(inp.delta_lowp[:, None, :])
    p = inp.proj_lowp
    run.sum.add_(p.sum(dim=1, dtype=torch.float32))
    run.count.add_(seq_len)
    run.last.copy_(p[:, -1])


def run_copy(inp: OpInputs) -> None:
    inp.out.copy_(inp.hidden)


def run_inplace(inp: OpInputs) -> None:
    inp.hidden.mul_(1.0)


def run_bare_op(inp: OpInputs) -> None:
    inp.hidden.add_(inp.bare_delta[:, None, :])


VARIANT_FUNCTIONS: dict[str, Callable[[OpInputs], Any]] = {
    "fused": run_fused, "fused_op": run_fused_op, "naive": run_naive,
    "torch": run_torch_inplace, "torch_native": run_torch_native, "copy": run_copy,
    "inplace": run_inplace, "bare_op": run_bare_op,
}


def variants_for(shape: OpShape, dtype: str = "fp32") -> list[str]:
    """The variants timed at ``shape`` in ``dtype`` (the bare op is the decode dispatch floor;
    the dtype's own sequence is ``torch`` itself in float32)."""
    return [v for v in VARIANTS if (v != "bare_op" or shape.kind == "decode")
            and (v != "torch_native" or dtype != "fp32")]


# ----------------------------------------------------------------------------- checks


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # Outputs rounded to the storage dtype may differ by one unit in the last place.
    return {torch.float32: {"rtol": 1e-5, "atol": 1e-4},
            torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
            torch.float16: {"rtol": 2e-3, "atol": 2e-3}}[dtype]


def check_variant(variant: str, inp: OpInputs) -> None:
    """Run ``variant`` once from the pristine state and compare it with the reference.

    Raises
    ------
    AssertionError
        When the variant's result differs from :func:`ref_steer_` beyond the dtype tolerance.
    """
    shape = inp.shape
    want = inp.pristine.clone()
    want_run = RunningProjections(shape.batch, shape.n_vec)
    want_proj = torch.empty(shape.batch, shape.seq_len, shape.n_vec)
    ref_steer_(want, inp.vectors, inp.weights, None, False, want_proj, *want_run.tensors())
    inp.reset()
    result = VARIANT_FUNCTIONS[variant](inp)
    tol = _tolerance(inp.dtype)
    proj_tol = {"rtol": 1e-4, "atol": 1e-3}
    if variant in ("fused", "fused_op", "torch", "torch_native"):
        torch.testing.assert_close(inp.hidden, want, **tol)
    elif variant == "naive":
        torch.testing.assert_close(result, want, **tol)
        torch.testing.assert_close(inp.hidden, inp.pristine, rtol=0, atol=0)
    elif variant == "copy":
        assert torch.equal(inp.out, inp.pristine)
    elif variant == "inplace":
        assert torch.equal(inp.hidden, inp.pristine)
    elif variant == "bare_op":
        torch.testing.assert_close(inp.hidden, inp.pristine + inp.bare_delta[:, None, :], **tol)
    if variant in ("fused", "fused_op", "torch", "naive"):
        assert torch.equal(inp.running.count, want_run.count)
        torch.testing.assert_close(inp.running.sum, want_run.sum, **proj_tol)
        torch.testing.assert_close(inp.running.last, want_run.last, **proj_tol)
    elif variant == "torch_native":  # projections rounded to the storage dtype
        assert torch.equal(inp.running.count, want_run.count)
        low = {"rtol": 2e-2, "atol": 5e-2 * shape.dim ** 0.5}
        torch.testing.assert_close(inp.running.last, want_run.last, **low)
    inp.reset()


# ----------------------------------------------------------------------------- timing


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0], ordered[0], ordered[0]
    q25, median, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q25, median, q75


def _calls_per_round(fn: Callable[[], Any], min_round_seconds: float) -> int:
    """Calls that take at least ``min_round_seconds`` together (1 for slow calls)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(10_000, int(min_round_seconds / max(once, 1e-7))))


def time_variants(inp: OpInputs, variants: Sequence[str], *, rounds: int, max_seconds: float,
                  min_round_seconds: float = 2e-3, warmup: int = 2) -> dict[str, list[float]]:
    """Per-call seconds of each variant in each round; the variants alternate within a round.

    At least 3 rounds are taken, at most ``rounds``, stopping early once ``max_seconds`` have
    passed.
    """
    fns = {v: (lambda f=VARIANT_FUNCTIONS[v]: f(inp)) for v in variants}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {v: _calls_per_round(fn, min_round_seconds) for v, fn in fns.items()}
    times: dict[str, list[float]] = {v: [] for v in variants}
    started = time.perf_counter()
    for done in range(rounds):
        for v, fn in fns.items():
            n = calls[v]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[v].append((time.perf_counter() - t0) / n)
        if done >= 2 and time.perf_counter() - started > max_seconds:
            break
    return times


def _paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def measure_case(shape: OpShape, dtype: str, *, rounds: int = 30, max_seconds: float = 4.0,
                 check: bool = True) -> dict[str, Any]:
    """Check, then time, every variant at one (shape, dtype); one result row.

    Returns
    -------
    dict
        ``shape`` fields, ``dtype``, ``bytes`` (read + write of hidden), ``rounds``, per variant
        ``{median_us, q25_us, q75_us, iqr_us, gbps}``, ``copy_fraction`` (copy time / fused
        time) and paired ``ratios``: ``speedup_vs_naive``, ``speedup_vs_torch`` (other's time /
        fused time; ``torch`` is the faster of ``torch`` and ``torch_native`` per round),
        ``inplace_fraction`` (in-place read-write time / fused time), ``fused_over_bare`` and
        ``fused_op_over_bare`` (decode).
    """
    inp = OpInputs(shape, DTYPES[dtype])
    variants = variants_for(shape, dtype)
    if check:
        for variant in variants:
            check_variant(variant, inp)
    times = time_variants(inp, variants, rounds=rounds, max_seconds=max_seconds)
    n_bytes = 2 * inp.hidden.numel() * inp.hidden.element_size()
    row: dict[str, Any] = {**asdict(shape), "dtype": dtype, "bytes": n_bytes,
                           "isa": build.cpu_isa(), "threads": torch.get_num_threads(),
                           "rounds": len(times["fused"]), "variants": {}}
    for variant, values in times.items():
        q25, median, q75 = _quantiles(values)
        row["variants"][variant] = {
            "median_us": median * 1e6, "q25_us": q25 * 1e6, "q75_us": q75 * 1e6,
            "iqr_us": (q75 - q25) * 1e6, "gbps": n_bytes / median / 1e9}
    ratios = {
        "speedup_vs_naive": _paired_ratio(times["naive"], times["fused"]),
        "speedup_vs_torch": _paired_ratio(
            [min(pair) for pair in zip(times["torch"], times.get("torch_native", times["torch"]),
                                       strict=True)], times["fused"]),
        "speedup_vs_torch_f32proj": _paired_ratio(times["torch"], times["fused"]),
        "copy_fraction": _paired_ratio(times["copy"], times["fused"]),
        "inplace_fraction": _paired_ratio(times["inplace"], times["fused"]),
        "wrapper_share": 1.0 - _paired_ratio(times["fused_op"], times["fused"]),
    }
    if "bare_op" in times:
        ratios["fused_over_bare"] = _paired_ratio(times["fused"], times["bare_op"])
        ratios["fused_op_over_bare"] = _paired_ratio(times["fused_op"], times["bare_op"])
    row["ratios"] = ratios
    row["verdicts"] = verdicts(row)
    del inp
    return row


def verdicts(row: Mapping[str, Any]) -> dict[str, bool]:
    """Which of :data:`TARGETS` this row meets."""
    r = row["ratios"]
    if row["kind"] == "prefill":
        copy = TARGETS["prefill_copy_fraction_fp32" if row["dtype"] == "fp32"
                       else "prefill_copy_fraction_lowp"]
        return {"speedup_vs_naive": r["speedup_vs_naive"] >= TARGETS["prefill_speedup_vs_naive"],
                "speedup_vs_torch": r["speedup_vs_torch"] > TARGETS["prefill_speedup_vs_torch"],
                "copy_fraction": r["copy_fraction"] >= copy}
    return {"speedup_vs_naive": r["speedup_vs_naive"] > TARGETS["decode_speedup_vs_naive"],
            "speedup_vs_torch": r["speedup_vs_torch"] > TARGETS["decode_speedup_vs_torch"],
            "fused_over_bare": r["fused_over_bare"] <= TARGETS["decode_fused_over_bare"]}


def run_ops_benchmark(shapes: Iterable[OpShape] | None = None,
                      dtypes: Sequence[str] = ("fp32", "bf16"), repeats: int = 30, *,
                      max_seconds: float = 4.0, threads: int | None = None, check: bool = True,
                      progress: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Check, then time, the variants at every (shape, dtype).

    Parameters
    ----------
    shapes : iterable of OpShape, optional
        Default: :func:`decode_shapes` then :func:`prefill_shapes`.
    dtypes : sequence of {"fp32", "bf16", "fp16"}
        Storage dtypes of ``hidden``.
    repeats : int
        Rounds per case (at least 3; fewer when ``max_seconds`` runs out first).
    max_seconds : float
        Time budget per case, checks excluded.
    threads : int, optional
        torch intra-op threads for the run (default: leave torch's setting).
    check : bool
        Compare every variant with the reference before timing it.
    progress : callable, optional
        Receives one line per finished case.

    Returns
    -------
    list of dict
        One row per (shape, dtype), see :func:`measure_case`.
    """
    if not build.load_cpu():
        raise RuntimeError("the CPU kernel is not available (see `emokern info`); the op "
                           "benchmark measures it")
    shapes = list(shapes) if shapes is not None else decode_shapes() + prefill_shapes()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = []
        for shape in shapes:
            for dtype in dtypes:
                row = measure_case(shape, dtype, rounds=repeats, max_seconds=max_seconds,
                                   check=check)
                rows.append(row)
                if progress is not None:
                    progress(_progress_line(row))
        return rows
    finally:
        torch.set_num_threads(previous)


def _progress_line(row: Mapping[str, Any]) -> str:
    f, r = row["variants"]["fused"], row["ratios"]
    text = (f"{OpShape(**{k: row[k] for k in ('kind', 'batch', 'seq_len', 'dim', 'n_vec')}).label}"
            f" {row['dtype']}: fused {f['median_us']:.1f} us (op "
            f"{row['variants']['fused_op']['median_us']:.1f} us), {f['gbps']:.1f} GB/s, "
            f"x{r['speedup_vs_naive']:.2f} vs naive, x{r['speedup_vs_torch']:.2f} vs torch, "
            f"{r['copy_fraction']:.2f} of copy")
    if "fused_over_bare" in r:
        text += f", {r['fused_over_bare']:.2f}x bare op"
    return text


# ----------------------------------------------------------------------------- reporting


def cpu_vector_features() -> list[str]:
    """The CPU's vector extensions that matter to the kernel (from ``/proc/cpuinfo``): the
    AVX2/AVX-512 family, AVX-512 bf16/fp16, or NEON/SVE on ARM."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve", "sve2", "bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [name for name in wanted if name in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """:func:`emokern.machine.machine_info` (versions, CPU, threads, kernel build, load) plus
    the instruction set the kernel runs (and the -march of its JIT build), PyTorch's CPU
    capability, MKL's instruction cap, and the CPU's vector extensions."""
    build.load_cpu()  # so that the record says where the measured kernel came from
    info = common_machine_info()
    info["cpu_isa"] = build.cpu_isa()
    jit = build.build_info()["cpu"].get("source") == "jit"
    info["kernel_march"] = next((f.removeprefix("-march=") for f in build.cpu_cflags()
                                 if f.startswith("-march=")), None) if jit else None
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["mkl_enable_instructions"] = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    info["cpu_vector_features"] = cpu_vector_features()
    info["busy_cpus_at_start"] = round(busy_cpus(), 2)
    return info


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per target (and thread count, when rows have several): how many rows meet it, and the
    worst value."""
    summary: dict[str, Any] = {}
    thread_counts = sorted({r.get("threads") for r in rows}, key=lambda t: t or 0)
    for threads in thread_counts:
        suffix = f"@{threads}t" if len(thread_counts) > 1 else ""
        for kind in ("decode", "prefill"):
            chosen = [r for r in rows if r["kind"] == kind and r.get("threads") == threads]
            for name in sorted({n for r in chosen for n in r["verdicts"]}):
                values = [r["ratios"][name] for r in chosen]
                worst = max(values) if name == "fused_over_bare" else min(values)
                summary[f"{kind}.{name}{suffix}"] = {
                    "met": sum(r["verdicts"][name] for r in chosen), "of": len(chosen),
                    "worst": worst}
    return summary


def _case_label(row: Mapping[str, Any]) -> str:
    return f"{row['kind']} {row['batch']}×{row['seq_len']}×{row['dim']}, K={row['n_vec']}"


def format_ratio_table(rows: Sequence[Mapping[str, Any]], machine: Mapping[str, Any] | None = None
                       ) -> str:
    """The markdown table of a run: times, bandwidth and the ratios, one line per row."""
    lines = ["# Op benchmark: fused `steer_` (CPU) vs plain PyTorch", ""]
    isas = sorted({str(r.get("isa")) for r in rows if r.get("isa")})
    if machine:
        load, load_end = machine.get("load_average"), machine.get("load_average_end")
        features = ", ".join(machine.get("cpu_vector_features") or []) or "unknown"
        lines += [f"torch {machine.get('torch')}, {machine.get('cpu_model')} "
                  f"({machine.get('cpu_count')} CPUs; vector extensions: {features}), "
                  f"kernel instruction set: {machine.get('cpu_isa')}"
                  + (f" (compiled with -march={machine['kernel_march']})"
                     if machine.get("kernel_march") else "")
                  + (f", PyTorch's kernels capped to {machine['torch_cpu_capability']} and MKL "
                     f"to {machine.get('mkl_enable_instructions')}"
                     if machine.get("mkl_enable_instructions") else "")
                  + (f", 1-min load average at start {load[0]:.1f}" if load else "")
                  + (f", at end {load_end[0]:.1f}" if load_end else "")
                  + (f", CPUs busy with other processes at start: "
                     f"{machine['busy_cpus_at_start']:.1f}"
                     if machine.get("busy_cpus_at_start") is not None else ""), ""]
    elif isas:
        lines += [f"Kernel instruction set: {', '.join(isas)}", ""]
    lines += [
        "Times are medians per call (IQR in brackets). Ratios are medians of per-round ratios "
        "(variants interleaved). fused = the public `emokern.steer_`, Python wrapper included; "
        "op = the same kernel through `torch.ops.emokern.steer_` (no wrapper). "
        "×naive and ×torch = their time / fused time (higher is better; torch = the faster of "
        "the in-place float32-projection sequence and, for bf16/fp16, the same sequence in the "
        "tensors' own dtype), "
        "of copy = copy time / fused time (the fraction of copy bandwidth), of in-place = an "
        "in-place `h.mul_(1)` (read and write the same buffer) / fused time, bare = fused time / "
        "one bare `h.add_` (decode), op/bare the same for the op. "
        f"Targets: prefill ×naive ≥ {TARGETS['prefill_speedup_vs_naive']}, ×torch > 1, "
        f"of copy ≥ {TARGETS['prefill_copy_fraction_fp32']} (fp32) / "
        f"{TARGETS['prefill_copy_fraction_lowp']} (bf16, fp16); decode ×naive > 1, ×torch > 1, "
        f"bare ≤ {TARGETS['decode_fused_over_bare']}. ✗ marks a miss.", "",
        "| case | dtype | threads | fused µs | op µs | GB/s | of copy | of in-place | ×naive | "
        "×torch | bare | op/bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mark(row, name):
        text = f"{row['ratios'][name]:.2f}"
        ok = row["verdicts"].get(name)
        return text if ok is None or ok else f"{text} ✗"

    for row in rows:
        f, op, r = row["variants"]["fused"], row["variants"]["fused_op"], row["ratios"]
        bare = mark(row, "fused_over_bare") if "fused_over_bare" in r else ""
        op_bare = f"{r['fused_op_over_bare']:.2f}" if "fused_op_over_bare" in r else ""
        lines.append(
            f"| {_case_label(row)} | {row['dtype']} | {row.get('threads', '')} | "
            f"{f['median_us']:.1f} [{f['iqr_us']:.1f}] | "
            f"{op['median_us']:.1f} [{op['iqr_us']:.1f}] | {f['gbps']:.1f} | "
            f"{mark(row, 'copy_fraction')} | "
            f"{row['ratios'].get('inplace_fraction', float('nan')):.2f} | "
            f"{mark(row, 'speedup_vs_naive')} | {mark(row, 'speedup_vs_torch')} | {bare} | "
            f"{op_bare} |")
    summary = summarize(rows)
    if summary:
        lines += ["", "| target | met | worst |", "|---|---|---|"]
        for name, s in summary.items():
            lines.append(f"| {name} | {s['met']}/{s['of']} | {s['worst']:.2f} |")
    return "\n".join(lines) + "\n"


def save_results(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                 stem: str = "ops-cpu", machine: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``<stem>.json`` (machine, targets, summary, rows) and ``<stem>.md`` atomically."""
    machine = dict(machine) if machine is not None else machine_info()
    out = Path(out_dir)
    document = {"machine": machine, "targets": TARGETS, "summary": summarize(rows),
                "rows": list(rows)}
    return [write_json(out / f"{stem}.json", document),
            write_text(out / f"{stem}.md", format_ratio_table(rows, machine))]
