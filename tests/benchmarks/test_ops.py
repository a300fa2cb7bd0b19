"""Smoke test of the op-benchmark harness (``emokern/benchmarks/ops.py``) on one tiny decode
shape, in seconds: every variant checked and timed, the instruction set recorded, the table's
columns. Correctness of the harness, not speed."""

from __future__ import annotations

import json

import pytest

from emokern.benchmarks.ops import OpShape, format_ratio_table, run_ops_benchmark, save_results
from emokern.ops import build


@pytest.fixture(scope="module")
def rows():
    if not build.load_cpu():
        pytest.skip("the CPU kernel did not build (see `emokern info`)")
    return run_ops_benchmark([OpShape("decode", 2, 1, 64, 3)], ("fp32",), repeats=3,
                             max_seconds=0.5, threads=1, progress=None)


def test_rows_record_the_instruction_set_and_every_variant(rows):
    (row,) = rows
    assert row["isa"] == build.cpu_isa() == build.build_info()["cpu"]["isa"]
    assert row["isa"] in ("avx512", "avx2", "sve256", "neon", "default")
    assert row["threads"] == 1
    assert set(row["variants"]) == {"fused", "fused_op", "naive", "torch", "copy", "inplace",
                                    "bare_op"}
    assert {"fused_over_bare", "fused_op_over_bare", "inplace_fraction"} <= set(row["ratios"])


def test_low_precision_rows_time_the_dtypes_own_sequence():
    """bf16 against the sequence a bf16 user writes (projections in bf16), and ×torch against
    the faster of the two plain-PyTorch sequences."""
    (row,) = run_ops_benchmark([OpShape("decode", 2, 1, 64, 3)], dtypes=("bf16",), repeats=3,
                               max_seconds=0.2, threads=1, progress=None)
    assert "torch_native" in row["variants"]
    r = row["ratios"]
    assert r["speedup_vs_torch"] <= r["speedup_vs_torch_f32proj"] * (1 + 1e-9)


def test_table_reports_the_wrapper_and_the_op_separately(rows):
    table = format_ratio_table(rows)
    assert f"Kernel instruction set: {rows[0]['isa']}" in table
    header = next(line for line in table.splitlines() if line.startswith("| case |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    (line,) = [ln for ln in table.splitlines() if ln.startswith("| decode 2×1×64")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(columns)
    fused, op = rows[0]["variants"]["fused"], rows[0]["variants"]["fused_op"]
    assert cells[columns.index("fused µs")].startswith(f"{fused['median_us']:.1f} [")
    assert cells[columns.index("op µs")].startswith(f"{op['median_us']:.1f} [")


def test_saved_results_name_the_instruction_set(rows, tmp_path):
    machine = {"torch": "x", "cpu_model": "y", "cpu_count": 2, "cpu_isa": rows[0]["isa"]}
    json_path, md_path = save_results(rows, tmp_path, "ops", machine)
    document = json.loads(json_path.read_text())
    assert document["rows"][0]["isa"] == document["machine"]["cpu_isa"] == rows[0]["isa"]
    assert f"kernel instruction set: {rows[0]['isa']}" in md_path.read_text()
