// The core of the CPU kernel: one source for every instruction set, written on ATen's portable
// vector types (at::vec::Vectorized: AVX-512, AVX2, SVE, NEON or plain arrays, with vectorised
// bf16/fp16 conversion). steer_isa.h picks the set; this file is compiled once per set into
// namespace emokern::cpu::<set> and exposes kernel_table().
//
// Semantics (docs/design.md; oracle: emokern.ops.reference): for every row with
// x = hidden (+ residual), in float32,
//   p_k = <x, v_k> / ||v_k||;  if the row has a slot s: y = x + delta_s with
//   delta_s = sum_k w[s, k] v_k (k in order), y *= ||x|| / max(||y||, 1e-6) when norm
//   preserving, then with projection bounds the correction y += sum_k a_k u_k (below),
//   hidden = y (- residual), and the running statistics of s take p (of the input).
//
// Arithmetic, identical on every instruction set (bit for bit; bf16/fp16 NaN payloads aside):
//   * sums over D run in 16 logical lanes (lane l takes columns d = l mod 16, in increasing d,
//     by fused multiply-add), one to four registers per logical vector depending on the set,
//     then one fixed tree over the lanes (l + 8, l + 4, l + 2, l + 1);
//   * delta_s[d] accumulates k in order by fused multiply-add;
//   * y (- residual) rounds once: fma(x + delta, scale, -residual) when norm preserving;
//   * projection bounds (Problem::bounds; docs/design.md §2): the projections after the pushes
//     p'_k = c (p_k + q_k), q = Problem::level_push of the slot, c the norm-preserving scale
//     (1 without), then Problem::level_row (the active-set solve of csrc/levels.h): both
//     compiled once in steer_cpu.cpp, so their scalar arithmetic is the same on every set. A
//     row with every bounded p' finite and within its bounds (checked here with the same two
//     operations) is written exactly as without bounds; a row the solve corrects with
//     coefficients b_j on vectors v_j (b = a / ||v||, nonzero a only) is written as
//       y = fma(x + delta, c, corr) (norm preserving) or (x + delta) + corr, minus residual,
//     corr = sum_j b_j v_j by fused multiply-add from zero, j in increasing k.
// So every number a row produces depends on that row only: not on the thread count, the tile
// a row lands in, the batch around it, or the machine (x86 without FMA, the one exception,
// rounds products separately).
//
// Work (rows in blocks of 8 (AVX2: 9), blocks in chunks that fix the running-sum partials):
//   * few vectors (K <= 8; decode on AVX2: K <= 4): one sweep per row (pair) reads the row
//     from memory once and converts it in registers; with one register per logical vector
//     (AVX-512), or up to four vectors, it accumulates every dot product and writes y in the
//     same pass; with several registers (AVX2, NEON) and more vectors, two such sweeps over an
//     L1-resident column chunk, four vectors each, the second writing (decode offsets built
//     from the weights: the dot products one register part at a time, then the writes);
//   * many vectors: float32 rows (read in place, or converted once into scratch), register
//     tiles of kTileRows rows x kTileVecs vectors per column panel (vectors packed panel-major
//     once per call when enough rows share them and, in decode, when their layout needs it:
//     then once per thread),
//     then the writes;
//   * offsets delta_s: once per slot up front when slots have several rows (prefill);
//     otherwise (decode) built in registers from the weights, inside the sweep or by register
//     tiles of kDeltaRows rows x kDeltaCols logical vectors that write y = x + delta directly
//     (norm preserving: per block into scratch, then the scaled writes);
//   * projection bounds: with readings off only the projections some slot bounds are computed.
//     Not norm preserving, on at most kKeepSweepMaxK of them (decode: of all vectors): the
//     sweeps write every row as without bounds in their one pass and keep its float32
//     y = x + delta (none for float32 rows without residual: the written y is exact), the
//     block's rows are tested together (one lane-sum tree), and the rows a bound corrects are
//     written again from y; otherwise the tiles (on the bounded vectors when readings are off;
//     decode rows inside their bounds still written from registers), or, norm preserving, the
//     sweeps and their second pass. The pushes' share q once per slot, up front; the solve
//     only on the directions outside their bounds.
// Running statistics: each chunk of rows sums its rows' projections per slot in double, in
// row order; the chunks are reduced in order after the parallel loop (no atomics).
//
// The code, in layers (csrc/cpu/kernel/, each header includes only the one below it):
//   vec.h     logical vectors, loads/stores with conversions, lane sums;
//   sizes.h   register budgets and panel sizes per instruction set, the vectors' view;
//   tiles.h   register tiles (many vectors), the vector norms and finiteness checks;
//   sweeps.h  passes over rows (few vectors), row loads and writes, the norm rescale;
//   driver.h  scratch, the plan, blocks and chunks, the parallel run, kernel_table().
// Include this header after steer_isa.h, once per translation unit.

#include "kernel/driver.h"

// The layers' helper macros end with the core.
#undef EMOKERN_UNROLL
#undef EMOKERN_INLINE
