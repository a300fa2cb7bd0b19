// The CPU kernel's interface between its front (steer_cpu.cpp: argument checks, dispatcher
// registration, choice of instruction set) and its core (steer_kernel.h, compiled once per
// instruction set). Nothing here depends on the instruction set.
//
// One problem description serves both ops. A problem is a list of rows; row i has
//   * a hidden row: hidden + (i / seq_len) * stride_b + (i % seq_len) * stride_t,
//   * optionally a residual row (same dtype, its own strides): x = hidden + residual,
//   * a slot s (weights row, running-statistics row) or s < 0: not steered, not counted.
// emokern::steer_ [B, T, D] is rows i = b * T + t with slot b where mask[b, t] (else -1);
// emokern::steer_packed_ [N, D] is rows i < N with slot token_slot[i] (seq_len 1).
//
// Projection levels and bounds (Problem::bounds) add one step per steered row that the cores
// call back into the front for: level_row, the row's active-set solve (csrc/levels.h), compiled
// once in steer_cpu.cpp so that its scalar arithmetic is the same on every instruction set.
#pragma once

#include <cstdint>

namespace emokern {
namespace cpu {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Problem;

// The projection levels and bounds of one steered row (docs/design.md §2), in two steps:
//   level_push   q[k] = sum_j w[s, j] ||v_j|| G_jk, what slot s's pushes add to projection k
//                (0 where the slot leaves k open on both sides: level_row reads no other),
//                for the slots [begin, end) into q[(s - begin) K + k]; the cores compute it
//                once per slot;
//   level_row    from the row's projections p[K] of its input and its norm-preserving scale c
//                (1 without), the projections after the pushes p'_k = c (p_k + q_k) (0 where
//                the slot leaves k open on both sides), the targets clip(p', lo, hi) and the
//                active-set solve of csrc/levels.h. Writes the correction
//                y += sum_{j < m} coef[j] v_{idx[j]} (coef = a_k / ||v_k||, only the nonzero
//                a_k, in increasing k) and returns m; 0: the row is inside its bounds and is
//                written as without them. work: level_work_floats(K) floats.
// A core may skip level_row for a row whose every p'_k = c * (p_k + q_k), computed as here, is
// finite and within [lo_k, hi_k]: it returns 0 then.
using LevelPushFn = void (*)(const Problem& problem, int64_t slot_begin, int64_t slot_end,
                            float* q);
using LevelRowFn = int (*)(const Problem& problem, int64_t slot, const float* p, float c,
                           const float* q, float* coef, int32_t* idx, float* work);
inline int64_t level_work_floats(int64_t n_vec) { return 2 * n_vec * n_vec + 5 * n_vec; }

struct Problem {
  Dtype dtype;
  int64_t n_rows;  // rows to process (B * T, or N)
  int64_t dim;     // D
  int64_t n_vec;   // K

  void* hidden;
  int64_t seq_len;             // T (1 for packed rows)
  int64_t stride_b, stride_t;  // hidden strides in elements
  const void* residual;        // null, or rows added to hidden to form x (packed op)
  int64_t res_stride_b, res_stride_t;

  // Slot of row i: token_slot[i] when token_slot is set, else i / seq_len where mask[i] (or
  // every row without a mask).
  const int32_t* token_slot;
  const bool* mask;
  int64_t n_slots;  // S: rows of weights and of the running statistics

  const float* weights;   // [S, K]
  const float* vectors;   // [K, D], contiguous float32
  const float* inv_norm;  // [K], 1 / ||v_k||
  float* proj_out;        // [n_rows, K] or null
  float* run_sum;         // [S, K] or null (then run_count and run_last are null too)
  int64_t* run_count;     // [S]
  float* run_last;        // [S, K]
  bool norm_preserving;
  // Projection levels and bounds (csrc/levels.h), or null: bounds [S, 2, K] (lower, upper) of
  // every projection after the edit, gram [K, K] of the unit directions, norm [K] = ||v_k||,
  // and the solve's two steps (set together with bounds).
  const float* bounds;
  const float* gram;
  const float* norm;
  LevelPushFn level_push;
  LevelRowFn level_row;

  int64_t slot(int64_t i) const {
    if (token_slot != nullptr) return token_slot[i];
    if (mask != nullptr && !mask[i]) return -1;
    return i / seq_len;
  }
};

// One instruction set's compiled core.
struct KernelTable {
  const char* isa;  // "avx512", "avx2", "sve256", "neon" or "default"
  void (*steer)(const Problem& problem);
  // inv_norm[k] = 1 / ||v_k|| in the kernel's arithmetic; returns the first k whose norm is
  // zero or not finite (nothing meaningful is written then), or -1.
  int64_t (*inv_norms)(const float* vectors, int64_t n_vec, int64_t dim, float* inv_norm);
  // Whether all n floats are finite.
  bool (*all_finite)(const float* values, int64_t n);
};

}  // namespace cpu
}  // namespace emokern
