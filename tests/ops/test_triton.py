"""The Triton kernel of ``emokern::steer_`` and ``emokern::steer_packed_`` (one kernel, two
layouts) against the reference.

Without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py
before Triton is imported), so the shapes are small; on a GPU machine the same tests run the
compiled kernel on CUDA tensors. The harness and the tolerances (flash-attention's rule) are
shared with the CUDA kernel's tests: ``tests/kernel_cases.py``. Triton is an optional extra:
without it this module is skipped.

Projection levels and bounds (``bounds``/``gram``) are compared on both layouts with the
reference and with the kernel's own output without bounds (rows inside their bounds must get
the same bits, readings stay the input's projections); cases with many emotions are ``slow``
under the interpreter (the solve takes O(K²) steps).

``test_compiles_for_sm90`` lowers the kernel all the way to an sm_90 cubin with Triton's own
compiler and ptxas (no GPU or driver needed) and checks that it spills nothing (with bounds:
``test_compiles_for_sm90_with_bounds``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from kernel_cases import (  # noqa: E402  (after the importorskip)
    DTYPE_MASK_CASES,
    PACKED_CASES,
    PACKED_SHAPES,
    VIEWS,
    assert_flash_close,
    case_seed,
    check_against_reference,
    check_packed_against_reference,
    check_packed_graph_replays,
    gpu,
    make_mask,
    make_token_slot,
    packed_case,
    packed_inputs,
    random_inputs,
    to_device,
)

import emokern  # noqa: E402
from emokern.ops import steer_packed_, triton_steer  # noqa: E402
from emokern.ops.reference import ref_steer_, ref_steer_packed_, unit_gram  # noqa: E402
from emokern.ops.triton_steer import (  # noqa: E402
    launch_config,
    triton_steer_,
    triton_steer_packed_,
)

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _programs_last_to_first(monkeypatch):
    """Under the interpreter, run each grid's programs last to first. A GPU runs them in no
    order; in the interpreter's ascending order a program that wrongly wrote a slot's
    ``run_last`` would be overwritten by the right one (the newest row's program runs last) and
    go unnoticed. Reversed, the wrong write lands last (checked by
    ``test_interpreter_runs_programs_last_to_first``).

    It patches ``InterpreterBuilder.set_grid_idx`` of Triton's interpreter (private): a Triton
    without it fails every test here rather than silently running programs in order."""
    if DEVICE != "cpu":
        return
    try:
        from triton.runtime import interpreter
    except ImportError as exc:
        pytest.fail(f"Triton's interpreter cannot be imported ({exc}): the fixture running "
                    "programs last to first needs it; update the fixture for this Triton "
                    f"({triton.__version__})")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not callable(getattr(builder, "set_grid_idx", None)) \
            or not callable(getattr(builder, "set_grid_dim", None)):
        pytest.fail("triton.runtime.interpreter.InterpreterBuilder.set_grid_idx / set_grid_dim "
                    f"are missing in Triton {triton.__version__}: the fixture running programs "
                    "last to first cannot work; update it for this Triton's interpreter")
    original = builder.set_grid_idx

    def set_grid_idx(self, x, y, z):
        original(self, self.grid_dim[0] - 1 - x, y, z)

    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


@triton.jit
def _record_program_order(counter_ptr, order_ptr):
    """``order[pid]`` = how many programs ran before this one."""
    pid = tl.program_id(0)
    tl.store(order_ptr + pid, tl.atomic_add(counter_ptr, 1))


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's order; a GPU has none")
def test_interpreter_runs_programs_last_to_first():
    """The autouse fixture has its effect: program ``n - 1`` runs first, program 0 last."""
    counter = torch.zeros(1, dtype=torch.int32)
    order = torch.full((5,), -1, dtype=torch.int32)
    _record_program_order[(5,)](counter, order)
    assert order.tolist() == [4, 3, 2, 1, 0]


# (B, T, D, K) and the launch path each exercises (checked, so a config change cannot silently
# leave a path untested).
SHAPES = {
    "decode-1x1": ((1, 1, 1, 1), dict(rows=1, single_tile=True)),
    "decode-D64": ((3, 1, 64, 6), dict(rows=1, single_tile=True)),
    "D7-K33": ((2, 5, 7, 33), dict(rows=1, single_tile=True)),
    "rows-D577-K17": ((1, 3, 577, 17), dict(rows=1, single_tile=False)),
    "rows-D577-K1": ((4, 3, 577, 1), dict(rows=1, single_tile=True)),
    "dot-D200": ((2, 66, 200, 5), dict(rows=16, single_tile=False)),
    "dot-D31-K20": ((1, 130, 31, 20), dict(rows=16, single_tile=True)),
}


def _check_against_reference(hidden_in, vectors, weights, mask, norm, make_view=None,
                             with_proj=True, with_run=True):
    check_against_reference(triton_steer_, hidden_in, vectors, weights, mask, norm,
                            make_view=make_view, with_proj=with_proj, with_run=with_run,
                            device=DEVICE)


@pytest.mark.parametrize("dtype,mask_kind", DTYPE_MASK_CASES,
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("norm", [False, True], ids=["add", "norm"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_reference(case, norm, dtype, mask_kind):
    shape, expected_path = SHAPES[case]
    batch, seq_len, dim, n_vec = shape
    cfg = launch_config(seq_len, dim, n_vec)
    assert {k: getattr(cfg, k) for k in expected_path} == expected_path, cfg
    gen = torch.Generator().manual_seed(case_seed(case, mask_kind))
    hidden, vectors, weights = random_inputs(shape, dtype, gen)
    mask = make_mask(mask_kind, batch, seq_len, gen)
    _check_against_reference(hidden, vectors, weights, mask, norm)


@pytest.mark.parametrize("view", VIEWS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 4, 33, 3), (2, 66, 70, 4)], ids=["rows", "dot"])
def test_non_contiguous_hidden(shape, dtype, view):
    gen = torch.Generator().manual_seed(1)
    hidden, vectors, weights = random_inputs(shape, dtype, gen)
    mask = make_mask("random", shape[0], shape[1], gen)
    _check_against_reference(hidden, vectors, weights, mask, True, make_view=view)


@pytest.mark.parametrize("with_proj,with_run", [(False, False), (True, False), (False, True)])
def test_optional_outputs(with_proj, with_run):
    gen = torch.Generator().manual_seed(2)
    hidden, vectors, weights = random_inputs((2, 70, 48, 3), torch.bfloat16, gen)
    mask = make_mask("random", 2, 70, gen)
    _check_against_reference(hidden, vectors, weights, mask, False, with_proj=with_proj,
                             with_run=with_run)


@pytest.mark.parametrize("seq_len", [3, 80], ids=["rows", "dot"])
def test_d_loop_with_lowered_tile_cap(monkeypatch, seq_len):
    """A D loop of many tiles, including a ragged last one (D = 200 = 6 x 32 + 8)."""
    monkeypatch.setattr(triton_steer, "MAX_BLOCK_D", 32)
    cfg = launch_config(seq_len, 200, 2)
    assert cfg.block_d == 32 and not cfg.single_tile
    gen = torch.Generator().manual_seed(3)
    for norm in (False, True):
        hidden, vectors, weights = random_inputs((2, seq_len, 200, 2), torch.float16, gen)
        mask = make_mask("random", 2, seq_len, gen)
        _check_against_reference(hidden, vectors, weights, mask, norm)


# --- the packed-token layout (emokern::steer_packed_), same kernel ------------------------------

# The launch path each packed shape exercises (with a split residual).
PACKED_PATHS = {
    "decode-N5": dict(rows=1, single_tile=True),
    "D7-K33": dict(rows=1, single_tile=True),
    "rows-D577-K17": dict(rows=1, single_tile=False),
    "dot-D200": dict(rows=16, single_tile=False),
    "dot-D31-K20": dict(rows=16, single_tile=True),
}


@pytest.mark.parametrize("dtype,residual,norm,layout", PACKED_CASES,
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("case", list(PACKED_SHAPES))
def test_packed_matches_reference(case, dtype, residual, norm, layout):
    n_tokens, _, dim, n_vec, _ = PACKED_SHAPES[case]
    cfg = launch_config(n_tokens, dim, n_vec, residual=True)
    assert {k: getattr(cfg, k) for k in PACKED_PATHS[case]} == PACKED_PATHS[case], cfg
    hidden, res, vectors, slot_weights, token_slot = packed_case(case, dtype, residual, layout)
    check_packed_against_reference(triton_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, norm, device=DEVICE)


@pytest.mark.parametrize("layout", ["none", "one"])
@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "dot"])
def test_packed_all_or_no_tokens_steered(n_tokens, layout):
    gen = torch.Generator().manual_seed(case_seed("all-or-none", layout, str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 40, 3, 2, torch.bfloat16, True,
                                                       gen)
    token_slot = make_token_slot(layout, n_tokens, n_tokens + 3, 2, gen)
    check_packed_against_reference(triton_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, True, device=DEVICE)


@pytest.mark.parametrize("n_tokens", [7, 66], ids=["rows", "dot"])
def test_packed_strided_rows_and_optional_outputs(n_tokens):
    """Rows of a wider buffer (row stride > D), and each optional output alone."""
    gen = torch.Generator().manual_seed(case_seed("packed-strided", str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 48, 4, 5, torch.float16, True,
                                                       gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens + 4, 5, gen)
    check_packed_against_reference(triton_steer_packed_, hidden, res, vectors, slot_weights,
                                   token_slot, True, device=DEVICE, row_stride=53)
    for with_proj, with_run in ((False, False), (True, False), (False, True)):
        check_packed_against_reference(triton_steer_packed_, hidden, None, vectors, slot_weights,
                                       token_slot, False, device=DEVICE, with_proj=with_proj,
                                       with_run=with_run)


@pytest.mark.parametrize("n_tokens", [5, 70], ids=["rows", "dot"])
def test_packed_d_loop_with_lowered_tile_cap(monkeypatch, n_tokens):
    """Many D tiles with a ragged last one (D = 200), with and without norm preservation."""
    monkeypatch.setattr(triton_steer, "MAX_BLOCK_D", 32)
    cfg = launch_config(n_tokens, 200, 2, residual=True)
    assert cfg.block_d == 32 and not cfg.single_tile
    gen = torch.Generator().manual_seed(case_seed("packed-d-loop", str(n_tokens)))
    for norm in (False, True):
        hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 200, 2, 3, torch.bfloat16,
                                                           True, gen)
        token_slot = make_token_slot("runs", n_tokens, n_tokens, 3, gen)
        check_packed_against_reference(triton_steer_packed_, hidden, res, vectors,
                                       slot_weights, token_slot, norm, device=DEVICE)


@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "dot"])
def test_packed_out_of_range_slots_are_untouched(n_tokens):
    """A slot outside [-1, S) (validation rejects it when it can read values; under graph
    capture it cannot) leaves its token untouched and uncounted instead of reading or writing
    out of bounds."""
    gen = torch.Generator().manual_seed(case_seed("packed-out-of-range", str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 32, 3, 4, torch.float32, True,
                                                       gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens, 4, gen)
    bad = token_slot.clone()
    bad[::3] = torch.tensor([4, -2, 1 << 30], dtype=torch.int32).repeat(n_tokens)[:len(bad[::3])]
    sane = torch.where((bad >= -1) & (bad < 4), bad, -1)
    want, want_proj = hidden.clone(), torch.empty(n_tokens, 3)
    want_run = emokern.RunningProjections(4, 3)
    ref_steer_packed_(want, res, vectors, slot_weights, sane, True, want_proj,
                      *want_run.tensors())
    got, got_res, v, w, bad_dev = to_device(DEVICE, hidden, res, vectors, slot_weights, bad)
    got_proj = torch.empty(n_tokens, 3, device=DEVICE)
    run = emokern.RunningProjections(4, 3, device=DEVICE)
    triton_steer_packed_(got, got_res, v, w, bad_dev, True, got_proj, *run.tensors())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_proj.cpu(), want_proj, rtol=1e-5, atol=1e-4)
    assert torch.equal(run.count.cpu(), want_run.count)
    torch.testing.assert_close(run.last.cpu(), want_run.last, equal_nan=True, rtol=1e-5,
                               atol=1e-4)


def test_packed_single_token_needs_a_contiguous_last_dimension():
    """The launcher itself (what runner_for hands out, without the wrapper's checks) refuses a
    row with a strided last dimension: the kernel reads rows with stride 1, so it would steer
    the wrong elements."""
    vectors, weights = torch.randn(2, 8, device=DEVICE), torch.randn(1, 2, device=DEVICE)
    token_slot = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    row = torch.randn(1, 16, device=DEVICE)[:, ::2]
    before = row.clone()
    with pytest.raises(ValueError, match="hidden must have a contiguous last dimension"):
        triton_steer_packed_(row, None, vectors, weights, token_slot, False, None, None, None,
                             None)
    with pytest.raises(ValueError, match="residual must have a contiguous last dimension"):
        triton_steer_packed_(before.clone(), row, vectors, weights, token_slot, False, None,
                             None, None, None)
    assert torch.equal(row, before)


def test_public_wrapper_runs_triton_backend():
    gen = torch.Generator().manual_seed(4)
    hidden, vectors, weights = random_inputs((2, 6, 96, 4), torch.bfloat16, gen)
    mask = make_mask("random", 2, 6, gen)
    expected, expected32 = hidden.clone(), hidden.float()
    ref_run = emokern.RunningProjections(2, 4)
    ref_steer_(expected, vectors, weights, mask, True, None, *ref_run.tensors())
    ref_steer_(expected32, vectors, weights, mask, True)
    hidden, vectors, weights, mask = to_device(DEVICE, hidden, vectors, weights, mask)
    run = emokern.RunningProjections(2, 4, device=DEVICE)
    # float64 vectors exercise the wrapper's conversion to the kernel's float32 layout.
    emokern.steer_(hidden, vectors.double(), weights, mask=mask, norm_preserving=True,
                   running=run, backend="triton")
    assert_flash_close("hidden", hidden, expected32, expected)
    torch.testing.assert_close(run.mean().cpu(), ref_run.mean(), equal_nan=True)


# --- projection levels and bounds (both layouts, the same kernel) --------------------------------

INF = float("inf")
#: A finite bound no projection reaches: rows of a slot bounded by it are inside their bounds.
NEVER = 1e30


def make_bounds(gen, n_slots, n_vec, *, levels_only=False):
    """``bounds [S, 2, K]``: per slot and emotion open, a level, a cap, a floor or a band around
    the projections' spread, emotion 0 of slot 0 a level (every row of slot 0 is corrected);
    with several slots the last one's bounds are finite but never reached (its rows must be
    written as without bounds)."""
    kind = torch.randint(0, 5, (n_slots, n_vec), generator=gen)
    kind[0, 0] = 1
    if levels_only:
        kind.fill_(1)
    value = torch.randn(n_slots, n_vec, generator=gen) * 3
    width = torch.rand(n_slots, n_vec, generator=gen) * 2
    lower = torch.where((kind == 1) | (kind == 3) | (kind == 4), value, -INF)
    upper = torch.where((kind == 1) | (kind == 2), value,
                        torch.where(kind == 4, value + width, INF))
    bounds = torch.stack([lower, upper], dim=1)
    if n_slots > 1 and not levels_only:
        bounds[-1, 0], bounds[-1, 1] = -NEVER, NEVER
    return bounds.contiguous()


def projections_after(stream, vectors, row_weights, norm):
    """``p' [N, K]`` float64: each row's projections after the pushes (and the rescale)."""
    x, v = stream.double(), vectors.double()
    u = v / v.norm(dim=1, keepdim=True)
    y = x + row_weights.double() @ v
    if norm:
        y = y * x.norm(dim=1, keepdim=True) / y.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return y @ u.T


def median_cap(hidden, vectors, weights, norm):
    """``bounds [1, 2, K]`` of one sequence ``hidden [T, D]`` with mix ``weights [1, K]``: a cap
    on emotion 0 at the median of its projections after the pushes (half the rows above it),
    the others never reached."""
    p_after = projections_after(hidden, vectors, weights.expand(hidden.shape[0], -1), norm)
    n_vec = vectors.shape[0]
    return torch.tensor([[-INF] + [-NEVER] * (n_vec - 1),
                         [float(p_after[:, 0].median())] + [NEVER] * (n_vec - 1)])[None]


def row_status(stream, vectors, row_weights, row_bounds, norm, margin=1e-3):
    """``(inside, outside)`` [N] bool, in float64 from the definition: every projection after
    the pushes inside its bounds by ``margin`` (written as without bounds), or one outside by
    ``margin`` (corrected); a row within ``margin`` of a bound is neither."""
    p_after = projections_after(stream, vectors, row_weights, norm)
    lower, upper = row_bounds[:, 0].double(), row_bounds[:, 1].double()
    tol = margin * (1 + p_after.abs())
    inside = ((p_after > lower + tol) & (p_after < upper - tol)).all(dim=1)
    outside = ((p_after < lower - tol) | (p_after > upper + tol)).any(dim=1)
    return inside, outside


def _packed_call(fn, device, hidden, residual, vectors, slot_weights, token_slot, norm, bounds):
    """One call of ``fn`` (``emokern::steer_packed_``'s positional arguments) on ``device``,
    with ``bounds`` (and their Gram matrix) or without; returns the CPU copies of
    ``(hidden, proj_out, run_sum, run_count, run_last)``."""
    gram = None if bounds is None else unit_gram(vectors)
    h, r, v, w, s, b, g = to_device(device, hidden.clone(), residual, vectors, slot_weights,
                                    token_slot, bounds, gram)
    proj = torch.full((token_slot.shape[0], vectors.shape[0]), -7.0, device=device)
    run = emokern.RunningProjections(slot_weights.shape[0], vectors.shape[0], device=device)
    run.last.fill_(-3.0)
    fn(h, r, v, w, s, norm, proj, *run.tensors(), b, g)
    return [t.cpu() for t in (h, proj, *run.tensors())]


def _batched_call(fn, device, hidden, vectors, weights, mask, norm, bounds):
    """:func:`_packed_call` for ``emokern::steer_``."""
    gram = None if bounds is None else unit_gram(vectors)
    h, v, w, m, b, g = to_device(device, hidden.clone(), vectors, weights, mask, bounds, gram)
    batch, seq_len, _ = hidden.shape
    proj = torch.full((batch, seq_len, vectors.shape[0]), -7.0, device=device)
    run = emokern.RunningProjections(batch, vectors.shape[0], device=device)
    run.last.fill_(-3.0)
    fn(h, v, w, m, norm, proj, *run.tensors(), b, g)
    return [t.cpu() for t in (h, proj, *run.tensors())]


def assert_bounds_match(got, plain, low, f32, hidden, steered, inside, outside):
    """The kernel with bounds (``got``) against the reference with bounds in the storage dtype
    (``low``) and in float32 (``f32``), flash-attention's rule, and against the kernel without
    bounds (``plain``): rows without a slot untouched, rows inside their bounds bit-identical to
    ``plain``, readings and running statistics those of ``plain`` (projections of the input).
    Each is ``(hidden, proj, run_sum, run_count, run_last)`` with rows flattened."""
    assert bool(inside.any()) and bool(outside.any()), "the case must have rows of both kinds"
    out, out_plain = got[0], plain[0]
    assert torch.equal(out[~steered], hidden[~steered]), "rows without a slot changed"
    assert_flash_close("hidden", out[steered], f32[0][steered], low[0][steered])
    assert torch.equal(out[inside], out_plain[inside]), \
        "rows inside their bounds differ from the kernel without bounds"
    assert not torch.equal(out[outside], out_plain[outside])
    assert torch.equal(got[1], plain[1]), "proj_out is not the projection of the input"
    assert_flash_close("proj_out", got[1], f32[1], low[1])
    assert torch.equal(got[3], f32[3]), "run_count"
    torch.testing.assert_close(got[2], plain[2], rtol=1e-6, atol=1e-5)  # atomics' order
    assert_flash_close("run_sum", got[2], f32[2], low[2])
    assert torch.equal(got[4], plain[4]), "run_last"


def check_packed_bounds(hidden, residual, vectors, slot_weights, token_slot, norm, bounds):
    """The packed op with ``bounds`` on the Triton kernel against the reference and against the
    kernel without bounds (:func:`assert_bounds_match`)."""
    n_tokens = hidden.shape[0]
    args = (vectors, slot_weights, token_slot, norm)
    got = _packed_call(triton_steer_packed_, DEVICE, hidden, residual, *args, bounds)
    plain = _packed_call(triton_steer_packed_, DEVICE, hidden, residual, *args, None)
    low = _packed_call(ref_steer_packed_, "cpu", hidden, residual, *args, bounds)
    f32 = _packed_call(ref_steer_packed_, "cpu", hidden.float(),
                       None if residual is None else residual.float(), *args, bounds)
    slot = token_slot[:n_tokens].long()
    steered = slot >= 0
    stream = hidden.double() if residual is None else hidden.double() + residual.double()
    inside, outside = row_status(stream, vectors, slot_weights[slot.clamp_min(0)],
                                 bounds[slot.clamp_min(0)], norm)
    for t in (got, plain, low, f32):
        t[1] = t[1][:n_tokens]
    assert_bounds_match(got, plain, low, f32, hidden, steered, inside & steered,
                        outside & steered)
    return got[0]


def check_batched_bounds(hidden, vectors, weights, mask, norm, bounds):
    """:func:`check_packed_bounds` for the batched op (``bounds [B, 2, K]``)."""
    batch, seq_len, dim = hidden.shape
    args = (vectors, weights, mask, norm)
    got = _batched_call(triton_steer_, DEVICE, hidden, *args, bounds)
    plain = _batched_call(triton_steer_, DEVICE, hidden, *args, None)
    low = _batched_call(ref_steer_, "cpu", hidden, *args, bounds)
    f32 = _batched_call(ref_steer_, "cpu", hidden.float(), *args, bounds)
    seq = torch.arange(batch).repeat_interleave(seq_len)
    steered = torch.ones(batch * seq_len, dtype=torch.bool) if mask is None else mask.reshape(-1)
    inside, outside = row_status(hidden.reshape(-1, dim), vectors, weights[seq], bounds[seq],
                                 norm)
    for t in (got, plain, low, f32):
        t[0] = t[0].reshape(batch * seq_len, dim)
        t[1] = t[1].reshape(batch * seq_len, -1)
    assert_bounds_match(got, plain, low, f32, hidden.reshape(-1, dim), steered,
                        inside & steered, outside & steered)
    return got[0]


#: ``(N, N_max, D, K, S)`` of the packed comparisons with bounds and the launch path each takes
#: (with and without a split residual): decode-like row mode, row mode over several D tiles
#: (577 = 2 · 256 + 65), dot mode in one tile and over several.
BOUNDS_PACKED_SHAPES = {
    "decode-N5": ((5, 8, 64, 6, 4), dict(rows=1, single_tile=True)),
    "rows-D577": ((3, 4, 577, 5, 3), dict(rows=1, single_tile=False)),
    "dot-D24": ((70, 80, 24, 5, 6), dict(rows=16, single_tile=True)),
    "dot-D200": ((70, 70, 200, 5, 6), dict(rows=16, single_tile=False)),
}
#: ``(dtype, residual, norm_preserving, slot layout)`` run on every packed shape with bounds.
BOUNDS_PACKED_CASES = [
    (torch.bfloat16, True, True, "runs"), (torch.float16, False, False, "random"),
    (torch.float32, True, False, "random"), (torch.float32, False, True, "runs"),
]


@pytest.mark.parametrize("dtype,residual,norm,layout", BOUNDS_PACKED_CASES,
                         ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("case", list(BOUNDS_PACKED_SHAPES))
def test_packed_bounds_match_reference(case, dtype, residual, norm, layout):
    (n_tokens, n_max, dim, n_vec, n_slots), path = BOUNDS_PACKED_SHAPES[case]
    cfg = launch_config(n_tokens, dim, n_vec, residual=residual)
    assert {k: getattr(cfg, k) for k in path} == path, cfg
    gen = torch.Generator().manual_seed(case_seed("packed-bounds", case, str(dtype),
                                                  str(residual), str(norm), layout))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, dim, n_vec, n_slots, dtype,
                                                       residual, gen)
    token_slot = make_token_slot(layout, n_tokens, n_max, n_slots, gen)
    head = token_slot[:n_tokens]
    head[head == n_slots - 1] = 0
    head[::13] = n_slots - 1  # rows inside their bounds, in several programs
    head[1] = 0  # a row to correct
    check_packed_bounds(hidden, res, vectors, slot_weights, token_slot, norm,
                        make_bounds(gen, n_slots, n_vec))


#: ``(B, T, D, K)`` of the batched comparisons with bounds and the launch path of each.
BOUNDS_BATCHED_SHAPES = {
    "decode-D64": ((3, 1, 64, 6), dict(rows=1, single_tile=True)),
    "rows-D577": ((2, 3, 577, 5), dict(rows=1, single_tile=False)),
    "dot-D40": ((1, 66, 40, 5), dict(rows=16, single_tile=True)),
    "dot-D200": ((1, 66, 200, 3), dict(rows=16, single_tile=False)),
}


@pytest.mark.parametrize("dtype,mask_kind,norm", [
    (torch.bfloat16, "random", True), (torch.float32, "none", False),
    (torch.float16, "all", True)], ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("case", list(BOUNDS_BATCHED_SHAPES))
def test_batched_bounds_match_reference(case, dtype, mask_kind, norm):
    (batch, seq_len, dim, n_vec), path = BOUNDS_BATCHED_SHAPES[case]
    cfg = launch_config(seq_len, dim, n_vec)
    assert {k: getattr(cfg, k) for k in path} == path, cfg
    gen = torch.Generator().manual_seed(case_seed("batched-bounds", case, mask_kind))
    hidden, vectors, weights = random_inputs((batch, seq_len, dim, n_vec), dtype, gen)
    mask = make_mask(mask_kind, batch, seq_len, gen)
    bounds = make_bounds(gen, batch + 1, n_vec)
    if batch == 1:  # one sequence: a cap on emotion 0 at its median, half the rows above it
        bounds = median_cap(hidden[0], vectors, weights, norm)
    else:  # sequence 0 has a level (every row corrected), the last one is never reached
        bounds = torch.cat([bounds[:batch - 1], bounds[-1:]])
    if mask is not None:
        mask[0, 0] = True  # random masks leave sequence 0 unsteered
        mask[-1, 0] = True
    check_batched_bounds(hidden, vectors, weights, mask, norm, bounds.contiguous())


@pytest.mark.parametrize("solve_elements", [1024, 256], ids=["4-rows", "1-row"])
def test_bounds_solved_in_groups_of_rows(monkeypatch, solve_elements):
    """A dot-mode program's 16 rows solved 4 or 1 at a time (as for K > 16); the batched
    layout (one weight row per program) with groups of 4."""
    monkeypatch.setattr(triton_steer, "SOLVE_ELEMENTS", solve_elements)
    cfg = launch_config(64, 24, 3, residual=True)
    assert cfg.rows == 16 and cfg.solve_rows == solve_elements // 256
    gen = torch.Generator().manual_seed(case_seed("bounds-groups", str(solve_elements)))
    hidden, res, vectors, slot_weights = packed_inputs(64, 24, 3, 4, torch.float32, True, gen)
    token_slot = make_token_slot("random", 64, 64, 3, gen)
    token_slot[::7] = 3  # the never-reached slot
    check_packed_bounds(hidden, res, vectors, slot_weights, token_slot, True,
                        make_bounds(gen, 4, 3))
    if solve_elements == 1024:
        hidden, vectors, weights = random_inputs((1, 64, 24, 3), torch.bfloat16, gen)
        check_batched_bounds(hidden, vectors, weights, None, False,
                             median_cap(hidden[0], vectors, weights, False))


@pytest.mark.parametrize("norm", [False, True], ids=["add", "norm"])
@pytest.mark.parametrize("n_tokens", [6, 70], ids=["rows", "dot"])
def test_a_leveled_row_reads_its_level(n_tokens, norm):
    """The defining property on the kernel: after the op, the projection of every steered
    row's stream on each leveled direction is its level (float32 rows)."""
    gen = torch.Generator().manual_seed(case_seed("bounds-levels", str(n_tokens), str(norm)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 48, 4, 3, torch.float32, True,
                                                       gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens, 3, gen)
    bounds = make_bounds(gen, 3, 4, levels_only=True)
    h, r, v, w, s, b, g = to_device(DEVICE, hidden, res, vectors, slot_weights, token_slot,
                                    bounds, unit_gram(vectors))
    triton_steer_packed_(h, r, v, w, s, norm, None, None, None, None, b, g)
    u = vectors / vectors.norm(dim=1, keepdim=True)
    reread = (h.cpu() + res) @ u.T
    steered = token_slot >= 0
    want = bounds[token_slot[steered].long(), 0]
    torch.testing.assert_close(reread[steered], want, rtol=0, atol=1e-4)
    assert torch.equal(h.cpu()[~steered], hidden[~steered])


@pytest.mark.parametrize("n_tokens", [5, 70], ids=["rows", "dot"])
def test_bounds_with_dependent_directions(n_tokens):
    """Direction 2 lies in the span of 0 and 1: its pivot is dropped, the levels of 0, 1 and 3
    are met exactly and the kernel agrees with the reference, which drops it too."""
    gen = torch.Generator().manual_seed(case_seed("bounds-dependent", str(n_tokens)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, 32, 4, 2, torch.float32, True,
                                                       gen)
    vectors[2] = 0.6 * vectors[0] + 0.8 * vectors[1]
    token_slot = make_token_slot("random", n_tokens, n_tokens, 2, gen)
    token_slot[-1] = 1  # the never-reached slot
    bounds = make_bounds(gen, 2, 4)
    bounds[0, 0] = bounds[0, 1] = torch.tensor([1.0, -2.0, 0.5, 1.5])  # levels on all four
    got = check_packed_bounds(hidden, res, vectors, slot_weights, token_slot, False, bounds)
    u = vectors / vectors.norm(dim=1, keepdim=True)
    leveled = token_slot[:n_tokens] == 0
    reread = (got[leveled] + res[leveled]) @ u.T
    torch.testing.assert_close(reread[:, [0, 1, 3]], bounds[0, 0, [0, 1, 3]].expand(
        int(leveled.sum()), 3), rtol=0, atol=1e-4)
    assert (reread[:, 2] - 0.5).abs().max() > 1e-2  # not a target: where the others moved it


def test_public_wrappers_run_bounds_on_triton():
    """``emokern.steer_`` / ``steer_packed_`` with ``bounds`` (and the Gram matrix they compute)
    on the Triton backend give the reference's rows."""
    gen = torch.Generator().manual_seed(case_seed("bounds-wrapper"))
    hidden, vectors, weights = random_inputs((2, 4, 40, 3), torch.float32, gen)
    bounds = make_bounds(gen, 2, 3)
    want = hidden.clone()
    ref_steer_(want, vectors, weights, None, True, None, None, None, None, bounds,
               unit_gram(vectors))
    got, v, w, b = to_device(DEVICE, hidden.clone(), vectors, weights, bounds)
    emokern.steer_(got, v, w, norm_preserving=True, bounds=b, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    flat, flat_want = hidden.reshape(8, 40).clone(), want.reshape(8, 40)
    token_slot = torch.arange(2, dtype=torch.int32).repeat_interleave(4)
    got, v, w, s, b = to_device(DEVICE, flat, vectors, weights, token_slot, bounds)
    steer_packed_(got, v, w, s, norm_preserving=True, bounds=b, backend="triton")
    torch.testing.assert_close(got.cpu(), flat_want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens,dim,n_vec", [(4, 64, 33), (64, 48, 20)],
                         ids=["rows-K33", "dot-K20"])
def test_bounds_with_many_directions(n_tokens, dim, n_vec):
    """K = 33 (BLOCK_K = 64, one row) and K = 20 in dot mode (BLOCK_K = 32: the 16 rows solved
    4 at a time); slow under the interpreter (the solve is O(K²) steps)."""
    cfg = launch_config(n_tokens, dim, n_vec, residual=True)
    assert cfg.solve_rows == (1 if n_tokens < 64 else 4), cfg
    gen = torch.Generator().manual_seed(case_seed("bounds-many", str(n_vec)))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, dim, n_vec, 3, torch.float32,
                                                       True, gen)
    token_slot = make_token_slot("random", n_tokens, n_tokens, 3, gen)
    token_slot[0] = 2  # the never-reached slot
    bounds = make_bounds(gen, 3, n_vec)
    bounds[:2, 0] = torch.where(bounds[:2, 0] == -INF, -INF, bounds[:2, 0] - 6)  # fewer active
    check_packed_bounds(hidden, res, vectors, slot_weights, token_slot, True, bounds)


def test_launch_config_is_fixed_and_graph_friendly():
    """One config per (T, D, K), chosen without autotuning; decode is one program per sequence."""
    assert not hasattr(triton_steer._steer_kernel, "configs")  # not a triton Autotuner
    decode = launch_config(1, 8192, 64)
    assert decode.rows == 1 and not decode.single_tile
    assert launch_config(1, 8192, 64) is decode  # cached: no per-step work
    for seq_len in (1, 7, 63, 64, 4096):
        for dim in (1, 7, 576, 577, 4096, 4099, 8192):
            for n_vec in (1, 6, 33, 64):
                cfg = launch_config(seq_len, dim, n_vec)
                assert cfg.block_k >= n_vec and cfg.block_k & (cfg.block_k - 1) == 0
                assert cfg.block_d & (cfg.block_d - 1) == 0
                assert cfg.single_tile == (dim <= cfg.block_d)
                assert 1 <= cfg.num_warps <= 8
                assert cfg.rows == (triton_steer.DOT_ROWS if seq_len >= 64 else 1)
                if cfg.rows > 1:  # tl.dot needs M, N, K >= 16
                    assert cfg.block_k >= 16 and cfg.block_d >= 16


def _run_python(code: str, env_drop=(), timeout=300, args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_register_cuda_kernel():
    """The Triton kernels become the CUDA kernels of both ops; a CUDA-keyed dispatch runs them
    (on CPU tensors here, through the interpreter). In a subprocess: registration is global."""
    result = _run_python("""
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch
        from emokern.ops.reference import ref_steer_
        from emokern.ops.triton_steer import register_cuda_kernel
        from emokern.ops.reference import ref_steer_packed_
        ops = ("emokern::steer_", "emokern::steer_packed_")
        cuda_kernel = lambda op: torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        if not torch.cuda.is_available():
            assert not any(map(cuda_kernel, ops))
        registered = register_cuda_kernel()
        assert all(map(cuda_kernel, ops))
        if registered:
            assert register_cuda_kernel()  # idempotent
            for op in ops:
                dump = torch._C._dispatch_dump(op)
                cuda_line = [line for line in dump.splitlines() if line.startswith("CUDA:")][0]
                assert "triton_steer.py" in cuda_line, dump
        else:  # a compiled CUDA kernel was already registered: it stays
            assert register_cuda_kernel(override=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        h = torch.randn(2, 3, 40, dtype=torch.bfloat16)
        v, w = torch.randn(4, 40), torch.randn(2, 4)
        p_ref = torch.empty(2, 3, 4)
        h_ref = h.clone()
        ref_steer_(h_ref, v, w, None, True, p_ref)
        h, v, w = h.to(device), v.to(device), w.to(device)
        p = torch.empty(2, 3, 4, device=device)
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        torch.ops.emokern.steer_.default.redispatch(keys, h, v, w, None, True, p, None, None,
                                                    None, None, None)
        err = (h.cpu().float() - h_ref.float()).abs().max().item()
        assert err <= 0.07, err  # one bf16 ulp at |y| < 16
        torch.testing.assert_close(p.cpu(), p_ref)
        # The packed op through the same CUDA-keyed dispatch.
        h = torch.randn(5, 40, dtype=torch.bfloat16)
        r = torch.randn(5, 40, dtype=torch.bfloat16)
        sw = torch.randn(3, 4)
        slots = torch.tensor([0, -1, 2, 2, 1, 0], dtype=torch.int32)
        h_ref, p_ref = h.clone(), torch.zeros(6, 4)
        ref_steer_packed_(h_ref, r, v.cpu(), sw, slots, True, p_ref)
        h, r, sw, slots = h.to(device), r.to(device), sw.to(device), slots.to(device)
        p = torch.zeros(6, 4, device=device)
        torch.ops.emokern.steer_packed_.default.redispatch(keys, h, r, v, sw, slots, True, p,
                                                           None, None, None, None, None)
        err = (h.cpu().float() - h_ref.float()).abs().max().item()
        assert err <= 0.07, err
        torch.testing.assert_close(p.cpu(), p_ref)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


_NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_needs_ptxas = pytest.mark.skipif(not os.path.exists(os.path.join(_NVIDIA_BIN, "ptxas")),
                                  reason="Triton's NVIDIA backend (ptxas) is not installed")


def compile_for_sm90(cases) -> list:
    """Lower each case ``[layout, (seq_len, D, K), dtype, full, norm, bounds]`` (``full``: every
    optional input and output) of the steer kernel to an sm_90 cubin in a subprocess (no GPU,
    no interpreter); returns ``[*case, global scratch bytes, cuobjdump's resource usage, whether
    the TTIR holds the solve's IEEE square root]`` per case."""
    result = _run_python("""
        import json, os, subprocess, sys, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from emokern.ops import triton_steer as ts
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")
        report = []
        for layout, (seq_len, dim, n_vec), dtype, full, norm, bounds in json.loads(sys.argv[1]):
            is_packed = layout == "packed"
            cfg = ts.launch_config(seq_len, dim, n_vec, residual=is_packed and full)
            opt = lambda ty: ty if full else "constexpr"
            signature = {
                "hidden_ptr": "*" + dtype,
                "residual_ptr": opt("*" + dtype) if is_packed else "constexpr",
                "vectors_ptr": "*fp32", "weights_ptr": "*fp32",
                "slot_ptr": "*i32" if is_packed else opt("*u8"), "proj_ptr": opt("*fp32"),
                "sum_ptr": opt("*fp32"), "count_ptr": opt("*i64"), "last_ptr": opt("*fp32"),
                "bounds_ptr": "*fp32" if bounds else "constexpr",
                "gram_ptr": "*fp32" if bounds else "constexpr",
                "seq_len": "i32", "dim": "i32", "n_vec": "i32", "n_slots": "i32",
                "stride_b": "i64", "stride_t": "i64", "res_stride_t": "i64", "n_chunks": "i32"}
            constants = {name: None for name, ty in signature.items() if ty == "constexpr"}
            constants.update(
                PACKED=is_packed, HAS_MASK=full and not is_packed,
                HAS_RESIDUAL=full and is_packed, NORM_PRESERVING=norm, HAS_PROJ=full,
                HAS_RUN=full, ATOMIC_RUN=full and (is_packed or cfg.rows > 1), ROWS=cfg.rows,
                USE_DOT=cfg.rows > 1, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
                SINGLE_TILE=cfg.single_tile, SCAN_BLOCK=ts.scan_block(cfg), EPS=1e-6,
                BOUNDS=bounds, SOLVE_ROWS=cfg.solve_rows, PIVOT_EPS=1e-4)
            for name in constants:
                signature.setdefault(name, "constexpr")
            names = list(signature)
            source = ASTSource(fn=ts._steer_kernel, signature=signature,
                               constexprs={(names.index(k),): v for k, v in constants.items()})
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options=ts.compile_options(cfg))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                       capture_output=True, text=True, check=True).stdout
            report.append([layout, seq_len, dim, n_vec, dtype, full, norm, bounds,
                           kernel.metadata.global_scratch_size, usage,
                           "tt.precise_sqrt" in kernel.asm["ttir"]])
        print(json.dumps(report))
    """, env_drop=("TRITON_INTERPRET",), args=[json.dumps(cases)])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) == len(cases)
    return report


def assert_no_spills(report):
    for *case, global_scratch, usage, _ in report:
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
        assert local == 0 and registers <= 255, (case, usage)
        # A launch needing global scratch would allocate it: not CUDA-graph friendly.
        assert global_scratch == 0, case


@_needs_ptxas
def test_compiles_for_sm90():
    """Lower representative specialisations of both layouts (decode, long rows, prefill dot
    mode, packed batches with and without a split residual; every dtype; every optional output;
    norm preservation) to sm_90 cubins, and check that none spills to local memory or needs a
    global scratch buffer. Without bounds, the solve is not compiled at all (the ``BOUNDS``
    constexpr removes it: the generated code is that of the kernel before bounds existed)."""
    shapes = [(1, 576, 6), (1, 8192, 64), (4096, 4096, 8), (128, 577, 33), (1, 7, 1)]
    variants = [("bf16", True, True), ("bf16", False, False)]
    cases = [("batched", shape, *v, False) for shape in shapes for v in variants]
    cases += [("batched", (1, 576, 6), "fp32", True, False, False),
              ("batched", (4096, 4096, 8), "fp16", True, True, False)]
    # Packed: (N, D, K); N >= 64 is dot mode (a decode batch of 64+ requests too).
    packed = [(8, 576, 6), (64, 576, 6), (256, 8192, 64), (8192, 4096, 8), (3, 7, 1)]
    cases += [("packed", shape, *v, False) for shape in packed for v in variants]
    cases += [("packed", (64, 4096, 16), "fp16", True, False, False),
              ("packed", (8, 2048, 6), "fp32", True, True, False)]
    report = compile_for_sm90(cases)
    assert_no_spills(report)
    assert not any(has_solve for *_, has_solve in report)


@_needs_ptxas
def test_compiles_for_sm90_with_bounds():
    """The specialisations with projection bounds: decode and dot mode, one D tile and many,
    the solve over all 16 rows of a program (K <= 16), 4 at a time (K = 24) and one at a time
    (K = 33, 64); none spills or needs global scratch."""
    cases = [
        ("batched", (1, 576, 6), "bf16", True, True, True),
        ("batched", (1, 8192, 64), "bf16", False, False, True),
        ("batched", (4096, 4096, 8), "bf16", True, True, True),
        ("batched", (128, 64, 6), "fp32", True, False, True),
        ("packed", (8, 4096, 24), "bf16", True, True, True),
        ("packed", (64, 576, 6), "bf16", True, True, True),
        ("packed", (64, 4096, 24), "fp16", True, False, True),
        ("packed", (256, 577, 33), "bf16", True, True, True),
        ("packed", (3, 7, 1), "fp32", False, False, True),
    ]
    report = compile_for_sm90(cases)
    assert_no_spills(report)
    assert all(has_solve for *_, has_solve in report)


@gpu
def test_cuda_graph_capture_and_replay():
    """A decode step captured once and replayed with new states and weights written into the
    captured tensors (the serving pattern): the launch must neither allocate nor sync."""
    batch, dim, n_vec = 8, 576, 6
    gen = torch.Generator().manual_seed(6)
    vectors = torch.randn(n_vec, dim, generator=gen).cuda()
    hidden = torch.zeros(batch, 1, dim, dtype=torch.bfloat16, device="cuda")
    weights = torch.zeros(batch, n_vec, device="cuda")
    proj = torch.zeros(batch, 1, n_vec, device="cuda")
    run = emokern.RunningProjections(batch, n_vec, device="cuda")
    args = (hidden, vectors, weights, None, True, proj, *run.tensors())
    triton_steer_(*args)  # compile outside the capture
    run.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_steer_(*args)
    ref_run = emokern.RunningProjections(batch, n_vec)
    run.reset()
    for _ in range(3):
        step = (torch.randn(batch, 1, dim, generator=gen) * 3).to(torch.bfloat16)
        mix = torch.randn(batch, n_vec, generator=gen)
        hidden.copy_(step)
        weights.copy_(mix)
        graph.replay()
        expected, expected_proj = step.clone(), torch.empty(batch, 1, n_vec)
        ref_steer_(expected, vectors.cpu(), mix, None, True, expected_proj, *ref_run.tensors())
        expected32 = step.float()
        ref_steer_(expected32, vectors.cpu(), mix, None, True)
        assert_flash_close("hidden", hidden, expected32, expected)
        torch.testing.assert_close(proj.cpu(), expected_proj, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(run.sum.cpu(), ref_run.sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(run.count.cpu(), ref_run.count)


@gpu
def test_packed_and_batched_cuda_graph_replays():
    """Both ops captured over persistent buffers; new states, residuals, slot weights, token
    slots and masks copied in between replays."""
    check_packed_graph_replays(triton_steer_packed_, triton_steer_)


@gpu
def test_bounds_cuda_graph_replays():
    """The packed op with bounds captured once (dot mode, N = 80) and replayed with new states,
    weights, token slots and bounds copied into the captured tensors: the solve allocates
    nothing and never syncs."""
    gen = torch.Generator().manual_seed(12)
    n_tokens, dim, n_vec, n_slots = 80, 576, 6, 4
    vectors_cpu = torch.randn(n_vec, dim, generator=gen)
    gram_cpu = unit_gram(vectors_cpu)
    vectors, gram = vectors_cpu.cuda(), gram_cpu.cuda()
    hidden = torch.zeros(n_tokens, dim, dtype=torch.bfloat16, device="cuda")
    slot_weights = torch.zeros(n_slots, n_vec, device="cuda")
    token_slot = torch.full((n_tokens,), -1, dtype=torch.int32, device="cuda")
    bounds = make_bounds(gen, n_slots, n_vec).cuda()
    args = (hidden, None, vectors, slot_weights, token_slot, True, None, None, None, None,
            bounds, gram)
    triton_steer_packed_(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_steer_packed_(*args)
    for step in range(3):
        h, _, _, w = packed_inputs(n_tokens, dim, n_vec, n_slots, torch.bfloat16, False, gen)
        slots = make_token_slot("runs", n_tokens, n_tokens, n_slots, gen)
        b = make_bounds(gen, n_slots, n_vec)
        for dst, src in ((hidden, h), (slot_weights, w), (token_slot, slots), (bounds, b)):
            dst.copy_(src)
        graph.replay()
        want, want32 = h.clone(), h.float()
        for out in (want, want32):
            ref_steer_packed_(out, None, vectors_cpu, w, slots, True, None, None, None, None, b,
                              gram_cpu)
        assert_flash_close(f"replay {step} hidden", hidden, want32, want)
