"""Op benchmark: the fused CPU ``steer_`` vs naive hooks, plain in-place torch and a copy.

Full run (the whole decode and prefill grid, fp32 and bf16, with 1 and then 2 torch threads,
~8 minutes on 2 idle cores), writing ``bench/results/ops-cpu.{json,md}``::

    python bench/bench_ops.py [--quick] [--dtypes fp32,bf16] [--repeats 30]
                              [--max-seconds 4] [--threads 1,2] [--isa avx2 [--cap-torch]]
                              [--out bench/results]

``--isa`` caps the kernel's instruction set (``default``, ``avx2``, ``avx512``; it sets
``EMOKERN_CPU_CAPABILITY`` before the kernel loads), e.g. to measure the AVX2 path on an
AVX-512 machine; every row records the set it ran. ``--isa avx2 --cap-torch`` caps PyTorch's
own kernels and MKL to AVX2 as well (the torch baselines of an AVX2-only CPU).

Variants, shapes and the reported ratios are described in :mod:`emokern.benchmarks.ops`;
``emokern bench ops`` runs the same harness.

Under pytest (``make bench``) every variant is first checked against the reference, then timed
with pytest-benchmark at the headline shapes (a few rounds each, so the suite stays short)::

    pytest bench/bench_ops.py --benchmark-only --benchmark-columns=median,iqr,ops
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from emokern.benchmarks.ops import (
    DTYPES,
    VARIANT_FUNCTIONS,
    OpInputs,
    check_variant,
    decode_shapes,
    format_ratio_table,
    headline_shapes,
    machine_info,
    prefill_shapes,
    run_ops_benchmark,
    save_results,
    variants_for,
)

RESULTS = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------ pytest-benchmark

CASES = [(shape, dtype) for shape in headline_shapes() for dtype in ("fp32", "bf16")]


def _case_id(case) -> str:
    shape, dtype = case
    return f"{shape.kind}-{shape.batch}x{shape.seq_len}x{shape.dim}-K{shape.n_vec}-{dtype}"


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    from emokern.ops import build

    if not build.load_cpu():
        pytest.skip("the CPU kernel did not build (see `emokern info`)")


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def inputs(request):
    shape, dtype = request.param
    return OpInputs(shape, DTYPES[dtype])


@pytest.mark.parametrize("variant", list(VARIANT_FUNCTIONS))
def test_op_variant(benchmark, inputs, variant):
    dtype = {v: k for k, v in DTYPES.items()}[inputs.dtype]
    if variant not in variants_for(inputs.shape, dtype):
        pytest.skip(f"{variant} is not timed at {inputs.shape.label} {dtype}")
    check_variant(variant, inputs)  # check, then time
    large = inputs.hidden.numel() > 1 << 24
    benchmark.extra_info.update(shape=inputs.shape.label, dtype=str(inputs.dtype),
                                bytes=2 * inputs.hidden.numel() * inputs.hidden.element_size())
    benchmark.pedantic(VARIANT_FUNCTIONS[variant], args=(inputs,), warmup_rounds=1,
                       rounds=5 if large else 30, iterations=1 if large else 10)


# ------------------------------------------------------------------------ full run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="headline shapes only")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=30, help="rounds per case (max)")
    parser.add_argument("--max-seconds", type=float, default=4.0, help="time budget per case")
    parser.add_argument("--threads", default="1,2",
                        help="torch intra-op thread counts, run one after the other")
    parser.add_argument("--isa", choices=["default", "avx2", "avx512"],
                        help="cap the kernel's instruction set (EMOKERN_CPU_CAPABILITY)")
    parser.add_argument("--cap-torch", action="store_true",
                        help="with --isa avx2: a stand-in for an AVX2-only CPU: the kernel "
                             "compiled for x86-64-v3 (EMOKERN_CPU_MARCH: 16 ymm registers, no "
                             "AVX-512 instructions), PyTorch's kernels and MKL capped to AVX2 "
                             "(ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--stem", default="ops-cpu")
    args = parser.parse_args(argv)
    if args.isa:
        os.environ["EMOKERN_CPU_CAPABILITY"] = args.isa  # read once, when the kernel loads
    if args.cap_torch:
        if args.isa != "avx2":
            parser.error("--cap-torch goes with --isa avx2")
        # All are read at the first operation that needs them, none of which has run yet.
        os.environ["EMOKERN_CPU_MARCH"] = "x86-64-v3"
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    shapes = headline_shapes() if args.quick else decode_shapes() + prefill_shapes()
    machine = machine_info()
    if args.isa and machine["cpu_isa"] != args.isa:
        raise SystemExit(f"asked for {args.isa}, the kernel runs {machine['cpu_isa']} (loaded "
                         f"before --isa, or the CPU lacks it)")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        rows += run_ops_benchmark(shapes, args.dtypes.split(","), args.repeats,
                                  max_seconds=args.max_seconds, threads=threads)
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    print()
    print(format_ratio_table(rows, machine))
    for path in save_results(rows, args.out, args.stem, machine):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
