// Fused CUDA kernel of emokern::steer_ and emokern::steer_packed_ (one kernel, two layouts) —
// no torch headers, so it compiles on its own:
//   nvcc -c -arch=sm_90 -std=c++17 csrc/cuda/steer_cuda.cu
// The torch side (argument checks, current stream, dispatcher registration) is
// steer_cuda_binding.cpp; both include the launchers' declarations, steer_cuda_launch.h.
//
// For every token row with slot s and input x (float32 compute whatever the storage dtype):
//   p[k] = <x, v_k> / ||v_k||
//   y    = x + sum_k W[s, k] v_k;  if norm_preserving: y *= ||x|| / max(||y||, 1e-6)
//   the row becomes y (y - residual with a split stream) where s >= 0 (other rows are not
//   written), proj_out[row, :] = p on every row, run_sum[s] += p, run_count[s] += 1 over rows
//   with a slot, run_last[s] = p of the slot's newest row.
//
// Layouts. The kernel sees rows (seq, t) of `batch` sequences of `seq_len` rows; slot_of() is
// the only place the two layouts differ:
//   batched (steer_, hidden [B, T, D]): the slot of row (b, t) is b, or -1 where mask[b, t] is
//     false — computed from the block index, no index tensor;
//   packed (steer_packed_, hidden [N, D], optional residual [N, D]): one "sequence" of N rows,
//     x = hidden + residual, slots read from token_slot (a value outside [-1, S), which the
//     Python wrapper rejects when it can read values, is treated as -1: never an out-of-bounds
//     access, even under CUDA-graph capture where values cannot be checked).
//
// Design. One block per (sequence, chunk of rows); blocks are numbered on a flat grid (no
// 65,535 limit on B). A decode step (T = 1) is one block per sequence. The block's threads
// split D (thread i owns d = i, i + blockDim, ...); each row (and its residual) is staged once
// in shared memory in its storage dtype. The projections are computed K-tile by K-tile
// (kKTile = 8 dot products per thread in registers, reduced by warp shuffles and one
// shared-memory step: one __syncthreads per tile thanks to double-buffered partials). The
// first row of a block also computes 1/||v_k||, and a row whose slot differs from the last
// steered row's builds, from the same vector loads, its slot's steering vector
// delta = sum_k W[s, k] v_k, kept in shared memory for the following rows of that slot (in the
// batched layout, once per block). So the block reads `vectors` once per row and nothing else
// twice. ||y||^2 is summed directly from y (not from the Gram identity, which cancels
// catastrophically when y ~ 0).
//
// Projection levels and bounds (docs/design.md §2; `bounds` [S, 2, K] and `gram` [K, K] given):
// a second instantiation of the kernel (template flag kLeveled; the unbounded one compiles none
// of this). For a steered row, after the pushes and the norm-preserving scale c, the block
// forms the projections after the pushes by the Gram identity of the definition,
//   p'_k = c (p_k + q_k),   q_k = sum_j W[s, j] ||v_j|| G[j, k],
// which needs no second reduction over D: q depends on the slot only and is rebuilt beside
// delta (each thread owns its k's), p_k is the row's reading. A barrier with a block-wide OR
// (__syncthreads_or) tells whether any p'_k lies outside [lo_k, hi_k]; if none, the row is
// written exactly as without bounds (the same expression, bit for bit). Otherwise thread 0
// runs the active-set solve of csrc/levels.h (emokern::level_coefficients, shared with the CPU
// kernel) on shared-memory scratch of K * K + K floats and lists the nonzero a_k / ||v_k||;
// after a barrier every thread writes y = c (x + delta) + sum_{k in A} (a_k / ||v_k||) v_k
// (minus the residual), reading only the active vectors once more. The row is written once,
// corrected or not. The scratch bounds K: at most kMaxLeveledVectors (128, 67.5 KiB; the binding
// raises a ValueError beyond). The solve is serial on one thread: O(K^2) for the identity rows
// plus O(|A|^2 K) for the active ones, negligible for the few bounded emotions of a request,
// but a block waits on it once per row outside its bounds.
//
// Running statistics, the same code for both layouts. A block sums the projections of each
// run of rows of one slot in shared memory and adds the run's sum and count to
// run_sum/run_count when the slot changes and at the end — with atomics, except in the batched
// layout when a sequence is one block (decode: plain read-add-write, deterministic). In the
// packed layout a slot's tokens may span blocks, so its float sum depends on the order the
// atomics land in (ulp-level; counts are exact; a slot whose tokens of a call lie in one
// block, as in every decode step, gets the exact sum). run_last needs neither atomics nor an
// extra buffer: a run's last row is its slot's newest row iff no later run of the block and no
// row after the block has that slot. At its end the block checks all its runs (at most one
// per row) in one scan of the later rows' slots (mask or token_slot) that stops as soon as
// every run has a later twin. Serving engines pack a request's tokens contiguously, so the
// scans of prefill blocks stop in their first step; a block of decode tokens (one token per
// request) scans the rest of the batch once, N / (4 * threads) steps. Exactly one row writes
// each slot's run_last: deterministic.
//
// Launch configuration, a pure function of (T, D, K, dtype, residual, bounds): 64..512 threads
// (about 8 columns per thread; __launch_bounds__(512, 2) keeps it at <= 64 registers, no
// spills on sm_80/90, leveled or not), 16 rows per block when T (N when packed) >= 64 else 1,
// grid = B * ceil(T / rows), dynamic shared memory as below. Decode discipline: the launchers
// allocate nothing and never synchronise (so they can be captured in a CUDA graph); offsets
// are 64-bit (B*T*D may exceed 2^31).
//
// Limits: shared memory holds one row, its residual and delta, D * (sizeof(storage) [* 2] + 4)
// bytes, plus 16 B per vector (76 B in 16-row blocks, which keep each run's newest
// projections): D = 16384 in bfloat16 needs 96 KiB (opted in above the 48 KiB default; fine
// on sm_80+). With bounds, (K * K + 7 K + 1) * 4 bytes more (K <= 128). Rows of a chunk are
// processed one after another, so `vectors` is re-read from L2 for every row; for long
// prefills with large K*D a multi-row tile would cut that traffic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../levels.h"
#include "steer_cuda_launch.h"

namespace emokern {
namespace cuda {

namespace {

constexpr int kKTile = 8;          // dot products per thread per K tile
constexpr int kMaxThreads = 512;   // threads_for() never launches more
constexpr float kNormEps = 1e-6f;  // lower bound of ||y|| (emokern.ops.reference.NORM_EPS)
constexpr int kDotMinRows = 64;    // sequences at least this long get kChunkRows rows a block
constexpr int kChunkRows = 16;
constexpr int kScanPerThread = 4;  // slots each thread compares per step of the newest-row scan
constexpr size_t kDefaultSmem = 48 * 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct Params {
  void* hidden;
  const void* residual;  // packed: [N, D] in hidden's dtype (row stride res_stride_t) or null
  int64_t seq_len, dim, n_vec, stride_b, stride_t, res_stride_t;
  const float* vectors;  // [K, D] contiguous
  const float* weights;  // [S, K] contiguous (batched: S = B)
  const bool* mask;      // batched: [B, T] contiguous or null
  const int32_t* token_slot;  // packed: [>= N] contiguous; null in the batched layout
  int64_t n_slots;       // S
  float* proj_out;       // [B * T, K] contiguous or null
  float* run_sum;        // [S, K] or null (then run_count, run_last are null too)
  int64_t* run_count;    // [S]
  float* run_last;       // [S, K]
  int64_t rows_per_block, n_chunks;
  bool norm_preserving;
  bool atomic_run;       // a slot's rows may span blocks
  const float* bounds;   // [S, 2, K] contiguous, or null (then the unbounded kernel runs)
  const float* gram;     // [K, K] contiguous, with bounds
};

// The slot of row t of sequence seq (see "Layouts" above); -1: not steered, not counted.
__device__ __forceinline__ int64_t slot_of(const Params& p, int64_t seq, int64_t t) {
  if (p.token_slot != nullptr) {
    const int64_t s = p.token_slot[t];
    return s >= 0 && s < p.n_slots ? s : -1;
  }
  return p.mask == nullptr || p.mask[seq * p.seq_len + t] ? seq : -1;
}

__host__ __device__ inline size_t staged_row_bytes(int64_t dim, size_t elem_size) {
  return ((size_t(dim) * elem_size + 15) / 16) * 16;
}

// Words of shared memory the leveled kernel adds for K vectors (see smem_bytes).
__host__ __device__ inline size_t leveled_words(int64_t n_vec) {
  return size_t(n_vec) * size_t(n_vec) + 7 * size_t(n_vec) + 1;
}

// Shared-memory layout, in 4-byte words after the staged row (and staged residual), with
// R = rows per block (so at most R runs of one slot):
//   delta[D] | inv_norm[K] | dots[K] | sum[K] | last[R][K] | partials[2][2*kKTile][warps]
//   | scalars[2][2][warps] | run_slot[R] (int32) | run_found[R] (int32)
// and, in the leveled kernel (leveled_words):
//   | norm[K] | push_proj[K] | p_after[K] | coef[K] | corr_coef[K] | corr_index[K] (int32)
//   | n_corr (int32) | solve work[K * K + K]
__host__ __device__ inline size_t smem_bytes(int64_t dim, int64_t n_vec, int warps,
                                             size_t elem_size, bool residual, int64_t rows,
                                             bool leveled) {
  const size_t staged = staged_row_bytes(dim, elem_size) * (residual ? 2 : 1);
  const size_t words = size_t(dim) + (3 + size_t(rows)) * size_t(n_vec) +
                       2 * 2 * kKTile * size_t(warps) + 2 * 2 * size_t(warps) + 2 * size_t(rows) +
                       (leveled ? leveled_words(n_vec) : 0);
  return staged + words * 4;
}

// Add a closed run of `count` rows of `slot` (projection sums in sum_s) to run_sum/run_count,
// and reset sum_s. Each thread touches its own k's of sum_s (the proj loop's mapping).
__device__ void add_run(const Params& p, int64_t slot, int64_t count, float* sum_s) {
  const int64_t K = p.n_vec;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float* sum = p.run_sum + slot * K + k;
    if (p.atomic_run) {
      atomicAdd(sum, sum_s[k]);
    } else {
      *sum += sum_s[k];
    }
    sum_s[k] = 0.0f;
  }
  if (threadIdx.x == 0) {
    if (p.atomic_run) {
      // Two's complement: adding as unsigned is adding as signed.
      atomicAdd(reinterpret_cast<unsigned long long*>(p.run_count + slot),
                static_cast<unsigned long long>(count));
    } else {
      p.run_count[slot] += count;
    }
  }
}

// Write run_last for each of the block's `n_runs` runs (slots run_slot_s[r], projections of
// their last rows last_s[r]) whose last row is its slot's newest row of the call: no later run
// of the block has the slot, and no row after the block (t_end .. T-1 of sequence seq) has it.
// One scan for all runs, kScanPerThread slots per thread a step, stopping once every run has
// a later twin. Block-wide: every thread must call it with the same arguments.
__device__ void write_newest(const Params& p, int64_t seq, int64_t t_end, int n_runs,
                             const int32_t* run_slot_s, int32_t* run_found_s,
                             const float* last_s) {
  for (int r = threadIdx.x; r < n_runs; r += blockDim.x) {
    int later = 0;
    for (int r2 = r + 1; r2 < n_runs; ++r2) later |= run_slot_s[r2] == run_slot_s[r];
    run_found_s[r] = later;
  }
  __syncthreads();  // run_found_s initialised
  for (int64_t base = t_end;; base += int64_t(blockDim.x) * kScanPerThread) {
    // Read between two barriers, while nobody writes: every thread sees the same flags.
    bool pending = false;
    for (int r = 0; r < n_runs; ++r) pending |= run_found_s[r] == 0;
    __syncthreads();
    if (!pending || base >= p.seq_len) break;
#pragma unroll
    for (int j = 0; j < kScanPerThread; ++j) {
      const int64_t t = base + int64_t(j) * blockDim.x + threadIdx.x;
      if (t < p.seq_len) {
        const int64_t s = slot_of(p, seq, t);
        // Benign races: every writer stores the same 1.
        for (int r = 0; r < n_runs; ++r) {
          if (s >= 0 && s == run_slot_s[r]) run_found_s[r] = 1;
        }
      }
    }
    __syncthreads();  // the flags are visible
  }
  const int64_t K = p.n_vec;
  for (int r = 0; r < n_runs; ++r) {
    if (run_found_s[r]) continue;
    const int64_t slot = run_slot_s[r];
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      p.run_last[slot * K + k] = last_s[r * K + k];
    }
  }
}

// Sum per-thread values over the block: values[j] for the `groups` groups of GROUP entries
// whose index within the group is below `count` (the others are left as they are; the
// indices stay compile-time constants, so `values` lives in registers). Each warp's lane 0
// writes its partials to `scratch[j * warps + warp]`; after the barrier every thread sums the
// warps' partials. Callers alternate between two scratch buffers, which makes one barrier per
// call enough: a buffer is only rewritten two calls later, after another barrier.
template <int N, int GROUP>
__device__ __forceinline__ void block_sum(float (&values)[N], int count, int groups,
                                          float* scratch, int warps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j % GROUP < count && j / GROUP < groups) {
      const float s = warp_sum(values[j]);
      if (lane == 0) scratch[j * warps + warp] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j % GROUP < count && j / GROUP < groups) {
      values[j] = warp_sum(lane < warps ? scratch[j * warps + lane] : 0.0f);
    }
  }
}

// Two blocks of the largest size per SM (caps registers at 64/thread): the kernel is memory
// bound and needs the occupancy. kLeveled: projection levels and bounds (p.bounds, p.gram set);
// the unbounded instantiation compiles none of their code.
template <typename T, bool kLeveled>
__global__ void __launch_bounds__(kMaxThreads, 2) steer_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t D = p.dim, K = p.n_vec;
  const int warps = blockDim.x >> 5;
  const bool has_residual = p.residual != nullptr;
  const size_t row_bytes = staged_row_bytes(D, sizeof(T));
  T* x_s = reinterpret_cast<T*>(smem);
  T* r_s = reinterpret_cast<T*>(smem + row_bytes);  // the staged residual (packed layout)
  float* delta_s = reinterpret_cast<float*>(smem + row_bytes * (has_residual ? 2 : 1));
  float* inv_norm_s = delta_s + D;
  float* dots_s = inv_norm_s + K;
  float* sum_s = dots_s + K;
  float* last_s = sum_s + K;                             // [rows_per_block][K]
  float* partials = last_s + p.rows_per_block * K;       // [2][2 * kKTile * warps]
  float* scalars = partials + 2 * 2 * kKTile * warps;    // [2][2 * warps]
  int32_t* run_slot_s = reinterpret_cast<int32_t*>(scalars + 2 * 2 * warps);
  int32_t* run_found_s = run_slot_s + p.rows_per_block;
  // Levels and bounds (kLeveled only; see "Projection levels and bounds" above).
  float* norm_s = reinterpret_cast<float*>(run_found_s + p.rows_per_block);  // ||v_k||
  float* push_proj_s = norm_s + K;      // sum_j W[s, j] ||v_j|| G[j, k] of delta_slot
  float* p_after_s = push_proj_s + K;   // p' of the row
  float* coef_s = p_after_s + K;        // the solve's a
  float* corr_coef_s = coef_s + K;      // a_k / ||v_k|| of the nonzero a_k, in k order
  int32_t* corr_index_s = reinterpret_cast<int32_t*>(corr_coef_s + K);  // their k
  int32_t* n_corr_s = corr_index_s + K;
  float* work_s = reinterpret_cast<float*>(n_corr_s + 1);  // [K * K + K]

  const int64_t seq = blockIdx.x / p.n_chunks;
  const int64_t chunk = blockIdx.x % p.n_chunks;
  const int64_t t_begin = chunk * p.rows_per_block;
  const int64_t t_end = t_begin + p.rows_per_block < p.seq_len ? t_begin + p.rows_per_block
                                                               : p.seq_len;
  const bool has_run = p.run_sum != nullptr;

  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) sum_s[k] = 0.0f;

  int buffer = 0;
  int64_t delta_slot = -1;             // the slot whose steering vector delta_s holds
  // Runs of rows of one slot (statistics): the open one's slot and rows, and how many there
  // have been. Rows without a slot between two rows of one slot do not end a run.
  int64_t run_slot = -1, run_rows = 0;
  int n_runs = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const bool first = t == t_begin;
    // Block-uniform: every thread reads the same slot.
    const int64_t slot = slot_of(p, seq, t);
    const bool steered = slot >= 0;
    const bool build_delta = steered && slot != delta_slot;
    const float* w_row = p.weights + (steered ? slot : 0) * K;
    T* row = reinterpret_cast<T*>(p.hidden) + seq * p.stride_b + t * p.stride_t;
    const T* res_row = has_residual ? reinterpret_cast<const T*>(p.residual) + t * p.res_stride_t
                                    : nullptr;
    // Each thread only ever touches its own columns of x_s, r_s and delta_s: no barrier
    // needed between staging and use.
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      x_s[d] = row[d];
      if (has_residual) r_s[d] = res_row[d];
    }

    for (int64_t k0 = 0; k0 < K; k0 += kKTile) {
      const int n = K - k0 < kKTile ? int(K - k0) : kKTile;
      float acc[2 * kKTile];  // dots, then (first row only) squared norms
#pragma unroll
      for (int j = 0; j < 2 * kKTile; ++j) acc[j] = 0.0f;
      const float* v_tile = p.vectors + k0 * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float x = to_float(x_s[d]);
        if (has_residual) x += to_float(r_s[d]);
        float delta = (build_delta && k0 > 0) ? delta_s[d] : 0.0f;
#pragma unroll
        for (int j = 0; j < kKTile; ++j) {
          if (j < n) {
            const float v = __ldg(v_tile + j * D + d);
            acc[j] = fmaf(x, v, acc[j]);
            if (first) acc[kKTile + j] = fmaf(v, v, acc[kKTile + j]);
            if (build_delta) delta = fmaf(__ldg(w_row + k0 + j), v, delta);
          }
        }
        if (build_delta) delta_s[d] = delta;
      }
      // The n dots and, on the first row, the n squared norms.
      block_sum<2 * kKTile, kKTile>(acc, n, first ? 2 : 1,
                                    partials + buffer * 2 * kKTile * warps, warps);
      buffer ^= 1;
      if (threadIdx.x == 0) {
#pragma unroll
        for (int j = 0; j < kKTile; ++j) {
          if (j < n) {
            dots_s[k0 + j] = acc[j];
            if (first) {
              const float norm = sqrtf(acc[kKTile + j]);
              inv_norm_s[k0 + j] = 1.0f / norm;
              if (kLeveled) norm_s[k0 + j] = norm;
            }
          }
        }
      }
    }
    if (build_delta) delta_slot = slot;

    if (steered) {
      float scale = 1.0f;
      if (p.norm_preserving) {
        float norms[2] = {0.0f, 0.0f};  // ||x||^2, ||y||^2
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
          float x = to_float(x_s[d]);
          if (has_residual) x += to_float(r_s[d]);
          const float y = x + delta_s[d];
          norms[0] = fmaf(x, x, norms[0]);
          norms[1] = fmaf(y, y, norms[1]);
        }
        block_sum<2, 2>(norms, 2, 1, scalars + buffer * 2 * warps, warps);
        buffer ^= 1;
        scale = sqrtf(norms[0]) / fmaxf(sqrtf(norms[1]), kNormEps);
      }
      // Levels and bounds: the number of directions the row's correction adds (0: none, and
      // the row is written exactly as without bounds). Block-uniform.
      int n_corr = 0;
      if constexpr (kLeveled) {
        // dots_s, inv_norm_s and norm_s (thread 0's, after the last K tile) must be visible;
        // the norm-preserving block_sum above had a barrier after them.
        if (!p.norm_preserving) __syncthreads();
        const float* lo = p.bounds + slot * 2 * K;
        const float* hi = lo + K;
        // p'_k = c (p_k + sum_j W[s, j] ||v_j|| G[j, k]); the sum depends on the slot only
        // and is rebuilt with delta. Each thread owns its k's of push_proj_s.
        int outside = 0;
        for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
          if (build_delta) {
            float q = 0.0f;
            for (int64_t j = 0; j < K; ++j) {
              q = fmaf(__ldg(w_row + j) * norm_s[j], __ldg(p.gram + j * K + k), q);
            }
            push_proj_s[k] = q;
          }
          const float p_after = scale * (dots_s[k] * inv_norm_s[k] + push_proj_s[k]);
          p_after_s[k] = p_after;
          outside |= level_gap(p_after, __ldg(lo + k), __ldg(hi + k)) != 0.0f;
        }
        // A row inside all its bounds skips the solve (and is written as without bounds).
        if (__syncthreads_or(outside)) {
          if (threadIdx.x == 0) {
            level_coefficients(int(K), p.gram, p_after_s, lo, hi, coef_s, work_s);
            int n = 0;
            for (int k = 0; k < int(K); ++k) {
              if (coef_s[k] != 0.0f) {
                corr_coef_s[n] = coef_s[k] * inv_norm_s[k];
                corr_index_s[n] = k;
                ++n;
              }
            }
            *n_corr_s = n;
          }
          __syncthreads();  // the correction's coefficients are visible
          n_corr = *n_corr_s;
        }
      }
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float x = to_float(x_s[d]);
        if (n_corr == 0) {
          if (has_residual) {
            const float r = to_float(r_s[d]);
            row[d] = from_float<T>((x + r + delta_s[d]) * scale - r);
          } else {
            row[d] = from_float<T>((x + delta_s[d]) * scale);
          }
        } else {
          // y = c (x + delta) + sum_{k in A} (a_k / ||v_k||) v_k, then minus the residual.
          const float r = has_residual ? to_float(r_s[d]) : 0.0f;
          float y = (x + r + delta_s[d]) * scale;
          for (int i = 0; i < n_corr; ++i) {
            y = fmaf(corr_coef_s[i], __ldg(p.vectors + int64_t(corr_index_s[i]) * D + d), y);
          }
          row[d] = from_float<T>(has_residual ? y - r : y);
        }
      }
      if (has_run && slot != run_slot) {  // a row of another slot opens a new run
        if (run_slot >= 0) add_run(p, run_slot, run_rows, sum_s);
        if (threadIdx.x == 0) run_slot_s[n_runs] = int32_t(slot);
        ++n_runs;
        run_slot = slot;
        run_rows = 0;
      }
      ++run_rows;
    }
    __syncthreads();  // dots_s and inv_norm_s (written by thread 0) are visible below
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float proj = dots_s[k] * inv_norm_s[k];
      if (p.proj_out != nullptr) p.proj_out[(seq * p.seq_len + t) * K + k] = proj;
      if (has_run && steered) {
        sum_s[k] += proj;
        last_s[(n_runs - 1) * K + k] = proj;
      }
    }
    // dots_s is rewritten by the next row only after that row's first block_sum barrier.
  }

  if (!has_run || n_runs == 0) return;  // block-uniform
  add_run(p, run_slot, run_rows, sum_s);
  __syncthreads();  // run_slot_s (written by thread 0) is visible
  write_newest(p, seq, t_end, n_runs, run_slot_s, run_found_s, last_s);
}

int threads_for(int64_t dim) {
  // ~8 columns per thread, 64..512 threads.
  int threads = 64;
  while (threads < kMaxThreads && threads * 8 < dim) threads *= 2;
  return threads;
}

template <typename T, bool kLeveled>
cudaError_t launch_typed(const Params& params, int64_t batch, cudaStream_t stream) {
  const int threads = threads_for(params.dim);
  const size_t smem = smem_bytes(params.dim, params.n_vec, threads / 32, sizeof(T),
                                 params.residual != nullptr, params.rows_per_block, kLeveled);
  if (smem > kDefaultSmem) {
    // Opt in to the larger shared memory of sm_70+; fails cleanly where the device has less.
    const cudaError_t err = cudaFuncSetAttribute(steer_kernel<T, kLeveled>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(batch * params.n_chunks));
  // cudaLaunchKernel rather than <<<>>>: the same call in plain C++, so tests can also run
  // this file on the CPU under a small emulation of the runtime (tests/ops/test_cuda.py,
  // tests/ops/cuda_emulation/).
  Params args = params;
  void* arg_ptrs[] = {&args};
  const cudaError_t err = cudaLaunchKernel(steer_kernel<T, kLeveled>, grid, dim3(threads),
                                           arg_ptrs, smem, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// Rows per block, blocks per sequence and the atomics rule, then the typed launch.
cudaError_t launch_params(Params& params, HiddenDtype dtype, int64_t batch, bool packed,
                          cudaStream_t stream) {
  params.rows_per_block = params.seq_len >= kDotMinRows ? kChunkRows : 1;
  params.n_chunks = (params.seq_len + params.rows_per_block - 1) / params.rows_per_block;
  params.atomic_run = packed || params.n_chunks > 1;
  if (batch > ((int64_t(1) << 31) - 1) / params.n_chunks) return cudaErrorInvalidValue;
  if (params.bounds != nullptr) {
    if (params.gram == nullptr || params.n_vec > kMaxLeveledVectors) return cudaErrorInvalidValue;
    switch (dtype) {
      case HiddenDtype::kFloat32: return launch_typed<float, true>(params, batch, stream);
      case HiddenDtype::kBFloat16: return launch_typed<__nv_bfloat16, true>(params, batch, stream);
      case HiddenDtype::kFloat16: return launch_typed<__half, true>(params, batch, stream);
    }
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case HiddenDtype::kFloat32: return launch_typed<float, false>(params, batch, stream);
    case HiddenDtype::kBFloat16: return launch_typed<__nv_bfloat16, false>(params, batch, stream);
    case HiddenDtype::kFloat16: return launch_typed<__half, false>(params, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// The launchers (arguments and return values: steer_cuda_launch.h).
cudaError_t launch_steer(void* hidden, HiddenDtype dtype, int64_t batch, int64_t seq_len,
                         int64_t dim, int64_t stride_b, int64_t stride_t, const float* vectors,
                         int64_t n_vec, const float* weights, const bool* mask,
                         bool norm_preserving, float* proj_out, float* run_sum,
                         int64_t* run_count, float* run_last, const float* bounds,
                         const float* gram, cudaStream_t stream) {
  if (batch == 0 || seq_len == 0 || dim == 0) return cudaSuccess;
  if (batch < 0 || seq_len < 0 || dim < 0 || n_vec < 1) return cudaErrorInvalidValue;
  Params params{};
  params.hidden = hidden;
  params.seq_len = seq_len;
  params.dim = dim;
  params.n_vec = n_vec;
  params.stride_b = stride_b;
  params.stride_t = stride_t;
  params.vectors = vectors;
  params.weights = weights;
  params.mask = mask;
  params.n_slots = batch;
  params.proj_out = proj_out;
  params.run_sum = run_sum;
  params.run_count = run_count;
  params.run_last = run_last;
  params.norm_preserving = norm_preserving;
  params.bounds = bounds;
  params.gram = gram;
  return launch_params(params, dtype, batch, false, stream);
}

cudaError_t launch_steer_packed(void* hidden, const void* residual, HiddenDtype dtype,
                                int64_t n_tokens, int64_t dim, int64_t stride_n,
                                int64_t res_stride_n, const float* vectors, int64_t n_vec,
                                const float* slot_weights, int64_t n_slots,
                                const int32_t* token_slot, bool norm_preserving,
                                float* proj_out, float* run_sum, int64_t* run_count,
                                float* run_last, const float* bounds, const float* gram,
                                cudaStream_t stream) {
  if (n_tokens == 0 || dim == 0) return cudaSuccess;
  if (n_tokens < 0 || dim < 0 || n_vec < 1 || n_slots < 1 || token_slot == nullptr) {
    return cudaErrorInvalidValue;
  }
  Params params{};
  params.hidden = hidden;
  params.residual = residual;
  params.seq_len = n_tokens;
  params.dim = dim;
  params.n_vec = n_vec;
  params.stride_t = stride_n;
  params.res_stride_t = res_stride_n;
  params.vectors = vectors;
  params.weights = slot_weights;
  params.token_slot = token_slot;
  params.n_slots = n_slots;
  params.proj_out = proj_out;
  params.run_sum = run_sum;
  params.run_count = run_count;
  params.run_last = run_last;
  params.norm_preserving = norm_preserving;
  params.bounds = bounds;
  params.gram = gram;
  return launch_params(params, dtype, 1, true, stream);
}

}  // namespace cuda
}  // namespace emokern
