r"""Triton backend of ``emokern::steer_`` and ``emokern::steer_packed_``: one fused pass over the
hidden states, one kernel for both layouts.

For every token row with slot :math:`s` and input :math:`x` (``hidden`` plus, in the packed
layout, the optional split ``residual``), in float32 whatever the storage dtype:

.. math::
    p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
    y = x + \textstyle\sum_k W_{s,k}\, v_k, \qquad
    y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\ \text{(norm\_preserving)}

with ``bounds`` the projection levels and bounds then correct ``y`` (below), the row becomes
``y`` (``y - residual`` with a split stream) when it has a slot (``s >= 0``), ``proj_out``
receives ``p`` on every row, and the running statistics of slot ``s`` accumulate ``p``
(docs/design.md §2).

Layouts
-------
The kernel sees rows ``(seq, t)`` of ``B`` sequences of ``T`` rows; a row's slot comes from a
lookup (:func:`_slot_of`), the only place the two layouts differ:

* **batched** (``steer_``, ``hidden [B, T, D]``): the slot of row ``(b, t)`` is ``b``, or -1
  where ``mask[b, t]`` is False — computed in the kernel from the program id (no index tensor);
* **packed** (``steer_packed_``, ``hidden [N, D]``): one "sequence" of ``T = N`` rows whose
  slots are read from ``token_slot`` (a value outside ``[-1, S)``, which validation rejects
  when it can read values, is treated as -1 rather than read out of bounds).

Kernel design
-------------
The grid is flat: program ``i`` handles sequence ``seq = i // n_chunks`` and its ``ROWS``
consecutive rows ``chunk = i % n_chunks`` (no 65,535 limit on ``B``).

* **Row mode** (``ROWS = 1``; decode and short inputs): a program owns one row; the
  projections are a broadcast-multiply of the row tile ``[1, BLOCK_D]`` with the vector tile
  ``[BLOCK_K, BLOCK_D]`` reduced over D, and the steering vector
  :math:`\delta = \sum_k W_{s,k} v_k` is built tile by tile from the same vector tile.
* **Dot mode** (``ROWS = 16``; prefill, large packed batches): a program owns 16 rows, and their
  projections are one ``tl.dot`` per D tile in IEEE float32 (TF32 would lose the projections'
  precision), dividing the L2 traffic of re-reading ``vectors`` by 16. In the batched layout
  the 16 rows share one slot, so :math:`\delta` is one broadcast sum; in the packed layout each
  row may have its own slot and :math:`\delta` is a second ``tl.dot`` of the rows' gathered
  weights ``[16, BLOCK_K]`` with the vector tile.

D is covered by a single tile when ``next_pow2(D)`` fits the tile budget; the row then stays in
registers and is written once. Otherwise the kernel loops over D tiles: without norm
preservation each tile is written as soon as it is computed (still one pass), with it a first
loop accumulates :math:`\lVert x\rVert^2` and :math:`\lVert y\rVert^2` (computed directly, not
through the Gram identity, which cancels catastrophically when :math:`y \approx 0`) and a second
loop re-reads the row tiles (from L1/L2) and writes the rescaled rows.

Running statistics (the same code for both layouts). The rows of a program are grouped by slot:
the first row of each group adds the group's projection sum and row count to ``run_sum`` /
``run_count`` — with atomics, except in the batched layout when a sequence is one program
(decode), where it is a plain read-add-write. A slot's tokens may be spread over many programs
in the packed layout, so float sums there depend on the order the programs' atomics land in
(ulp-level; counts are exact, and a slot whose tokens of a call lie in one program — every
decode step — gets the bit-exact sum). ``run_last`` needs no atomics and no extra buffer: a row
writes it iff it is its slot's newest row of the call, i.e. no later row of the program and no
row after the program's chunk has the same slot. The program finds the latter by scanning the
slots of the rows after its chunk (the mask row in the batched layout, ``token_slot[:N]`` in the
packed one) with an early exit once every candidate has a later twin. Tokens of a request are
contiguous in serving engines, so the scan usually stops at its first block; its worst case,
slots interleaved token by token, reads ``O(N · S)`` int32 in total. Exactly one row writes each
slot's ``run_last``, so the result is deterministic.

Projection levels and bounds (``bounds [S|B, 2, K]`` and ``gram [K, K]`` given; the
``BOUNDS`` constexpr, so without them the kernel compiles to exactly the code it had before,
which tests/ops/test_triton.py checks). After the pushes and the rescale, each row's
projections after the pushes follow from its input projections and the Gram matrix,
:math:`p'_k = c\,(p_k + \sum_j W_{s,j} \lVert v_j\rVert G_{jk})` (no extra reduction over D);
its targets come from its slot's bounds, and :func:`_level_solve` runs the active-set solve of
``csrc/levels.h`` for the rows of the program in registers — the same float32 operations in the
same order, vectorised over rows: the Cholesky factor right-looking in a
``[SOLVE_ROWS, BLOCK_K, BLOCK_K]`` tile (``SOLVE_ROWS`` rows at a time, all 16 for
``BLOCK_K <= 16``), the back substitution as the C++ loop writes it (O(K²) reductions, O(K) for
the factor). A program whose rows are all inside their bounds skips the solve. The correction
:math:`\sum_k (a_k / \lVert v_k\rVert)\, v_k` is added before the store, a broadcast sum in row
mode and a ``tl.dot`` in dot mode. A single-tile row is still read and written once; a row of
several D tiles takes the two-loop path of norm preservation (the first loop only reads: no
tile can be written before the whole row's projections are known; the second writes each row
once). A row with no correction is written through the expression the kernel uses without
bounds, so it gets the same bits; the readings stay the input's projections.

Launch configuration (:func:`launch_config`), a pure function of ``(T, D, K, residual)``: dot
mode when ``T >= 64``; ``BLOCK_K = next_pow2(K)`` (at least 16 in dot mode); ``BLOCK_D`` the
largest power of two with ``(BLOCK_K [+ 16 [+ 16]]) · BLOCK_D <= 2048`` float32 tile elements
(the vector tile, the row tile in dot mode, the residual tile in dot mode with a split stream;
at least 16, at most ``next_pow2(D)``); ``num_warps = min(8, tile elements / 256)``; dot mode
is capped at 128 registers a thread (two 8-warp programs per SM); ``SOLVE_ROWS`` the largest
power of two ``<= ROWS`` with ``SOLVE_ROWS · BLOCK_K² <= 4096`` (at least 1). Compiled for
sm_90 (tests/ops/test_triton.py), row mode takes 21-64 registers without bounds (up to 128 with
them, at K = 64), dot mode up to the cap, and nothing spills.

Decode discipline (docs/design.md §6): the launchers allocate nothing, never sync the host and
never read data; no ``@triton.autotune`` (autotuning launches are illegal during CUDA-graph
capture). Triton specialises integer arguments equal to 1 or divisible by 16, so a model
compiles a handful of variants (decode, prefill lengths); run each once before capturing.
Offsets are int64 (``B·T·D`` can exceed 2**31); scalars are float32 inside the kernel.

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before the first launch, the kernel runs
on CPU tensors under Triton's interpreter; tests/ops/test_triton.py also lowers it to sm_90 cubins
with Triton's bundled ptxas.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from emokern.ops import dispatch
from emokern.ops.reference import LEVEL_PIVOT_EPS, NORM_EPS

#: Upper bound of a D tile. Rows longer than the (budget-limited) tile are covered by a loop.
MAX_BLOCK_D = 1024
#: Register budget (float32 elements) of the tiles loaded per D step: the vector tile
#: ``[BLOCK_K, BLOCK_D]`` plus, in dot mode, the row tile ``[ROWS, BLOCK_D]`` (and the residual
#: tile). Larger budgets compiled for sm_90 need 150-250 registers per thread or spill.
TILE_ELEMENTS = 2048
#: Inputs with at least this many rows per sequence use dot mode (16 rows per program).
DOT_MIN_ROWS = 64
#: Rows per program in dot mode (the minimum M of ``tl.dot``).
DOT_ROWS = 16
#: Registers per thread in dot mode: 2 programs of 8 warps per SM (65,536 registers).
DOT_MAX_REGISTERS = 128
#: Register budget (float32 elements) of the per-row factor ``[SOLVE_ROWS, BLOCK_K, BLOCK_K]``
#: of the projection-bounds solve: a program of ``ROWS`` rows solves them ``SOLVE_ROWS`` at a
#: time (all 16 at once for ``BLOCK_K = 16``, one at a time from ``BLOCK_K = 64``).
SOLVE_ELEMENTS = 4096
#: Slot comparisons per thread and step while a program looks for later rows of its slots
#: (the scan block is ``32 · num_warps · this / ROWS`` slots; more would cost registers).
_SCAN_PER_THREAD = 8


class LaunchConfig(NamedTuple):
    """Fixed launch configuration of the steer kernel, a pure function of its shape class."""

    rows: int  #: rows per program (1 = row mode, DOT_ROWS = dot mode)
    block_k: int  #: K padded to a power of two (>= 16 in dot mode, the minimum N of tl.dot)
    block_d: int  #: D tile
    single_tile: bool  #: the whole row fits one D tile (kept in registers, written once)
    num_warps: int
    #: Register cap per thread (ptx ``.maxnreg``), or None: dot mode is held to 128 so that two
    #: programs of 8 warps share an SM (uncapped, ptxas takes 136-146 with running statistics).
    max_registers: int | None
    #: Rows of a program solved together by the projection-bounds solve: the largest power
    #: of two ``<= rows`` with ``solve_rows · block_k² <= SOLVE_ELEMENTS`` (at least 1).
    solve_rows: int = 1


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def _launch_config(seq_len: int, dim: int, n_vec: int, residual: bool, max_block_d: int,
                   tile_elements: int, dot_min_rows: int, solve_elements: int) -> LaunchConfig:
    use_dot = seq_len >= dot_min_rows
    rows = DOT_ROWS if use_dot else 1
    block_k = max(16 if use_dot else 2, _next_pow2(n_vec))
    # Tile rows held per D column: the vector tile, plus the row (and residual) tiles in dot
    # mode.
    tile_rows = block_k + ((rows * (2 if residual else 1)) if use_dot else 0)
    # The largest power of two within the budget, and at least 16 columns (the minimum K of
    # tl.dot; narrower tiles would also waste most of each vector-row load).
    budget_d = max(16, 1 << (max(1, tile_elements // tile_rows).bit_length() - 1))
    block_d = min(_next_pow2(dim), max_block_d, budget_d)
    if use_dot:
        block_d = max(block_d, 16)
    # 8 tile elements per thread: 48-110 registers on sm_90 (no spills), so that several
    # programs share an SM — this kernel is memory bound and needs the occupancy.
    num_warps = min(8, _next_pow2(tile_rows * block_d // 256))
    # The largest power of two of rows whose factors fit the solve's budget (at least one).
    solve_budget = max(1, solve_elements // (block_k * block_k))
    solve_rows = min(rows, 1 << (solve_budget.bit_length() - 1))
    return LaunchConfig(rows, block_k, block_d, dim <= block_d, num_warps,
                        DOT_MAX_REGISTERS if use_dot else None, solve_rows)


def launch_config(seq_len: int, dim: int, n_vec: int, residual: bool = False) -> LaunchConfig:
    """The launch configuration used for ``seq_len`` rows per sequence (``T`` of ``[B, T, D]``,
    ``N`` of a packed ``[N, D]``) of width ``dim``, ``n_vec`` vectors and, in the packed layout,
    a split ``residual`` or not (reads the module constants, so tests can lower
    ``MAX_BLOCK_D``)."""
    return _launch_config(seq_len, dim, n_vec, bool(residual), MAX_BLOCK_D, TILE_ELEMENTS,
                          DOT_MIN_ROWS, SOLVE_ELEMENTS)


@triton.jit
def _to_storage(y, out_ty: tl.constexpr):
    """Round float32 ``y`` to the storage dtype, to nearest even like ``Tensor.to``.

    bfloat16 is rounded with integer ops: Triton's interpreter truncates a plain float32 ->
    bfloat16 cast (and its "rtne" mode does not carry into the exponent), so the native cast
    would make the tested and the shipped code differ. On a GPU this costs four integer
    instructions per element in a memory-bound kernel.
    """
    if out_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # NaN stays NaN (quieted) instead of carrying into the sign bit.
        rounded = tl.where(y != y, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(out_ty)


@triton.jit
def _slot_of(slot_ptr, seq, pos, pos_ok, seq_len, n_slots, PACKED: tl.constexpr,
             HAS_MASK: tl.constexpr):
    """The slot (int32, -1 = untouched and not counted) of rows ``pos`` of sequence ``seq``:
    ``token_slot[pos]`` in the packed layout (out-of-range values read as -1), else ``seq``
    where the mask (``slot_ptr``, uint8 ``[B, T]``) is set; -1 where not ``pos_ok``."""
    if PACKED:
        slot = tl.load(slot_ptr + pos, mask=pos_ok, other=-1)
        return tl.where((slot >= 0) & (slot < n_slots), slot, -1)
    else:
        if HAS_MASK:
            on = tl.load(slot_ptr + seq * seq_len + pos, mask=pos_ok, other=0) != 0
            return tl.where(on & pos_ok, seq.to(tl.int32), -1)
        else:
            return tl.where(pos_ok, seq.to(tl.int32), -1)


@triton.jit
def _tile_terms(row_ptrs, res_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim,
                USE_DOT: tl.constexpr, ROW_WEIGHTS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Load the D tile at ``offs_d`` of the rows (plus the residual) and of the vectors; return
    ``(x [ROWS, BLOCK_D], y = x + delta, residual tile (or 0.0), dots [ROWS, BLOCK_K],
    ||v||² part [BLOCK_K], d_ok [BLOCK_D], v [BLOCK_K, BLOCK_D])`` in float32. ``w`` is
    ``[ROWS, BLOCK_K]`` (each row's weights) when ``ROW_WEIGHTS``, else ``[BLOCK_K]`` shared by
    the rows."""
    d_ok = offs_d < dim
    tile_ok = rows_ok[:, None] & d_ok[None, :]
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptrs[:, None] + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        x = x + r
    else:
        r = 0.0
    v = tl.load(vectors_ptr + offs_k[:, None].to(tl.int64) * dim + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if USE_DOT:
        dots = tl.dot(x, tl.trans(v), input_precision="ieee")
    else:
        # ROWS == 1: [BLOCK_K, BLOCK_D] * [1, BLOCK_D] reduced over D -> [1, BLOCK_K].
        dots = tl.sum(v * x, axis=1)[None, :]
    if ROW_WEIGHTS:
        y = x + tl.dot(w, v, input_precision="ieee")
    else:
        y = x + tl.sum(w[:, None] * v, axis=0)[None, :]
    return x, y, r, dots, tl.sum(v * v, axis=1), d_ok, v


@triton.jit
def _later_twins(slot_ptr, seq, slot, pending, start, seq_len, n_slots, PACKED: tl.constexpr,
                 HAS_MASK: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """For each row ``r`` with ``pending[r]``: whether a row at ``start`` or later (``< T``) has
    slot ``slot[r]``. Rows not pending report True. Scans ``SCAN_BLOCK`` slots a step and stops
    as soon as every pending row has found one."""
    found = (pending == 0).to(tl.int32)
    while (start < seq_len) & (tl.min(found, axis=0) == 0):
        offs = start + tl.arange(0, SCAN_BLOCK).to(tl.int64)
        later = _slot_of(slot_ptr, seq, offs, offs < seq_len, seq_len, n_slots, PACKED,
                         HAS_MASK)
        found = found | tl.max((later[None, :] == slot[:, None]).to(tl.int32), axis=1)
        start += SCAN_BLOCK
    return found != 0


@triton.jit
def _add(a, b):
    return a + b


#: The combine function of ``tl.sum``: ``tl.reduce(x, axis, _SUM)`` is ``tl.sum(x, axis)`` for
#: float32 and int32 (the same IR), but not a call of a jit function, which the interpreter
#: re-patches ``triton.language`` for at every call (~10 ms, thousands of times in the solve's
#: loops); the interpreter runs this reduction as one ``np.sum``.
_SUM = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _level_solve(gap, gram_ptr, n_vec, offs_k, PIVOT_EPS: tl.constexpr):
    """``level_coefficients`` of csrc/levels.h for the rows of ``gap`` ``[R, BLOCK_K]`` (each
    row's target gaps ``t - p'``, 0 inside the bounds and on padded columns): returns the
    coefficients ``a [R, BLOCK_K]`` of the unit directions and each row's number of active
    directions ``[R]`` (int32).

    The same float32 operations in the same order as the C++ row loop, vectorised over the rows
    and columns: the Cholesky factor of ``G_AA`` is built right-looking — step ``i`` takes the
    pivot and column ``i`` of the trailing matrix, already reduced by the earlier active columns
    in index order, exactly the C++ ``s -= L[i][m] * L[j][m]`` sequence — and the forward
    substitution subtracts in the same order. ``work [R, BLOCK_K, BLOCK_K]`` holds the trailing
    matrix; column ``i`` below the diagonal becomes ``L[:, i]`` once step ``i`` is done (zero
    for an inactive or dropped direction). The back substitution is the C++ loop as it stands
    (``s -= L[m][i] · a[m]`` for ``m = i + 1, …``): a direction with no coefficient
    contributes ``±0``. Divisions and the square root are IEEE-rounded (``div_rn``,
    ``sqrt_rn``)."""
    R: tl.constexpr = gap.shape[0]
    BLOCK_K: tl.constexpr = gap.shape[1]
    k_ok = offs_k < n_vec
    gram = tl.load(gram_ptr + offs_k[:, None] * n_vec + offs_k[None, :],
                   mask=k_ok[:, None] & k_ok[None, :], other=0.0)
    work = tl.zeros((R, BLOCK_K, BLOCK_K), tl.float32) + gram[None, :, :]
    row_of = offs_k[None, :, None]
    col_of = offs_k[None, None, :]
    rhs = gap  # forward substitution: t - p' less the earlier columns' terms
    z = tl.zeros((R, BLOCK_K), tl.float32)
    diag = tl.full((R, BLOCK_K), 1.0, tl.float32)
    active = tl.zeros((R, BLOCK_K), tl.int32)
    pivot_eps = tl.full((), PIVOT_EPS, tl.float32)
    for i in range(0, n_vec):
        at_i = offs_k[None, :] == i
        col = tl.reduce(tl.where(col_of == i, work, 0.0), 2, _SUM)  # work[:, :, i]
        d = tl.reduce(tl.where(at_i, col, 0.0), 1, _SUM)
        r = tl.reduce(tl.where(at_i, gap, 0.0), 1, _SUM)
        s = tl.reduce(tl.where(at_i, rhs, 0.0), 1, _SUM)
        # Inside its bounds (r == 0), dependent on the earlier active directions or NaN: out.
        keep = (r != 0.0) & (d > pivot_eps * tl.load(gram_ptr + i * (n_vec + 1)))
        l_ii = tl.where(keep, tl.sqrt_rn(tl.where(keep, d, 1.0)), 1.0)
        z_i = tl.where(keep, tl.math.div_rn(s, l_ii), 0.0)
        l_col = tl.where(keep[:, None] & (offs_k[None, :] > i),
                         tl.math.div_rn(col, l_ii[:, None]), 0.0)
        rhs = rhs - l_col * z_i[:, None]
        work = tl.where((col_of == i) & (row_of > i), l_col[:, :, None],
                        work - l_col[:, :, None] * l_col[:, None, :])
        z = tl.where(at_i, z_i[:, None], z)
        diag = tl.where(at_i, l_ii[:, None], diag)
        active = tl.where(at_i, keep.to(tl.int32)[:, None], active)
    a = tl.zeros((R, BLOCK_K), tl.float32)
    for t in range(0, n_vec):
        i = n_vec - 1 - t
        at_i = offs_k[None, :] == i
        l_col = tl.reduce(tl.where(col_of == i, work, 0.0), 2, _SUM)  # L[m, i] for m > i
        s = tl.reduce(tl.where(at_i, z, 0.0), 1, _SUM)
        for m in range(i + 1, n_vec):
            at_m = offs_k[None, :] == m
            s = s - tl.reduce(tl.where(at_m, l_col, 0.0), 1, _SUM) \
                * tl.reduce(tl.where(at_m, a, 0.0), 1, _SUM)
        on = tl.reduce(tl.where(at_i, active, 0), 1, _SUM) != 0
        a_i = tl.where(on, tl.math.div_rn(s, tl.reduce(tl.where(at_i, diag, 0.0), 1, _SUM)), 0.0)
        a = tl.where(at_i, a_i[:, None], a)
    return a, tl.reduce(active, 1, _SUM)


@triton.jit
def _level_solve_if_needed(gap, gram_ptr, n_vec, offs_k, PIVOT_EPS: tl.constexpr):
    """:func:`_level_solve`, skipped (zeros) when every row of ``gap`` is inside its bounds."""
    if tl.max(tl.max((gap != 0.0).to(tl.int32), axis=1), axis=0) != 0:  # NaN != 0 too
        a, n_active = _level_solve(gap, gram_ptr, n_vec, offs_k, PIVOT_EPS)
    else:
        a = tl.zeros(gap.shape, tl.float32)
        n_active = tl.zeros((gap.shape[0],), tl.int32)
    return a, n_active


@triton.jit
def _level_terms(dots, vv, w, scale, slot_safe, steered, bounds_ptr, gram_ptr, n_vec, offs_k,
                 k_ok, ROW_WEIGHTS: tl.constexpr, NORM_PRESERVING: tl.constexpr,
                 SOLVE_ROWS: tl.constexpr, PIVOT_EPS: tl.constexpr):
    """The projection levels and bounds of the program's rows (docs/design.md §2): from the
    input's ``dots [ROWS, BLOCK_K]`` and ``||v||² vv``, the weights ``w`` and the norm-preserving
    ``scale [ROWS]``, the projections after the pushes
    ``p' = c (p + Σ_j w_j ||v_j|| G[j, :])``, the targets from the rows' bounds and the solve.
    Returns ``(coef [ROWS, BLOCK_K], fix [ROWS])``: the correction is ``Σ_k coef_k v_k``
    (``coef = a / ||v||``) on the rows with ``fix``; every other row is written as without
    bounds."""
    ROWS: tl.constexpr = dots.shape[0]
    BLOCK_K: tl.constexpr = dots.shape[1]
    norms = tl.sqrt(tl.where(k_ok, vv, 1.0))
    proj = tl.where(k_ok[None, :], dots / norms[None, :], 0.0)  # the readings, p
    gram = tl.load(gram_ptr + offs_k[:, None] * n_vec + offs_k[None, :],
                   mask=k_ok[:, None] & k_ok[None, :], other=0.0)
    if ROW_WEIGHTS:
        push = tl.dot(w * norms[None, :], gram, input_precision="ieee")
    else:
        push = tl.sum((w * norms)[:, None] * gram, axis=0)[None, :]
    p_after = proj + push
    if NORM_PRESERVING:
        p_after = scale[:, None] * p_after
    bound_ptrs = bounds_ptr + slot_safe[:, None] * (2 * n_vec) + offs_k[None, :]
    bound_ok = steered[:, None] & k_ok[None, :]
    lo = tl.load(bound_ptrs, mask=bound_ok, other=float("-inf"))
    hi = tl.load(bound_ptrs + n_vec, mask=bound_ok, other=float("inf"))
    # csrc/levels.h:level_gap, clip(p', lo, hi) - p'.
    gap = tl.where(p_after < lo, lo, tl.where(p_after > hi, hi, p_after)) - p_after
    if SOLVE_ROWS == ROWS:
        a, n_active = _level_solve_if_needed(gap, gram_ptr, n_vec, offs_k, PIVOT_EPS)
    else:
        # SOLVE_ROWS rows at a time (the factors of all ROWS would not fit in registers).
        GROUPS: tl.constexpr = ROWS // SOLVE_ROWS
        gap3 = tl.reshape(gap, (GROUPS, SOLVE_ROWS, BLOCK_K))
        group_of = tl.arange(0, GROUPS)
        a3 = tl.zeros((GROUPS, SOLVE_ROWS, BLOCK_K), tl.float32)
        n3 = tl.zeros((GROUPS, SOLVE_ROWS), tl.int32)
        for g in range(0, GROUPS):
            a_g, n_g = _level_solve_if_needed(
                tl.sum(tl.where(group_of[:, None, None] == g, gap3, 0.0), axis=0), gram_ptr,
                n_vec, offs_k, PIVOT_EPS)
            a3 = tl.where(group_of[:, None, None] == g, a_g[None, :, :], a3)
            n3 = tl.where(group_of[:, None] == g, n_g[None, :], n3)
        a = tl.reshape(a3, (ROWS, BLOCK_K))
        n_active = tl.reshape(n3, (ROWS,))
    coef = tl.where(k_ok[None, :], a / norms[None, :], 0.0)
    return coef, steered & (n_active > 0)


@triton.jit
def _corrected(y, coef, v, USE_DOT: tl.constexpr):
    """``y + coef @ v`` for a D tile: ``coef [ROWS, BLOCK_K]``, ``v [BLOCK_K, BLOCK_D]``."""
    if USE_DOT:
        return y + tl.dot(coef, v, input_precision="ieee")
    else:
        return y + tl.sum(tl.sum(coef, axis=0)[:, None] * v, axis=0)[None, :]  # ROWS == 1


@triton.jit
def _steer_kernel(
    hidden_ptr, residual_ptr, vectors_ptr, weights_ptr, slot_ptr, proj_ptr, sum_ptr, count_ptr,
    last_ptr, bounds_ptr, gram_ptr, seq_len, dim, n_vec, n_slots, stride_b, stride_t,
    res_stride_t, n_chunks, PACKED: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, NORM_PRESERVING: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_RUN: tl.constexpr, ATOMIC_RUN: tl.constexpr, ROWS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_TILE: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, EPS: tl.constexpr, BOUNDS: tl.constexpr, SOLVE_ROWS: tl.constexpr,
    PIVOT_EPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seq = pid // n_chunks
    chunk = pid % n_chunks
    rows = chunk * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rows_ok = rows < seq_len
    slot = _slot_of(slot_ptr, seq, rows, rows_ok, seq_len, n_slots, PACKED, HAS_MASK)
    steered = slot >= 0
    slot_safe = tl.maximum(slot, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_vec
    # Each row's weights (packed dot mode: rows of one program may belong to different slots)
    # or the one weight row every row of the program uses.
    ROW_WEIGHTS: tl.constexpr = PACKED and USE_DOT
    if PACKED:
        w = tl.load(weights_ptr + slot_safe[:, None] * n_vec + offs_k[None, :],
                    mask=steered[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if not ROW_WEIGHTS:
            w = tl.sum(w, axis=0)  # ROWS == 1
    else:
        w = tl.load(weights_ptr + seq * n_vec + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    row_ptrs = hidden_ptr + seq * stride_b + rows * stride_t
    res_ptrs = residual_ptr + rows * res_stride_t if HAS_RESIDUAL else row_ptrs
    offs_tile = tl.arange(0, BLOCK_D)
    out_ty = hidden_ptr.dtype.element_ty
    eps = tl.full((), EPS, tl.float32)

    if SINGLE_TILE:
        # The whole row is in registers: compute, rescale and write it once.
        x, y, r, dots, vv, d_ok, v = _tile_terms(row_ptrs, res_ptrs, vectors_ptr, w, offs_tile,
                                                 rows_ok, offs_k, k_ok, dim, USE_DOT,
                                                 ROW_WEIGHTS, HAS_RESIDUAL)
        scale = eps  # no rescale (a placeholder the bounds read only with NORM_PRESERVING)
        if NORM_PRESERVING:
            x_norm = tl.sqrt(tl.sum(x * x, axis=1))
            y_norm = tl.sqrt(tl.sum(y * y, axis=1))
            scale = x_norm / tl.maximum(y_norm, eps)
            y = y * scale[:, None]
        if BOUNDS:
            coef, fix = _level_terms(dots, vv, w, scale, slot_safe, steered, bounds_ptr,
                                     gram_ptr, n_vec, offs_k, k_ok, ROW_WEIGHTS,
                                     NORM_PRESERVING, SOLVE_ROWS, PIVOT_EPS)
            # Rows without a correction keep the no-bounds expression (the same bits).
            out = tl.where(fix[:, None], _corrected(y, coef, v, USE_DOT) - r, y - r)
            tl.store(row_ptrs[:, None] + offs_tile[None, :], _to_storage(out, out_ty),
                     mask=steered[:, None] & d_ok[None, :])
        else:
            tl.store(row_ptrs[:, None] + offs_tile[None, :], _to_storage(y - r, out_ty),
                     mask=steered[:, None] & d_ok[None, :])
    else:
        dots = tl.zeros((ROWS, BLOCK_K), tl.float32)
        vv = tl.zeros((BLOCK_K,), tl.float32)
        xx = tl.zeros((ROWS,), tl.float32)
        yy = tl.zeros((ROWS,), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + offs_tile
            x, y, r, dots_part, vv_part, d_ok, v = _tile_terms(
                row_ptrs, res_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim, USE_DOT,
                ROW_WEIGHTS, HAS_RESIDUAL)
            dots += dots_part
            vv += vv_part
            if NORM_PRESERVING:
                xx += tl.sum(x * x, axis=1)
                yy += tl.sum(y * y, axis=1)
            elif not BOUNDS:
                # Nothing later in the row changes this tile: write it now (one pass).
                tl.store(row_ptrs[:, None] + offs_d[None, :], _to_storage(y - r, out_ty),
                         mask=steered[:, None] & d_ok[None, :])
        scale = eps  # no rescale (a placeholder the bounds read only with NORM_PRESERVING)
        if NORM_PRESERVING:
            scale = tl.sqrt(xx) / tl.maximum(tl.sqrt(yy), eps)
        if BOUNDS:
            # The correction needs the whole row's projections: a second loop writes the rows
            # (re-read from L1/L2), as with norm preservation.
            coef, fix = _level_terms(dots, vv, w, scale, slot_safe, steered, bounds_ptr,
                                     gram_ptr, n_vec, offs_k, k_ok, ROW_WEIGHTS,
                                     NORM_PRESERVING, SOLVE_ROWS, PIVOT_EPS)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + offs_tile
                x, y, r, dots_part, vv_part, d_ok, v = _tile_terms(
                    row_ptrs, res_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim,
                    USE_DOT, ROW_WEIGHTS, HAS_RESIDUAL)
                # Rows without a correction keep the no-bounds expression (the same bits).
                if NORM_PRESERVING:
                    out = tl.where(fix[:, None],
                                   _corrected(y * scale[:, None], coef, v, USE_DOT) - r,
                                   y * scale[:, None] - r)
                else:
                    out = tl.where(fix[:, None], _corrected(y, coef, v, USE_DOT) - r, y - r)
                tl.store(row_ptrs[:, None] + offs_d[None, :], _to_storage(out, out_ty),
                         mask=steered[:, None] & d_ok[None, :])
        elif NORM_PRESERVING:
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + offs_tile
                x, y, r, dots_part, vv_part, d_ok, v = _tile_terms(
                    row_ptrs, res_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim,
                    USE_DOT, ROW_WEIGHTS, HAS_RESIDUAL)
                tl.store(row_ptrs[:, None] + offs_d[None, :],
                         _to_storage(y * scale[:, None] - r, out_ty),
                         mask=steered[:, None] & d_ok[None, :])

    # Padded columns have ||v|| = 0: keep them at 0 rather than 0/0.
    proj = tl.where(k_ok[None, :], dots / tl.sqrt(tl.where(k_ok, vv, 1.0))[None, :], 0.0)
    if HAS_PROJ:
        tl.store(proj_ptr + (seq * seq_len + rows)[:, None] * n_vec + offs_k[None, :], proj,
                 mask=rows_ok[:, None] & k_ok[None, :])
    if HAS_RUN:
        counted = tl.where(steered[:, None], proj, 0.0)  # no NaN of an uncounted row leaks
        if ROWS == 1:
            first = steered
            last_here = steered
            group_sum = counted
            group_count = steered.to(tl.int64)
        else:
            # twin[r, q]: rows r and q of this program count towards the same slot.
            twin = (slot[:, None] == slot[None, :]) & steered[:, None]
            order = tl.arange(0, ROWS)
            first = steered & (tl.sum((twin & (order[None, :] < order[:, None])).to(tl.int32),
                                      axis=1) == 0)
            last_here = steered & (tl.sum((twin & (order[None, :] > order[:, None]))
                                          .to(tl.int32), axis=1) == 0)
            group_sum = tl.dot(twin.to(tl.float32), counted, input_precision="ieee")
            group_count = tl.sum(twin.to(tl.int64), axis=1)
        stat_ptrs = slot_safe[:, None] * n_vec + offs_k[None, :]
        add_ok = first[:, None] & k_ok[None, :]
        if ATOMIC_RUN:
            # Relaxed: nothing is ordered against these additions within the launch.
            tl.atomic_add(sum_ptr + stat_ptrs, group_sum, mask=add_ok, sem="relaxed")
            tl.atomic_add(count_ptr + slot_safe, group_count, mask=first, sem="relaxed")
        else:
            old_sum = tl.load(sum_ptr + stat_ptrs, mask=add_ok, other=0.0)
            tl.store(sum_ptr + stat_ptrs, old_sum + group_sum, mask=add_ok)
            old_count = tl.load(count_ptr + slot_safe, mask=first, other=0)
            tl.store(count_ptr + slot_safe, old_count + group_count, mask=first)
        # The slot's newest row of the call: no later row here, none after this chunk.
        later = _later_twins(slot_ptr, seq, slot, last_here.to(tl.int32), (chunk + 1) * ROWS,
                             seq_len, n_slots, PACKED, HAS_MASK, SCAN_BLOCK)
        newest = last_here & (later == 0)
        tl.store(last_ptr + stat_ptrs, proj, mask=newest[:, None] & k_ok[None, :])


def compile_options(cfg: LaunchConfig) -> dict:
    """The launch options of a configuration (also what the sm_90 lowering test compiles)."""
    # Fused multiply-adds in the dot products, explicitly: Triton 3.9 warns that its default
    # (fusion on) changes to off in 3.10.
    options = {"num_warps": cfg.num_warps, "enable_fp_fusion": True}
    if cfg.max_registers is not None:
        options["maxnreg"] = cfg.max_registers
    return options


def scan_block(cfg: LaunchConfig) -> int:
    """Slots a program compares per step when it looks for later rows of its slots."""
    return max(16, 32 * cfg.num_warps * _SCAN_PER_THREAD // cfg.rows)


def _device_of(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor, a no-op context otherwise (CPU
    tensors under the Triton interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def triton_steer_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    norm_preserving: bool,
    proj_out: torch.Tensor | None = None,
    run_sum: torch.Tensor | None = None,
    run_count: torch.Tensor | None = None,
    run_last: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> None:
    r"""``emokern::steer_`` (batched layout) in one Triton launch.

    Same semantics as :func:`emokern.ops.reference.ref_steer_` (see the module docstring for
    the math). Arguments are assumed valid — :func:`emokern.steer_` validates them.

    Parameters
    ----------
    hidden : Tensor [B, T, D], float32/bfloat16/float16, CUDA (or CPU under TRITON_INTERPRET=1)
        Modified in place on masked rows. ``stride(2) == 1``; any non-overlapping strides on
        dims 0 and 1 (views are used as they are, never copied).
    vectors : Tensor [K, D], float32, contiguous
    weights : Tensor [B, K], float32, contiguous
    mask : Tensor [B, T], bool, contiguous, or None (every row steered and counted)
    norm_preserving : bool
    proj_out : Tensor [B, T, K], float32, contiguous, or None
    run_sum, run_count, run_last : Tensor [B, K] float32, [B] int64, [B, K] float32, or None
        All three or none; updated over masked rows.
    bounds : Tensor [B, 2, K], float32, contiguous, or None
        Each sequence's lower and upper bound of every projection after the edit.
    gram : Tensor [K, K], float32, contiguous, or None
        :func:`~emokern.ops.reference.unit_gram` of ``vectors``; given with ``bounds``.

    Notes
    -----
    Allocates nothing, never syncs the host: safe inside CUDA-graph capture once the kernel
    has been compiled for the shape class (run it once before capturing).
    """
    batch, seq_len, dim = hidden.shape
    if batch == 0 or seq_len == 0 or dim == 0:
        return
    n_vec = vectors.shape[0]
    cfg = launch_config(seq_len, dim, n_vec)
    n_chunks = triton.cdiv(seq_len, cfg.rows)
    # Launch on hidden's own GPU, not the current one (a model split over GPUs steers each
    # layer on its device): the guard flash-attention uses around its launches.
    with _device_of(hidden):
        _launch(cfg, batch, n_chunks, hidden, None, vectors, weights,
                None if mask is None else mask.view(torch.uint8), norm_preserving, proj_out,
                run_sum, run_count, run_last, bounds, gram, hidden.stride(0), hidden.stride(1),
                0, batch, False, mask is not None)


def triton_steer_packed_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    vectors: torch.Tensor,
    slot_weights: torch.Tensor,
    token_slot: torch.Tensor,
    norm_preserving: bool,
    proj_out: torch.Tensor | None = None,
    run_sum: torch.Tensor | None = None,
    run_count: torch.Tensor | None = None,
    run_last: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> None:
    r"""``emokern::steer_packed_`` (packed tokens) in one Triton launch of the same kernel.

    Same semantics as :func:`emokern.ops.reference.ref_steer_packed_`. Arguments are assumed
    valid — :func:`emokern.ops.steer_packed_` validates them; a ``token_slot`` value outside
    ``[-1, S)`` leaves its token untouched instead of reading out of bounds.

    Parameters
    ----------
    hidden : Tensor [N, D], float32/bfloat16/float16, CUDA (or CPU under TRITON_INTERPRET=1)
        Modified in place on tokens with a slot; ``stride(1) == 1``, distinct rows.
    residual : Tensor [N, D] or None
        Same dtype, ``stride(1) == 1``; read only (the stream is ``hidden + residual``).
    vectors : Tensor [K, D], float32, contiguous
    slot_weights : Tensor [S, K], float32, contiguous
    token_slot : Tensor [N_max >= N], int32, contiguous; only the first N entries are read
    norm_preserving : bool
    proj_out : Tensor [N_max, K], float32, contiguous, or None; rows ``>= N`` are not written
    run_sum, run_count, run_last : Tensor [S, K] float32, [S] int64, [S, K] float32, or None
    bounds : Tensor [S, 2, K], float32, contiguous, or None
        Each slot's lower and upper bound of every projection after the edit.
    gram : Tensor [K, K], float32, contiguous, or None
        :func:`~emokern.ops.reference.unit_gram` of ``vectors``; given with ``bounds``.

    Notes
    -----
    Allocates nothing, never syncs the host, the grid depends only on ``N``: capturable in a
    CUDA graph per token count once compiled (the serving pattern: persistent buffers whose
    contents change by ``copy_`` between replays).
    """
    n_tokens, dim = hidden.shape
    if n_tokens == 0 or dim == 0:
        return
    # The kernel reads rows with stride 1: refuse any other layout here too, for callers that
    # skip the wrapper's checks (emokern.ops.runner_for).
    for name, t in (("hidden", hidden), ("residual", residual)):
        if t is not None and dim > 1 and t.stride(1) != 1:
            raise ValueError(f"emokern.steer_packed_: {name} must have a contiguous last "
                             f"dimension, got strides {list(t.stride())}")
    n_vec = vectors.shape[0]
    cfg = launch_config(n_tokens, dim, n_vec, residual is not None)
    n_chunks = triton.cdiv(n_tokens, cfg.rows)
    with _device_of(hidden):
        _launch(cfg, 1, n_chunks, hidden, residual, vectors, slot_weights, token_slot,
                norm_preserving, proj_out, run_sum, run_count, run_last, bounds, gram, 0,
                hidden.stride(0), 0 if residual is None else residual.stride(0),
                slot_weights.shape[0], True, False)


def _launch(cfg, batch, n_chunks, hidden, residual, vectors, weights, slots, norm_preserving,
            proj_out, run_sum, run_count, run_last, bounds, gram, stride_b, stride_t,
            res_stride_t, n_slots, packed, has_mask) -> None:
    """The one launch of :func:`_steer_kernel` behind both ops (positional arguments only)."""
    seq_len = hidden.shape[-2]
    has_run = run_sum is not None
    _steer_kernel[(batch * n_chunks,)](
        hidden, residual, vectors, weights, slots, proj_out, run_sum, run_count, run_last,
        bounds, gram, seq_len, hidden.shape[-1], vectors.shape[0], n_slots, stride_b, stride_t,
        res_stride_t, n_chunks,
        PACKED=packed, HAS_MASK=has_mask, HAS_RESIDUAL=residual is not None,
        NORM_PRESERVING=bool(norm_preserving), HAS_PROJ=proj_out is not None, HAS_RUN=has_run,
        # A slot's rows may span programs: always in the packed layout, in the batched one when
        # a sequence has several chunks.
        ATOMIC_RUN=has_run and (packed or n_chunks > 1),
        ROWS=cfg.rows, USE_DOT=cfg.rows > 1, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        SINGLE_TILE=cfg.single_tile, SCAN_BLOCK=scan_block(cfg), EPS=NORM_EPS,
        BOUNDS=bounds is not None, SOLVE_ROWS=cfg.solve_rows, PIVOT_EPS=LEVEL_PIVOT_EPS,
        **compile_options(cfg),
    )


#: The op each Triton launcher implements.
_KERNELS = {"steer_": triton_steer_, "steer_packed_": triton_steer_packed_}
_cuda_registration: dict[str, torch.library.Library] = {}


def register_cuda_kernel(*, override: bool = False) -> bool:
    """Register :func:`triton_steer_` and :func:`triton_steer_packed_` as the CUDA kernels of
    ``emokern::steer_`` and ``emokern::steer_packed_``.

    Call it when no compiled CUDA kernel exists (a CPU-built extension, no nvcc): afterwards
    ``torch.ops.emokern.steer_`` / ``steer_packed_`` on CUDA tensors — including inside
    ``torch.compile`` graphs — run the Triton kernel instead of the plain-PyTorch composite
    reference. Each op is decided on its own: an op that already has a CUDA kernel (the compiled
    one from ``csrc/cuda``; an older build may lack the packed op) keeps it unless
    ``override``.

    Parameters
    ----------
    override : bool
        Register even where a CUDA kernel is already registered; the dispatcher then runs the
        Triton kernel.

    Returns
    -------
    bool
        True if the Triton kernels are (now, or already were) the CUDA kernels of both ops;
        False if another CUDA kernel was kept for at least one of them.
    """
    # The schemas exist: importing emokern.ops (this module's package) defined them.
    for op, kernel in _KERNELS.items():
        if op in _cuda_registration:
            continue
        if not override and torch._C._dispatch_has_kernel_for_dispatch_key(f"emokern::{op}",
                                                                            "CUDA"):
            continue
        registration = torch.library.Library("emokern", "IMPL")
        registration.impl(op, kernel, "CUDA")
        _cuda_registration[op] = registration  # the registration lives as long as this object
    return all(op in _cuda_registration for op in _KERNELS)


for _op, _kernel in _KERNELS.items():
    dispatch.register_runner(_op, "triton", _kernel, on_cuda=register_cuda_kernel)
