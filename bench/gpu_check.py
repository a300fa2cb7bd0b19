"""GPU readiness in one command: ``make gpu-check`` (or ``python bench/gpu_check.py --out DIR``).

On a CUDA machine it (1) builds the CUDA kernel (``emokern info --build``), (2) runs the GPU
tests (Triton and CUDA kernels on the device, CUDA-graph capture of both ops:
``pytest -m "gpu or triton" tests/ops``), (3) checks, then times, ``steer_`` and
``steer_packed_`` on each GPU backend against plain PyTorch (the per-row hook a user would
write) and a ``copy_`` of the same tensor, with CUDA events around CUDA-graph replays, and
(4) writes ``gpu-check.json`` and ``gpu-check.md`` into ``--out`` (default
``bench/results``). It uses the machine's own Python environment (no install step: GPU
machines here reach no package index) and is sized to finish in a few minutes on one GPU.
Without a CUDA device it says so and exits 0 without doing anything.

Where this Python also has vLLM, it then (5) runs the plugin's engine tests
(``tests/vllm/test_engine.py``: compiled engines, CUDA graphs on, vLLM's GPU default) and (6) the
vLLM throughput benchmark without its Hugging Face sweep (``bench/bench_vllm.py --no-sweep
--repeats 3``, results beside the others); without vLLM both are recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from emokern.files import write_text  # noqa: E402
from emokern.machine import machine_info  # noqa: E402
from emokern.ops import build, ref_steer_, steer_, steer_packed_  # noqa: E402
from emokern.ops.running import RunningProjections  # noqa: E402

#: (label, B, T, D, K): decode batches and prefill chunks of an 8B-class model's width.
SHAPES = [("decode", 1, 1, 4096, 8), ("decode", 64, 1, 4096, 32), ("decode", 256, 1, 4096, 32),
          ("prefill", 4, 2048, 4096, 8), ("prefill", 2, 16384, 4096, 8)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _run(step: str, argv: list[str], log: list[dict], timeout: int) -> bool:
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout} s"
    log.append({"step": step, "ok": ok, "seconds": round(time.perf_counter() - start, 1),
                "tail": tail})
    print(f"[{'ok' if ok else 'FAILED'}] {step} ({log[-1]['seconds']} s)", flush=True)
    if not ok:
        print(tail, flush=True)
    return ok


def _why_no_vllm() -> str | None:
    """Why the vLLM steps cannot run in this Python, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this Python"
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    if not any(p.value.startswith("emokern.") for p in plugins):
        return ("vLLM cannot find emokern's plugin: install emokern in this Python "
                "(pip install --no-deps --no-build-isolation -e .)")
    return None


def _verdict(step: dict) -> str:
    return "skipped: " + step["tail"] if step.get("skipped") else "ok" if step["ok"] else "FAILED"


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one ``fn()`` call, replayed from a CUDA graph of ``reps`` calls (launch
    overhead amortised as in a captured decode step)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def time_case(label, batch, seq, dim, n_vec, dtype_name, backend) -> dict:
    """Check ``backend`` against the reference, then time it, the plain-torch hook and a copy."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(batch, seq, dim, device="cuda", generator=gen).to(dtype)
    vectors = torch.randn(n_vec, dim, device="cuda", generator=gen) * 0.05
    weights = torch.randn(batch, n_vec, device="cuda", generator=gen)
    run = RunningProjections(batch, n_vec, "cuda")
    want, got = hidden.clone(), hidden.clone()
    ref_steer_(want, vectors, weights, None, False, None, None, None, None)
    steer_(got, vectors, weights, backend=backend)
    error = (got.float() - want.float()).abs().max().item()
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    other = torch.empty_like(hidden)
    tokens = batch * seq
    token_slot = torch.arange(batch, device="cuda", dtype=torch.int32).repeat_interleave(seq)
    packed = hidden.view(tokens, dim)
    packed_run = RunningProjections(batch, n_vec, "cuda")
    seconds = {
        "fused": graph_time(lambda: steer_(hidden, vectors, weights, running=run,
                                           backend=backend)),
        "packed": graph_time(lambda: steer_packed_(packed, vectors, weights, token_slot,
                                                   running=packed_run)),
        # What a user writes in a hook: the mix per row, then the projections for the monitor.
        "torch": graph_time(lambda: (hidden.add_((weights @ vectors).to(dtype)[:, None]),
                                     hidden.float() @ unit.T)),
        "copy": graph_time(lambda: other.copy_(hidden)),
    }
    moved = 2 * hidden.numel() * hidden.element_size()
    return {"case": label, "B": batch, "T": seq, "D": dim, "K": n_vec, "dtype": dtype_name,
            "backend": backend, "max_abs_error": error,
            "us": {k: round(v * 1e6, 2) for k, v in seconds.items()},
            "GBps": round(moved / seconds["fused"] / 1e9, 1),
            "x_torch": round(seconds["torch"] / seconds["fused"], 2),
            "of_copy": round(seconds["copy"] / seconds["fused"], 2)}


def format_table(rows: list[dict]) -> str:
    lines = ["| case | dtype | backend | fused µs | packed µs | ×torch | of copy | GB/s | err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} {r['B']}×{r['T']}×{r['D']}, K={r['K']} | {r['dtype']} | "
                     f"{r['backend']} | {r['us']['fused']} | {r['us']['packed']} | "
                     f"{r['x_torch']} | {r['of_copy']} | {r['GBps']} | "
                     f"{r['max_abs_error']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--skip-tests", action="store_true", help="only build and time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (run it on a GPU machine)")
        return 0
    log: list[dict] = []
    _run("build the CUDA kernel", [sys.executable, "-m", "emokern", "info", "--build"], log, 300)
    if not args.skip_tests:
        _run("GPU tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-m", "gpu or triton", "tests/ops"], log, 300)
    backends = ["triton"] + (["cuda"] if build.load_cuda() else [])
    rows = []
    for shape in SHAPES:
        for dtype_name in DTYPES:
            for backend in backends:
                rows.append(time_case(*shape, dtype_name, backend))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    why_not = _why_no_vllm()
    if why_not is None:
        _run("vLLM plugin tests (CUDA graphs on)",
             [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
              "tests/vllm/test_engine.py"], log, 240)
        _run("vLLM benchmark", [sys.executable, "bench/bench_vllm.py", "--no-sweep",
                                "--repeats", "3", "--out", str(args.out)], log, 180)
    else:
        log.append({"step": "vLLM plugin tests and benchmark", "ok": True, "seconds": 0,
                    "skipped": True, "tail": why_not})
    result = {"machine": {**machine_info(), "gpu": torch.cuda.get_device_name()},
              "steps": log, "rows": rows}
    out = Path(args.out)
    write_text(out / "gpu-check.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "gpu-check.md", f"# GPU check ({result['machine']['gpu']})\n\n"
               + "".join(f"- {s['step']}: {_verdict(s)} ({s['seconds']} s)\n" for s in log)
               + "\n" + format_table(rows))
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return 0 if all(s["ok"] for s in log) else 1


if __name__ == "__main__":
    raise SystemExit(main())
