"""The CPU kernel's instruction-set paths (csrc/cpu): every path this machine runs gives the
same bits, the packed op and the batched op share one core, and the running statistics do not
depend on the thread count or on where chunk boundaries fall. Projection levels and bounds
(docs/design.md §2) on both layouts: against the reference, rows inside their bounds keep the
bits they have without bounds, and the same bits on every path, thread count and with or
without readings.

Each path runs in a fresh interpreter with ``EMOKERN_CPU_CAPABILITY`` capping the choice (the
kernel reads it once, at load). The portable path is compared bit for bit where the compiler
targets FMA (the JIT build's -march=native on any x86 CPU with AVX2); an ahead-of-time build's
portable core for CPUs without FMA rounds products separately, which these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_flash_close, case_seed

import emokern
from emokern.ops import build, unit_gram
from emokern.ops.reference import ref_steer_, ref_steer_packed_

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cpu_kernel():
    assert build.load_cpu(), f"the CPU kernel did not build: {build.build_info()['cpu']}"


def supported_isas() -> list[str]:
    """The paths this CPU can run, portable first."""
    isas = ["default"]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
            isas.append("avx512")
    return isas


# Cases: (batch, seq_len, dim, n_vec). Sweeps (K <= 8) and tiles (K > 8), decode and prefill,
# dimensions with a partial last logical vector, several panels, blocks and chunks (column
# chunks of a sweep: 1040 columns, six vectors).
CASES = [(3, 5, 77, 3), (2, 1, 100, 20), (1, 9, 33, 9), (4, 40, 576, 8), (70, 1, 1040, 32),
         (2, 37, 2048, 12), (1, 300, 64, 1), (5, 3, 4099, 33), (3, 1, 1, 7), (17, 1, 576, 16),
         (40, 1, 96, 4), (2, 9, 1040, 6)]

RUN_CASES = r"""
import json, sys, torch, emokern
from emokern.ops import build
assert build.load_cpu()
torch.set_num_threads(int(sys.argv[2]))
cases = json.loads(sys.argv[3])
out = {}
for ci, (b, t, d, k) in enumerate(cases):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for norm in (False, True):
            g = torch.Generator().manual_seed(ci)
            base = (torch.randn(b, 2 * t, d + 3, generator=g) * 2).to(dtype)
            h = base[:, ::2, :d]  # strided rows
            v = torch.randn(k, d, generator=g)
            w = torch.randn(b, k, generator=g)
            m = torch.rand(b, t, generator=g) < 0.7
            p = torch.empty(b, t, k)
            run = emokern.RunningProjections(b, k)
            torch.ops.emokern.steer_(h, v, w, m, norm, p, *run.tensors())
            out[f"{ci} {dtype} {norm}"] = [base, p, *run.tensors()]
            n, s = b * t, b + 1
            hp = torch.randn(n, d, generator=g).to(dtype)
            r = torch.randn(n, d, generator=g).to(dtype)
            slots = torch.randint(-1, s, (n + 2,), generator=g, dtype=torch.int32)
            sw = torch.randn(s, k, generator=g)
            pp = torch.full((n + 2, k), 7.0)
            rp = emokern.RunningProjections(s, k)
            torch.ops.emokern.steer_packed_(hp, r, v, sw, slots, norm, pp, *rp.tensors())
            out[f"{ci} {dtype} {norm} packed"] = [hp, pp, *rp.tensors()]
"""


def run_under(isa: str | None, code: str, *args: str) -> str:
    """Runs ``code`` in a fresh Python whose kernel is capped to ``isa`` (None: the widest);
    returns the last line it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMOKERN_CPU_CAPABILITY",
                                                            "ATEN_CPU_CAPABILITY")}
    if isa is not None:
        env["EMOKERN_CPU_CAPABILITY"] = isa
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def run_cases(path, isa: str | None, threads: int = 1, cases=CASES, level_cases=None) -> str:
    """The cases, and the cases with projection bounds (RUN_LEVEL_CASES, defined below), in one
    fresh interpreter; their outputs saved to ``path``."""
    level_cases = LEVEL_ISA_CASES if level_cases is None else level_cases
    code = RUN_CASES + RUN_LEVEL_CASES + "torch.save(out, sys.argv[1])\nprint(build.cpu_isa())\n"
    return run_under(isa, code, str(path), str(threads), json.dumps(cases),
                     json.dumps(level_cases))


def assert_same_bits(a: dict, b: dict, label: str = "") -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            # NaN payloads of bf16/fp16 stores may differ between paths; none arise here.
            assert torch.equal(x.isnan(), y.isnan()), f"{label} {key}"
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), f"{label} {key}"


def test_the_kernel_names_its_instruction_set(cpu_kernel):
    assert build.cpu_isa() in ("avx512", "avx2", "default", "neon", "sve256")
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64" \
            and "EMOKERN_CPU_CAPABILITY" not in os.environ:
        assert build.cpu_isa() == supported_isas()[-1]


def test_every_instruction_set_gives_the_same_bits(cpu_kernel, tmp_path):
    """With and without projection bounds, readings on and off."""
    if os.uname().machine != "x86_64":
        pytest.skip("the x86 paths")
    if build.build_info()["cpu"].get("source") == "aot":
        pytest.skip("an ahead-of-time build's portable core may lack FMA (rounds differently)")
    results = {}
    for isa in supported_isas():
        got = run_cases(tmp_path / f"{isa}.pt", isa)
        assert got == isa, f"asked for {isa}, the kernel ran {got}"
        results[isa] = torch.load(tmp_path / f"{isa}.pt")
    first = results.pop("default")
    for isa, result in results.items():
        assert_same_bits(first, result, f"default vs {isa}:")


def test_threads_do_not_change_any_bit(cpu_kernel, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    cases = [(70, 1, 1040, 32), (2, 300, 256, 20), (3, 400, 96, 4), (1, 700, 64, 9)]
    level_cases = [(64, 1, 576, 6), (2, 300, 256, 20), (3, 400, 96, 4), (1, 700, 64, 9)]
    run_cases(tmp_path / "one.pt", None, threads=1, cases=cases, level_cases=level_cases)
    run_cases(tmp_path / "two.pt", None, threads=2, cases=cases, level_cases=level_cases)
    assert_same_bits(torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37, 96, 5), (33, 1, 576, 32), (2, 300, 64, 12)], ids=str)
def test_the_batched_op_is_the_packed_op_with_one_slot_per_sequence(cpu_kernel, dtype, shape):
    """One core serves both: steer_ on [B, T, D] with a mask gives the bits of steer_packed_ on
    the B*T rows with token_slot = b where the mask is set, else -1."""
    batch, seq_len, dim, n_vec = shape
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, seq_len, dim, generator=g).to(dtype)
    vectors = torch.randn(n_vec, dim, generator=g)
    weights = torch.randn(batch, n_vec, generator=g)
    mask = torch.rand(batch, seq_len, generator=g) < 0.8
    for norm in (False, True):
        a, b = hidden.clone(), hidden.clone().view(batch * seq_len, dim)
        pa, pb = torch.empty(batch, seq_len, n_vec), torch.empty(batch * seq_len, n_vec)
        ra, rb = emokern.RunningProjections(batch, n_vec), emokern.RunningProjections(batch, n_vec)
        torch.ops.emokern.steer_(a, vectors, weights, mask, norm, pa, *ra.tensors())
        slots = torch.where(mask, torch.arange(batch)[:, None], -1).to(torch.int32).reshape(-1)
        torch.ops.emokern.steer_packed_(b, None, vectors, weights, slots, norm, pb, *rb.tensors())
        assert torch.equal(a.view(batch * seq_len, dim), b)
        assert torch.equal(pa.view(-1, n_vec), pb)
        for x, y in zip(ra.tensors(), rb.tensors(), strict=True):
            assert torch.equal(x.nan_to_num(), y.nan_to_num())


def test_packed_rows_match_the_reference_with_interleaved_slots(cpu_kernel):
    """Slots scattered over many chunks (a serving batch that is not sorted by sequence):
    per-slot sums in chunk order, the newest token's projections, untouched slot -1 rows."""
    g = torch.Generator().manual_seed(6)
    n, dim, n_vec, n_slots = 700, 96, 12, 9
    hidden = torch.randn(n, dim, generator=g).bfloat16()
    residual = torch.randn(n, dim, generator=g).bfloat16()
    vectors = torch.randn(n_vec, dim, generator=g)
    weights = torch.randn(n_slots, n_vec, generator=g)
    slots = torch.randint(-1, n_slots, (n,), generator=g, dtype=torch.int32)
    for norm in (False, True):
        got, want = hidden.clone(), hidden.clone()
        pg, pw = torch.empty(n, n_vec), torch.empty(n, n_vec)
        rg = emokern.RunningProjections(n_slots, n_vec)
        rw = emokern.RunningProjections(n_slots, n_vec)
        torch.ops.emokern.steer_packed_(got, residual, vectors, weights, slots, norm, pg,
                                        *rg.tensors())
        ref_steer_packed_(want, residual, vectors, weights, slots, norm, pw, *rw.tensors())
        untouched = slots < 0
        assert torch.equal(got[untouched], hidden[untouched])
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(pg, pw, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rg.sum, rw.sum, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(rg.last, rw.last, rtol=1e-4, atol=1e-3, equal_nan=True)
        assert torch.equal(rg.count, rw.count)


def test_the_residual_is_read_not_written(cpu_kernel):
    """hidden + residual becomes y; the residual keeps its bits."""
    g = torch.Generator().manual_seed(7)
    n, dim, n_vec = 20, 64, 3
    hidden, residual = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    vectors, weights = torch.randn(n_vec, dim, generator=g), torch.randn(2, n_vec, generator=g)
    slots = torch.tensor([0, 1, -1, 0] * 5, dtype=torch.int32)
    before = residual.clone()
    got = hidden.clone()
    torch.ops.emokern.steer_packed_(got, residual, vectors, weights, slots, False, None, None,
                                    None, None)
    assert torch.equal(residual, before)
    y = hidden + residual + (weights @ vectors)[slots.long().clamp_min(0)]
    steered = slots >= 0
    torch.testing.assert_close((got + residual)[steered], y[steered], rtol=1e-5, atol=1e-5)


def test_slot_out_of_range_raises_before_writing(cpu_kernel):
    hidden = torch.randn(4, 16)
    before = hidden.clone()
    slots = torch.tensor([0, 1, 2, -1], dtype=torch.int32)  # S = 2: slot 2 is out of range
    with pytest.raises(ValueError, match=r"token_slot values must be in \[-1, 2\)"):
        torch.ops.emokern.steer_packed_(hidden, None, torch.randn(3, 16), torch.randn(2, 3),
                                        slots, False, None, None, None, None)
    assert torch.equal(hidden, before)


def test_only_the_first_n_slots_and_projections_are_touched(cpu_kernel):
    hidden = torch.randn(3, 32)
    slots = torch.tensor([0, -1, 0, 99, -5], dtype=torch.int32)  # past N: never read
    proj = torch.full((5, 2), 7.0)
    torch.ops.emokern.steer_packed_(hidden, None, torch.randn(2, 32), torch.randn(1, 2), slots,
                                    False, proj, None, None, None)
    assert torch.equal(proj[3:], torch.full((2, 2), 7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_tiles_match_the_reference(cpu_kernel, dtype):
    """Decode with many emotions: offsets computed and written from registers."""
    g = torch.Generator().manual_seed(8)
    batch, dim, n_vec = 37, 1000, 32
    hidden = torch.randn(batch, 1, dim, generator=g).to(dtype)
    vectors = torch.randn(n_vec, dim, generator=g)
    weights = torch.randn(batch, n_vec, generator=g) * 0.1
    got, want = hidden.clone(), hidden.clone()
    pg, pw = torch.empty(batch, 1, n_vec), torch.empty(batch, 1, n_vec)
    torch.ops.emokern.steer_(got, vectors, weights, None, False, pg, None, None, None)
    ref_steer_(want, vectors, weights, None, False, pw)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(pg, pw, rtol=1e-4, atol=1e-3)


SPECIAL_VALUES = r"""
import sys, torch
from emokern.ops import build
assert build.load_cpu()
g = torch.Generator().manual_seed(5)
for dtype in (torch.bfloat16, torch.float16):
    big = torch.finfo(dtype).max
    for batch, seq_len, dim, n_vec in ((6, 1, 100, 1), (6, 1, 100, 9), (2, 7, 100, 9)):
        hidden = (torch.randn(batch, seq_len, dim, generator=g) * 100).to(dtype)
        flat = hidden.view(-1)  # specials written in dtype: NaN is 0x7fc0 (bf16), not 0xffff
        picks = torch.randperm(flat.numel(), generator=g)[:24]
        flat[picks[:6]] = float("nan")
        flat[picks[6:10]] = float("inf")
        flat[picks[10:14]] = -float("inf")
        flat[picks[14:24]] = (big * torch.tensor([1.0, -1.0]).repeat(5)).to(dtype)
        vectors = torch.randn(n_vec, dim, generator=g)
        weights = torch.zeros(batch, n_vec)
        weights[:, 0] = torch.randn(batch, generator=g).clamp(-2, 2) * (big / 4)
        weights[0, 0] = 0.37  # ordinary rounding on the first row
        got = hidden.clone()
        torch.ops.emokern.steer_(got, vectors, weights, None, False, None, None, None, None)
        # one vector with weight: delta = w0 v0 rounded once, y = x + delta rounded once
        want = (hidden.float() + weights[:, :1, None] * vectors[0]).to(dtype)
        assert torch.equal(got.isnan(), want.isnan()), (dtype, n_vec)
        assert torch.equal(got.nan_to_num().view(torch.int16),
                           want.nan_to_num().view(torch.int16)), (dtype, n_vec)
        if build.cpu_isa() == "avx2":  # ATen's AVX2 NaN is 0xffff, as torch's .to() here
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (dtype, n_vec)
print(build.cpu_isa())
"""


@pytest.mark.parametrize("isa", supported_isas())
def test_special_values_narrow_as_aten_does(cpu_kernel, isa):
    """NaN, infinities, the largest finite values and overflow to infinity through every
    instruction set's bf16/fp16 stores (AVX2 rounds bf16 with one NaN test per 16 values and
    falls back to ATen's conversion where one is NaN): the bits of ATen's own conversion, NaN
    payloads too on AVX2 (the other paths write other NaN payloads). Sweeps and tiles, decode
    and prefill."""
    assert run_under(isa, SPECIAL_VALUES) == isa


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 1, 96, 3), (2, 9, 100, 5), (9, 1, 64, 12)], ids=str)
def test_denormal_rows_keep_their_bits(cpu_kernel, dtype, shape):
    """Rows of denormal (and normal) bf16/fp16 values steered by zero weights come back as
    y = x + 0, bit for bit (-0 becomes +0): no instruction set flushes denormals when it narrows
    float32 rows (AVX-512 BF16's vcvtneps2bf16 would; vectors holding a denormal take the exact
    rounding). Sweeps and tiles, decode and prefill, one and two logical vectors per store."""
    batch, seq_len, dim, n_vec = shape
    g = torch.Generator().manual_seed(9)
    tiny = torch.finfo(dtype).smallest_normal
    scale = torch.where(torch.rand(batch, seq_len, dim, generator=g) < 0.5, tiny / 8, 1.0)
    hidden = (torch.randn(batch, seq_len, dim, generator=g) * scale).to(dtype)
    assert (hidden.abs() < tiny).logical_and(hidden != 0).any()
    vectors = torch.randn(n_vec, dim, generator=g)
    got = hidden.clone()
    torch.ops.emokern.steer_(got, vectors, torch.zeros(batch, n_vec), None, False, None, None,
                             None, None)
    want = (hidden.float() + 0.0).to(dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# --- projection levels and bounds ---------------------------------------------------------------

INF = float("inf")


def bounds_near(gen: torch.Generator, proj: torch.Tensor, slots: int, n_bounded: int | None = None
                ) -> torch.Tensor:
    """``bounds [slots, 2, K]`` around the projections ``proj [N, K]`` of the rows: per slot and
    emotion open, a level, a cap or a floor at a quantile of the projections (so that some rows
    fall outside and some inside), or both sides; only ``n_bounded`` emotions bounded (random
    ones; default: each emotion by chance)."""
    n_vec = proj.shape[1]
    bounds = torch.empty(slots, 2, n_vec)
    bounds[:, 0], bounds[:, 1] = -INF, INF
    spread = proj.std(dim=0).clamp_min(1e-3) if proj.shape[0] > 1 else torch.ones(n_vec)
    centre = proj.median(dim=0).values if proj.shape[0] else torch.zeros(n_vec)
    value = centre + torch.randn(slots, n_vec, generator=gen) * spread
    width = torch.rand(slots, n_vec, generator=gen) * spread
    kind = torch.randint(0, 5, (slots, n_vec), generator=gen)
    if n_bounded is not None:
        chosen = torch.zeros(n_vec, dtype=torch.bool)
        chosen[torch.randperm(n_vec, generator=gen)[:n_bounded]] = True
        kind = torch.where(chosen, torch.randint(1, 5, (slots, n_vec), generator=gen), 0)
    bounds[:, 0] = torch.where((kind == 1) | (kind == 3) | (kind == 4), value, bounds[:, 0])
    bounds[:, 1] = torch.where((kind == 1) | (kind == 2), value, bounds[:, 1])
    bounds[:, 1] = torch.where(kind == 4, value + width, bounds[:, 1])
    return bounds


def input_projections(hidden, residual, vectors):
    x = hidden.float().reshape(-1, vectors.shape[1])
    if residual is not None:
        x = x + residual.float().reshape(-1, vectors.shape[1])
    return x @ (vectors / vectors.norm(dim=1, keepdim=True)).T


def level_case(shape, dtype, layout, seed, n_bounded=None):
    """Inputs of one comparison: ``(hidden, residual, vectors, weights, slots, bounds)``; batched:
    hidden [B, T, D], slots the mask [B, T]; packed: hidden [N, D] with a residual, slots the
    token_slot [N] (one slot per sequence plus an unused one)."""
    batch, seq_len, dim, n_vec = shape
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_vec, dim, generator=gen)
    if layout == "batched":
        hidden = (torch.randn(batch, seq_len, dim, generator=gen) * 2).to(dtype)
        residual, n_slots = None, batch
        slots = torch.rand(batch, seq_len, generator=gen) < 0.8
    else:
        n = batch * seq_len
        hidden = (torch.randn(n, dim, generator=gen) * 2).to(dtype)
        residual = torch.randn(n, dim, generator=gen).to(dtype)
        n_slots = batch + 1
        slots = torch.randint(-1, batch, (n,), generator=gen, dtype=torch.int32)
    weights = torch.randn(n_slots, n_vec, generator=gen) * 0.5
    bounds = bounds_near(gen, input_projections(hidden, residual, vectors), n_slots, n_bounded)
    return hidden, residual, vectors, weights, slots, bounds


def run_op(fn, layout, hidden, residual, vectors, weights, slots, norm, bounds, gram,
           readings=False):
    """One call of ``fn`` (the dispatcher op or the reference) on a copy of ``hidden``; returns
    the steered copy, and with ``readings`` the projections and running statistics."""
    out = hidden.clone()
    n_vec, n_slots = vectors.shape[0], weights.shape[0]
    proj = torch.full((*hidden.shape[:-1], n_vec), -7.0) if readings else None
    run = emokern.RunningProjections(n_slots, n_vec) if readings else None
    stats = run.tensors() if readings else (None, None, None)
    if layout == "batched":
        fn(out, vectors, weights, slots, norm, proj, *stats, bounds, gram)
    else:
        fn(out, residual, vectors, weights, slots, norm, proj, *stats, bounds, gram)
    return (out, proj, run) if readings else out


def check_levels_against_reference(layout, hidden, residual, vectors, weights, slots, bounds,
                                   norm):
    """The kernel with bounds, readings off and on, against the reference in float32 and in the
    storage dtype (flash-attention's rule, the tolerance scaled by the conditioning of the Gram
    matrix): readings on or off give the same bits, unsteered rows keep theirs, the readings are
    the projections of the input."""
    gram = unit_gram(vectors)
    kernel = torch.ops.emokern.steer_ if layout == "batched" else torch.ops.emokern.steer_packed_
    ref = ref_steer_ if layout == "batched" else ref_steer_packed_
    got = run_op(kernel, layout, hidden, residual, vectors, weights, slots, norm, bounds, gram)
    got_r, proj, run = run_op(kernel, layout, hidden, residual, vectors, weights, slots, norm,
                              bounds, gram, readings=True)
    assert torch.equal(got, got_r), "readings changed the steered rows"
    low, proj_low, run_low = run_op(ref, layout, hidden, residual, vectors, weights, slots, norm,
                                    bounds, gram, readings=True)
    res32 = None if residual is None else residual.float()
    f32, proj32, run32 = run_op(ref, layout, hidden.float(), res32, vectors, weights, slots, norm,
                                bounds, gram, readings=True)
    steered = slots if layout == "batched" else slots >= 0
    assert torch.equal(got[~steered], hidden[~steered]), "unsteered rows changed"
    cond = float(torch.linalg.cond(gram.double()))
    assert_flash_close("hidden", got[steered], f32[steered], low[steered], rtol=1e-5 * cond)
    assert_flash_close("proj_out", proj, proj32, proj_low)
    assert torch.equal(run.count, run32.count)
    assert_flash_close("running.sum", run.sum, run32.sum, run_low.sum)


# (batch, seq_len, dim, n_vec): few vectors (sweeps) and many (tiles), decode (one row per
# sequence) and prefill, a partial last logical vector, several panels.
LEVEL_SHAPES = [(4, 40, 96, 3), (2, 33, 576, 6), (64, 1, 576, 6), (9, 1, 100, 4),
                (33, 1, 200, 12), (3, 20, 130, 20), (1, 50, 1040, 8)]


@pytest.mark.parametrize("shape", LEVEL_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_bounds_match_the_reference(cpu_kernel, shape, layout, dtype, norm):
    """Mixed bounds on every emotion (levels, caps, floors, ranges, open), and caps on one or two
    emotions only (the others open: with readings off the kernel reads only the bounded
    projections)."""
    for n_bounded in (None, 1, 2):
        seed = case_seed(str(shape), layout, str(n_bounded)) % 10_000
        case = level_case(shape, dtype, layout, seed, n_bounded=n_bounded)
        check_levels_against_reference(layout, *case, norm)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), seq_len=st.integers(1, 12), dim=st.integers(1, 80),
       n_vec=st.integers(1, 12), seed=st.integers(0, 10_000), norm=st.booleans(),
       layout=st.sampled_from(["batched", "packed"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_bounds_match_the_reference(cpu_kernel, batch, seq_len, dim, n_vec, seed, norm,
                                           layout, dtype):
    n_vec = min(n_vec, dim)  # independent directions: at most D of them
    case = level_case((batch, seq_len, dim, n_vec), dtype, layout, seed)
    check_levels_against_reference(layout, *case, norm)


@pytest.mark.parametrize("shape", LEVEL_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_rows_inside_their_bounds_keep_their_bits(cpu_kernel, shape, layout, dtype, norm):
    """Slots whose bounds no row reaches (finite, far) are written exactly as without bounds,
    beside slots whose rows a level moves; the readings are the projections of the input,
    bit for bit those of the call without bounds."""
    hidden, residual, vectors, weights, slots, _ = level_case(shape, dtype, layout, seed=3)
    n_slots, n_vec = weights.shape
    bounds = torch.empty(n_slots, 2, n_vec)
    bounds[:, 0], bounds[:, 1] = -1e30, 1e30
    leveled = torch.arange(n_slots) % 2 == 1
    bounds[leveled, :, 0] = 0.25  # a level on the first emotion: every such row moves
    gram = unit_gram(vectors)
    kernel = torch.ops.emokern.steer_ if layout == "batched" else torch.ops.emokern.steer_packed_
    plain, proj, run = run_op(kernel, layout, hidden, residual, vectors, weights, slots, norm,
                              None, None, readings=True)
    got, proj_b, run_b = run_op(kernel, layout, hidden, residual, vectors, weights, slots, norm,
                                bounds, gram, readings=True)
    if layout == "batched":
        row_slot = torch.where(slots, torch.arange(shape[0])[:, None], -1)
    else:
        row_slot = slots.long()
    inside = (row_slot >= 0) & ~leveled[row_slot.clamp_min(0)]
    assert torch.equal(got[inside], plain[inside])
    moved = (row_slot >= 0) & leveled[row_slot.clamp_min(0)]
    assert not moved.any() or not torch.equal(got[moved], plain[moved])
    assert torch.equal(proj_b, proj)
    for a, b in zip(run_b.tensors(), run.tensors(), strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    # Every slot far inside: the whole call is the call without bounds.
    bounds[:, :, 0] = torch.tensor([-1e30, 1e30])
    assert torch.equal(run_op(kernel, layout, hidden, residual, vectors, weights, slots, norm,
                              bounds, gram), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37, 96, 5), (33, 1, 576, 12), (2, 300, 64, 3)], ids=str)
def test_the_batched_op_is_the_packed_op_with_bounds(cpu_kernel, dtype, shape):
    batch, seq_len, dim, n_vec = shape
    hidden, _, vectors, weights, mask, bounds = level_case(shape, dtype, "batched", seed=4)
    gram = unit_gram(vectors)
    slots = torch.where(mask, torch.arange(batch)[:, None], -1).to(torch.int32).reshape(-1)
    for norm in (False, True):
        a = run_op(torch.ops.emokern.steer_, "batched", hidden, None, vectors, weights, mask, norm,
                   bounds, gram)
        b = run_op(torch.ops.emokern.steer_packed_, "packed",
                   hidden.reshape(batch * seq_len, dim), None, vectors, weights, slots, norm,
                   bounds, gram)
        assert torch.equal(a.view(batch * seq_len, dim), b)


@pytest.mark.parametrize("n_vec", [3, 12])
def test_dependent_directions_through_the_kernel(cpu_kernel, n_vec):
    """A direction in the span of two others, leveled with them: dropped from the solve as in
    the reference; the independent levels are met."""
    gen = torch.Generator().manual_seed(2)
    vectors = torch.randn(n_vec, 64, generator=gen)
    vectors[2] = 0.6 * vectors[0] + 0.8 * vectors[1]
    hidden = torch.randn(40, 64, generator=gen)
    weights = torch.randn(2, n_vec, generator=gen) * 0.3
    slots = torch.randint(0, 2, (40,), generator=gen, dtype=torch.int32)
    bounds = torch.empty(2, 2, n_vec)
    bounds[:, 0], bounds[:, 1] = -INF, INF
    bounds[:, :, :3] = torch.tensor([0.5, -1.0, 2.0])
    gram = unit_gram(vectors)
    got = run_op(torch.ops.emokern.steer_packed_, "packed", hidden, None, vectors, weights, slots,
                 False, bounds, gram)
    want = run_op(ref_steer_packed_, "packed", hidden, None, vectors, weights, slots, False,
                  bounds, gram)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got @ unit[:2].T, torch.tensor([[0.5, -1.0]]).expand(40, 2),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (lambda b, g: b[0, 0, 1].fill_(float("nan")), "must not be NaN"),
    (lambda b, g: b[1, :, 0].copy_(torch.tensor([2.0, 1.0])), "is above upper"),
    (lambda b, g: g[0, 1].fill_(float("inf")), "gram must be finite"),
])
def test_bound_values_are_checked_before_writing(cpu_kernel, bad, message):
    """The kernel's own data checks (the dispatcher op, no Python wrapper)."""
    hidden, residual, vectors, weights, slots, bounds = level_case((2, 3, 16, 2), torch.float32,
                                                                   "packed", seed=5)
    gram = unit_gram(vectors)
    bad(bounds, gram)
    got = hidden.clone()
    with pytest.raises(ValueError, match=message):
        torch.ops.emokern.steer_packed_(got, residual, vectors, weights, slots, False, None,
                                        None, None, None, bounds, gram)
    assert torch.equal(got, hidden)


# Appended to RUN_CASES (the same interpreter: its imports, thread count and `out`): the cases
# argv[4] with projection bounds on one or every emotion, readings off and on.
RUN_LEVEL_CASES = r"""
from emokern.ops import unit_gram
INF = float("inf")
def bounds(g, s, k, p, n_bounded):
    b = torch.empty(s, 2, k); b[:, 0] = -INF; b[:, 1] = INF
    kind = torch.randint(1, 4, (s, k), generator=g)
    if n_bounded < k:
        kind[:, torch.randperm(k, generator=g)[n_bounded:]] = 0
    val = p.median(0).values + torch.randn(s, k, generator=g) * p.std(0).clamp_min(1e-3)
    b[:, 0] = torch.where((kind == 1) | (kind == 3), val, b[:, 0])
    b[:, 1] = torch.where((kind == 1) | (kind == 2), val, b[:, 1])
    return b
for ci, (b, t, d, k) in enumerate(json.loads(sys.argv[4])):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for norm in (False, True):
            for nb in sorted({1, k}):
                g = torch.Generator().manual_seed(ci)
                base = (torch.randn(b, 2 * t, d + 3, generator=g) * 2).to(dtype)
                h = base[:, ::2, :d]  # strided rows
                v = torch.randn(k, d, generator=g)
                w = torch.randn(b, k, generator=g)
                m = torch.rand(b, t, generator=g) < 0.7
                u = v / v.norm(dim=1, keepdim=True)
                bd, gram = bounds(g, b, k, h.float().reshape(-1, d) @ u.T, nb), unit_gram(v)
                read = (torch.empty(b, t, k), *emokern.RunningProjections(b, k).tensors())
                for readings in (False, True):
                    hr = base.clone()[:, ::2, :d]
                    args = read if readings else (None, None, None, None)
                    torch.ops.emokern.steer_(hr, v, w, m, norm, *args, bd, gram)
                    key = f"levels {ci} {dtype} {norm} {nb} {readings}"
                    out[key] = [hr, *(args if readings else ())]
                n, s = b * t, b + 1
                hp = torch.randn(n, d, generator=g).to(dtype)
                r = torch.randn(n, d, generator=g).to(dtype)
                slots = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32)
                sw = torch.randn(s, k, generator=g)
                bp = bounds(g, s, k, (hp.float() + r.float()) @ u.T, nb)
                for readings in (False, True):
                    pp = torch.empty(n, k) if readings else None
                    rp = emokern.RunningProjections(s, k).tensors() if readings else (None,) * 3
                    hq = hp.clone()
                    torch.ops.emokern.steer_packed_(hq, r, v, sw, slots, norm, pp, *rp, bp, gram)
                    out[f"levels {ci} {dtype} {norm} {nb} {readings} packed"] = [hq] + (
                        [pp, *rp] if readings else [])
"""

# Decode and prefill, few vectors and many (K > 8), one or every emotion bounded.
LEVEL_ISA_CASES = [(3, 5, 77, 3), (2, 1, 100, 20), (4, 40, 576, 8), (64, 1, 576, 6),
                   (2, 37, 1040, 12), (1, 300, 64, 1), (40, 1, 96, 4), (9, 1, 2048, 8)]
