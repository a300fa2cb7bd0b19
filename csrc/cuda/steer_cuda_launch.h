// The launchers of the CUDA kernel (defined in steer_cuda.cu), declared once for the kernel and
// its torch binding (steer_cuda_binding.cpp). No torch headers: nvcc compiles the kernel on its
// own, and the tests run it on the CPU under an emulated runtime (tests/ops/cuda_emulation/).
//
// Both launchers take device pointers, allocate nothing and never synchronise (so they can be
// captured in a CUDA graph), and run on `stream`. They return cudaErrorInvalidValue for sizes
// they cannot launch (shared memory above the device's opt-in limit, more than 2^31 - 1
// blocks, bounds with more than kMaxLeveledVectors vectors or without gram), else the launch
// status.
//
// Projection levels and bounds (docs/design.md §2): `bounds` null, or [rows, 2, n_vec]
// contiguous float32 (per slot, the lower then the upper bound of every projection after the
// edit; rows = batch, or n_slots when packed) with `gram` [n_vec, n_vec] contiguous float32,
// the Gram matrix of the unit directions (emokern.ops.unit_gram).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace emokern {
namespace cuda {

// The storage dtype of hidden (and residual); the arithmetic is float32 for all three.
enum class HiddenDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The most vectors the kernel takes with bounds: each block keeps its rows' active-set solve
// (csrc/levels.h: K * K + K floats of scratch, beside 7 K + 1 words of per-row values) in
// shared memory, 67.5 KiB at K = 128.
constexpr int64_t kMaxLeveledVectors = 128;

// emokern::steer_, batched layout: `hidden` is [batch, seq_len, dim] in `dtype` with element
// strides (stride_b, stride_t, 1); `vectors` [n_vec, dim] and `weights` [batch, n_vec] are
// contiguous float32; `mask` ([batch, seq_len]), `proj_out` ([batch, seq_len, n_vec]) and the
// running statistics (run_sum, run_count, run_last: all three or none) may be null; `bounds`
// ([batch, 2, n_vec]) and `gram` both null or both given.
cudaError_t launch_steer(void* hidden, HiddenDtype dtype, int64_t batch, int64_t seq_len,
                         int64_t dim, int64_t stride_b, int64_t stride_t, const float* vectors,
                         int64_t n_vec, const float* weights, const bool* mask,
                         bool norm_preserving, float* proj_out, float* run_sum,
                         int64_t* run_count, float* run_last, const float* bounds,
                         const float* gram, cudaStream_t stream);

// emokern::steer_packed_, packed tokens: `hidden` is [n_tokens, dim] with row stride
// `stride_n` (last stride 1), `residual` null or [n_tokens, dim] in the same dtype with row
// stride `res_stride_n`, `slot_weights` [n_slots, n_vec], `token_slot` int32 with at least
// n_tokens entries (only those are read), `proj_out` [>= n_tokens, n_vec] (only the first
// n_tokens rows are written) or null, the running statistics [n_slots, n_vec] / [n_slots] /
// [n_slots, n_vec] or null; `bounds` [n_slots, 2, n_vec] and `gram` or null.
cudaError_t launch_steer_packed(void* hidden, const void* residual, HiddenDtype dtype,
                                int64_t n_tokens, int64_t dim, int64_t stride_n,
                                int64_t res_stride_n, const float* vectors, int64_t n_vec,
                                const float* slot_weights, int64_t n_slots,
                                const int32_t* token_slot, bool norm_preserving,
                                float* proj_out, float* run_sum, int64_t* run_count,
                                float* run_last, const float* bounds, const float* gram,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace emokern
