r"""Triton backend of ``emokern::steer_``: one fused pass over the hidden states.

For every token row :math:`x = h_{b,t}` (input, float32 compute whatever the storage dtype)

.. math::
    p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
    y = x + \textstyle\sum_k w_{b,k}\, v_k, \qquad
    y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\ \text{(norm\_preserving)}

``hidden[b, t] = y`` on masked rows, ``proj_out[b, t] = p`` on every row, and the running
statistics accumulate ``p`` over masked rows (docs/design.md §2).

Kernel design
-------------
The grid is flat: program ``i`` handles sequence ``b = i // n_chunks`` and its ``ROWS``
consecutive rows ``chunk = i % n_chunks`` (a flat grid has no 65,535 limit on ``B``). All rows
of a program belong to one sequence, so they share one steering vector
:math:`\delta_b = \sum_k w_{b,k} v_k`, which each program builds tile by tile from the vector
tiles it loads for the projections anyway — ``vectors`` is read once per program (twice when
norm preservation needs a second pass over D) and stays in L2 across programs.

* **Row mode** (``ROWS = 1``; decode and short sequences): a program owns one row; the
  projections are a broadcast-multiply of the row tile ``[1, BLOCK_D]`` with the vector tile
  ``[BLOCK_K, BLOCK_D]`` reduced over D. A decode step (``T = 1``) is one program per sequence.
* **Dot mode** (``ROWS = 16``; prefill): a program owns 16 rows, and the projections of the
  16 rows are one ``tl.dot`` per D tile in IEEE float32 (TF32 would lose the projections'
  precision). This divides the L2 traffic of re-reading ``vectors`` by 16, which matters
  when ``K·D`` is large (64 × 8192 float32 = 2 MiB per read).

D is covered by a single tile when ``next_pow2(D)`` fits the tile budget; the row then stays in
registers and is written once. Otherwise the kernel loops over D tiles: without norm
preservation each tile is written as soon as it is computed (still one pass), with it a first
loop accumulates :math:`\lVert x\rVert^2` and :math:`\lVert y\rVert^2` (computed directly, not
through the Gram identity, which cancels catastrophically when :math:`y \approx 0`) and a second
loop re-reads the row tiles (from L1/L2) and writes the rescaled rows.

Running statistics: a program sums its masked rows' projections and count and adds them to
``run_sum`` / ``run_count``, with atomics only when a sequence spans several programs (with
one program per sequence — decode — it is a plain read-add-write, deterministic).
``run_last`` is written by the one program whose chunk holds the sequence's newest masked row:
it knows it does when no later row of the sequence is masked (it scans the rest of the mask row
with an early exit; without a mask it is the last chunk).

Launch configuration (:func:`launch_config`), a pure function of ``(T, D, K)``: dot mode
when ``T >= 64``; ``BLOCK_K = next_pow2(K)`` (at least 16 in dot mode); ``BLOCK_D`` the largest
power of two with ``(BLOCK_K [+ 16]) · BLOCK_D <= 2048`` float32 tile elements (at least 16, at
most ``next_pow2(D)``); ``num_warps = min(8, tile elements / 256)``. Compiled for sm_90 this
takes 48-80 registers per thread in row mode and 94-128 in dot mode, with no spills.

Decode discipline (docs/design.md §6): the launcher allocates nothing, never syncs the host and
never reads data; no ``@triton.autotune`` (autotuning launches are illegal during CUDA-graph
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

from emokern.ops.reference import NORM_EPS

#: Upper bound of a D tile. Rows longer than the (budget-limited) tile are covered by a loop.
MAX_BLOCK_D = 1024
#: Register budget (float32 elements) of the tiles loaded per D step: the vector tile
#: ``[BLOCK_K, BLOCK_D]`` plus, in dot mode, the row tile ``[ROWS, BLOCK_D]``. Larger budgets
#: compiled for sm_90 need 150-250 registers per thread (one program per SM) or spill.
TILE_ELEMENTS = 2048
#: Sequences at least this long use dot mode (16 rows per program); shorter ones row mode.
DOT_MIN_ROWS = 64
#: Rows per program in dot mode (the minimum M of ``tl.dot``).
DOT_ROWS = 16
#: Mask entries read per step while a program looks for later masked rows.
_SCAN_BLOCK = 1024


class LaunchConfig(NamedTuple):
    """Fixed launch configuration of the steer kernel, a pure function of ``(T, D, K)``."""

    rows: int  #: rows per program (1 = row mode, DOT_ROWS = dot mode)
    block_k: int  #: K padded to a power of two (>= 16 in dot mode, the minimum N of tl.dot)
    block_d: int  #: D tile
    single_tile: bool  #: the whole row fits one D tile (kept in registers, written once)
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def _launch_config(seq_len: int, dim: int, n_vec: int, max_block_d: int, tile_elements: int,
                   dot_min_rows: int) -> LaunchConfig:
    use_dot = seq_len >= dot_min_rows
    rows = DOT_ROWS if use_dot else 1
    block_k = max(16 if use_dot else 2, _next_pow2(n_vec))
    # Tile rows held per D column: the vector tile, plus the row tile in dot mode.
    tile_rows = block_k + (rows if use_dot else 0)
    # The largest power of two within the budget, and at least 16 columns (the minimum K of
    # tl.dot; narrower tiles would also waste most of each vector-row load).
    budget_d = max(16, 1 << (max(1, tile_elements // tile_rows).bit_length() - 1))
    block_d = min(_next_pow2(dim), max_block_d, budget_d)
    if use_dot:
        block_d = max(block_d, 16)
    # 8 tile elements per thread: 48-110 registers on sm_90 (no spills), so that several
    # programs share an SM — this kernel is memory bound and needs the occupancy.
    num_warps = min(8, _next_pow2(tile_rows * block_d // 256))
    return LaunchConfig(rows, block_k, block_d, dim <= block_d, num_warps)


def launch_config(seq_len: int, dim: int, n_vec: int) -> LaunchConfig:
    """The launch configuration used for hidden states ``[*, seq_len, dim]`` and ``n_vec``
    vectors (reads the module constants, so tests can lower ``MAX_BLOCK_D``)."""
    return _launch_config(seq_len, dim, n_vec, MAX_BLOCK_D, TILE_ELEMENTS, DOT_MIN_ROWS)


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
def _tile_terms(row_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim,
                USE_DOT: tl.constexpr):
    """Load the D tile at ``offs_d`` of the rows and of the vectors; return
    ``(x [ROWS, BLOCK_D], y = x + delta [ROWS, BLOCK_D], dots [ROWS, BLOCK_K], ||v||² part
    [BLOCK_K], d_ok [BLOCK_D])`` in float32."""
    d_ok = offs_d < dim
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    v = tl.load(vectors_ptr + offs_k[:, None].to(tl.int64) * dim + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if USE_DOT:
        dots = tl.dot(x, tl.trans(v), input_precision="ieee")
    else:
        # ROWS == 1: [BLOCK_K, BLOCK_D] * [1, BLOCK_D] reduced over D -> [1, BLOCK_K].
        dots = tl.sum(v * x, axis=1)[None, :]
    delta = tl.sum(w[:, None] * v, axis=0)
    y = x + delta[None, :]
    return x, y, dots, tl.sum(v * v, axis=1), d_ok


@triton.jit
def _steer_kernel(
    hidden_ptr, vectors_ptr, weights_ptr, mask_ptr, proj_ptr, sum_ptr, count_ptr, last_ptr,
    seq_len, dim, n_vec, stride_b, stride_t, n_chunks,
    HAS_MASK: tl.constexpr, NORM_PRESERVING: tl.constexpr, HAS_PROJ: tl.constexpr,
    HAS_RUN: tl.constexpr, ATOMIC_RUN: tl.constexpr, ROWS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_TILE: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seq = pid // n_chunks
    chunk = pid % n_chunks
    rows = chunk * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rows_ok = rows < seq_len
    if HAS_MASK:
        steered = (tl.load(mask_ptr + seq * seq_len + rows, mask=rows_ok, other=0) != 0) & rows_ok
    else:
        steered = rows_ok
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_vec
    w = tl.load(weights_ptr + seq * n_vec + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    row_ptrs = hidden_ptr + seq * stride_b + rows * stride_t
    offs_tile = tl.arange(0, BLOCK_D)
    out_ty = hidden_ptr.dtype.element_ty
    eps = tl.full((), EPS, tl.float32)

    if SINGLE_TILE:
        # The whole row is in registers: compute, rescale and write it once.
        x, y, dots, vv, d_ok = _tile_terms(row_ptrs, vectors_ptr, w, offs_tile, rows_ok, offs_k,
                                           k_ok, dim, USE_DOT)
        if NORM_PRESERVING:
            x_norm = tl.sqrt(tl.sum(x * x, axis=1))
            y_norm = tl.sqrt(tl.sum(y * y, axis=1))
            y = y * (x_norm / tl.maximum(y_norm, eps))[:, None]
        tl.store(row_ptrs[:, None] + offs_tile[None, :], _to_storage(y, out_ty),
                 mask=steered[:, None] & d_ok[None, :])
    else:
        dots = tl.zeros((ROWS, BLOCK_K), tl.float32)
        vv = tl.zeros((BLOCK_K,), tl.float32)
        xx = tl.zeros((ROWS,), tl.float32)
        yy = tl.zeros((ROWS,), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + offs_tile
            x, y, dots_part, vv_part, d_ok = _tile_terms(row_ptrs, vectors_ptr, w, offs_d,
                                                         rows_ok, offs_k, k_ok, dim, USE_DOT)
            dots += dots_part
            vv += vv_part
            if NORM_PRESERVING:
                xx += tl.sum(x * x, axis=1)
                yy += tl.sum(y * y, axis=1)
            else:
                # Nothing later in the row changes this tile: write it now (one pass).
                tl.store(row_ptrs[:, None] + offs_d[None, :], _to_storage(y, out_ty),
                         mask=steered[:, None] & d_ok[None, :])
        if NORM_PRESERVING:
            scale = tl.sqrt(xx) / tl.maximum(tl.sqrt(yy), eps)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + offs_tile
                x, y, dots_part, vv_part, d_ok = _tile_terms(
                    row_ptrs, vectors_ptr, w, offs_d, rows_ok, offs_k, k_ok, dim, USE_DOT)
                tl.store(row_ptrs[:, None] + offs_d[None, :],
                         _to_storage(y * scale[:, None], out_ty),
                         mask=steered[:, None] & d_ok[None, :])

    # Padded columns have ||v|| = 0: keep them at 0 rather than 0/0.
    proj = tl.where(k_ok[None, :], dots / tl.sqrt(tl.where(k_ok, vv, 1.0))[None, :], 0.0)
    if HAS_PROJ:
        tl.store(proj_ptr + (seq * seq_len + rows)[:, None] * n_vec + offs_k[None, :], proj,
                 mask=rows_ok[:, None] & k_ok[None, :])
    if HAS_RUN:
        proj_sum = tl.sum(tl.where(steered[:, None], proj, 0.0), axis=0)
        n_steered = tl.sum(steered.to(tl.int64), axis=0)
        newest = tl.max(tl.where(steered, rows, -1), axis=0)
        newest_proj = tl.sum(tl.where((rows == newest)[:, None], proj, 0.0), axis=0)
        if HAS_MASK:
            # This chunk holds the sequence's newest masked row iff no later row is masked.
            later = tl.zeros((), tl.int32)
            start = (chunk + 1) * ROWS
            while (start < seq_len) & (later == 0):
                offs_t = start + tl.arange(0, SCAN_BLOCK)
                later_mask = tl.load(mask_ptr + seq * seq_len + offs_t, mask=offs_t < seq_len,
                                     other=0)
                later += tl.sum((later_mask != 0).to(tl.int32), axis=0)
                start += SCAN_BLOCK
            holds_newest = (newest >= 0) & (later == 0)
        else:
            holds_newest = chunk == n_chunks - 1
        if ATOMIC_RUN:
            tl.atomic_add(sum_ptr + seq * n_vec + offs_k, proj_sum, mask=k_ok)
            tl.atomic_add(count_ptr + seq, n_steered)
        else:
            old_sum = tl.load(sum_ptr + seq * n_vec + offs_k, mask=k_ok, other=0.0)
            tl.store(sum_ptr + seq * n_vec + offs_k, old_sum + proj_sum, mask=k_ok)
            tl.store(count_ptr + seq, tl.load(count_ptr + seq) + n_steered)
        # (A scalar condition as a bound rather than `k_ok & holds_newest`: the interpreter
        # mis-types `&` between a vector and a 0-d boolean.)
        tl.store(last_ptr + seq * n_vec + offs_k, newest_proj,
                 mask=offs_k < tl.where(holds_newest, n_vec, 0))


def triton_steer_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    norm_preserving: bool,
    proj_out: torch.Tensor | None,
    run_sum: torch.Tensor | None,
    run_count: torch.Tensor | None,
    run_last: torch.Tensor | None,
) -> None:
    r"""Steer ``hidden`` in place and read its projections, in one Triton launch.

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

    Notes
    -----
    Allocates nothing, never syncs the host: safe inside CUDA-graph capture once the kernel
    has been compiled for the shape class (run it once before capturing).
    """
    batch, seq_len, dim = hidden.shape
    n_vec = vectors.shape[0]
    if batch == 0 or seq_len == 0 or dim == 0:
        return
    cfg = launch_config(seq_len, dim, n_vec)
    n_chunks = triton.cdiv(seq_len, cfg.rows)
    has_run = run_sum is not None
    # Launch on hidden's own GPU, not the current one (a model split over GPUs steers each
    # layer on its device): the guard flash-attention uses around its launches.
    with _device_of(hidden):
        _launch(cfg, n_chunks, has_run, batch, seq_len, dim, n_vec, hidden, vectors, weights,
                mask, norm_preserving, proj_out, run_sum, run_count, run_last)


def _device_of(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor, a no-op context otherwise (CPU
    tensors under the Triton interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch(cfg, n_chunks, has_run, batch, seq_len, dim, n_vec, hidden, vectors, weights, mask,
            norm_preserving, proj_out, run_sum, run_count, run_last) -> None:
    _steer_kernel[(batch * n_chunks,)](
        hidden, vectors, weights,
        None if mask is None else mask.view(torch.uint8),
        proj_out, run_sum, run_count, run_last,
        seq_len, dim, n_vec, hidden.stride(0), hidden.stride(1), n_chunks,
        HAS_MASK=mask is not None, NORM_PRESERVING=bool(norm_preserving),
        HAS_PROJ=proj_out is not None, HAS_RUN=has_run, ATOMIC_RUN=has_run and n_chunks > 1,
        ROWS=cfg.rows, USE_DOT=cfg.rows > 1, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        SINGLE_TILE=cfg.single_tile, SCAN_BLOCK=_SCAN_BLOCK, EPS=NORM_EPS,
        num_warps=cfg.num_warps,
        # Fused multiply-adds in the dot products, explicitly: Triton 3.9 warns that its
        # default (fusion on) changes to off in 3.10.
        enable_fp_fusion=True,
    )


_cuda_registration: torch.library.Library | None = None


def register_cuda_kernel(*, override: bool = False) -> bool:
    """Register :func:`triton_steer_` as the CUDA kernel of ``emokern::steer_``.

    Call it when no compiled CUDA kernel exists (a CPU-built extension, no nvcc): afterwards
    ``torch.ops.emokern.steer_`` on CUDA tensors — including inside ``torch.compile`` graphs —
    runs the Triton kernel instead of the plain-PyTorch composite reference. The public
    :func:`emokern.steer_` does not need it (its ``"triton"`` backend calls the kernel directly).

    Parameters
    ----------
    override : bool
        Register even if a CUDA kernel (e.g. the compiled one from ``csrc/cuda``) is already
        registered; the dispatcher then runs the Triton kernel.

    Returns
    -------
    bool
        True if the Triton kernel is (now, or already was) the registered CUDA kernel; False if
        another CUDA kernel was present and ``override`` was False.
    """
    global _cuda_registration
    if _cuda_registration is not None:
        return True
    import emokern.ops.library  # noqa: F401  (defines the schema)

    if not override and torch._C._dispatch_has_kernel_for_dispatch_key("emokern::steer_", "CUDA"):
        return False
    registration = torch.library.Library("emokern", "IMPL")
    registration.impl("steer_", triton_steer_, "CUDA")
    _cuda_registration = registration  # the registration lives as long as this object
    return True
