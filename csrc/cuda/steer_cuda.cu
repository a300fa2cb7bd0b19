// Fused CUDA kernel of emokern::steer_ — no torch headers, so it compiles on its own:
//   nvcc -c -arch=sm_90 -std=c++17 csrc/cuda/steer_cuda.cu
// The torch side (argument checks, current stream, dispatcher registration) is
// steer_cuda_binding.cpp.
//
// For every token row x = hidden[b, t] (input; float32 compute whatever the storage dtype):
//   p[k] = <x, v_k> / ||v_k||
//   y    = x + sum_k w[b, k] v_k;  if norm_preserving: y *= ||x|| / max(||y||, 1e-6)
//   hidden[b, t] = y on masked rows (unmasked rows are not written), proj_out[b, t, :] = p,
//   run_sum[b] += p, run_count[b] += 1 over masked rows, run_last[b] = p of the newest one.
//
// Design. One block per (sequence b, chunk of rows of b); blocks are numbered on a flat grid
// (no 65,535 limit on B). A decode step (T = 1) is one block per sequence. The block's threads
// split D (thread i owns d = i, i + blockDim, ...); each row is staged once in shared memory in
// its storage dtype. The projections are computed K-tile by K-tile (kKTile = 8 dot products
// per thread in registers, reduced by warp shuffles and one shared-memory step: one
// __syncthreads per tile thanks to double-buffered partials). The first row of a block also
// builds, from the same vector loads, the sequence's steering vector delta = sum_k w_k v_k
// (kept in shared memory for the block's other rows) and 1/||v_k||, so the block reads
// `vectors` once per row and nothing else twice. ||y||^2 is summed directly from y (not from
// the Gram identity, which cancels catastrophically when y ~ 0).
//
// Running statistics: per block in shared memory, then added to run_sum/run_count with
// atomics only when a sequence spans several blocks (decode: plain read-add-write,
// deterministic). run_last is written only by the block whose chunk holds the sequence's
// newest masked row: it checks that no later row of the sequence is masked (a block-wide
// scan of the rest of the mask row; without a mask it is the last chunk).
//
// Launch configuration, a pure function of (T, D, K, dtype): 64..512 threads (about 8 columns
// per thread; __launch_bounds__(512, 2) keeps it at <= 64 registers, no spills on sm_80/90),
// 16 rows per block when T >= 64 else 1, grid = B * ceil(T / rows), dynamic shared memory
// as below. Decode discipline: the launcher allocates nothing and never synchronises (so it
// can be captured in a CUDA graph); offsets are 64-bit (B*T*D may exceed 2^31).
//
// Limits: shared memory holds one row and delta, D * (sizeof(storage) + 4) bytes plus ~24 B
// per vector: D = 16384 in bfloat16 needs 96 KiB (opted in above the 48 KiB default; fine on
// sm_80+). Rows of a chunk are processed one after another, so `vectors` is re-read from L2
// for every row; for long prefills with large K*D a multi-row tile would cut that traffic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace emokern {
namespace cuda {

enum class HiddenDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

namespace {

constexpr int kKTile = 8;          // dot products per thread per K tile
constexpr int kMaxThreads = 512;   // threads_for() never launches more
constexpr float kNormEps = 1e-6f;  // lower bound of ||y|| (emokern.ops.reference.NORM_EPS)
constexpr int kDotMinRows = 64;    // sequences at least this long get kChunkRows rows a block
constexpr int kChunkRows = 16;
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
  int64_t seq_len, dim, n_vec, stride_b, stride_t;
  const float* vectors;  // [K, D] contiguous
  const float* weights;  // [B, K] contiguous
  const bool* mask;      // [B, T] contiguous or null
  float* proj_out;       // [B, T, K] contiguous or null
  float* run_sum;        // [B, K] or null (then run_count, run_last are null too)
  int64_t* run_count;    // [B]
  float* run_last;       // [B, K]
  int64_t rows_per_block, n_chunks;
  bool norm_preserving;
};

// Shared-memory layout, in float-sized slots after the staged row:
//   delta[D] | w[K] | inv_norm[K] | dots[K] | sum[K] | last[K] | partials[2][2*kKTile][warps]
//   | scalars[2][2][warps]
__host__ __device__ inline size_t smem_bytes(int64_t dim, int64_t n_vec, int warps,
                                             size_t elem_size) {
  const size_t row = ((size_t(dim) * elem_size + 15) / 16) * 16;
  const size_t floats = size_t(dim) + 5 * size_t(n_vec) + 2 * 2 * kKTile * size_t(warps) +
                        2 * 2 * size_t(warps);
  return row + floats * sizeof(float);
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
// bound and needs the occupancy.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 2) steer_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t D = p.dim, K = p.n_vec;
  const int warps = blockDim.x >> 5;
  T* x_s = reinterpret_cast<T*>(smem);
  float* delta_s = reinterpret_cast<float*>(smem + ((size_t(D) * sizeof(T) + 15) / 16) * 16);
  float* w_s = delta_s + D;
  float* inv_norm_s = w_s + K;
  float* dots_s = inv_norm_s + K;
  float* sum_s = dots_s + K;
  float* last_s = sum_s + K;
  float* partials = last_s + K;                       // [2][2 * kKTile * warps]
  float* scalars = partials + 2 * 2 * kKTile * warps;  // [2][2 * warps]

  const int64_t seq = blockIdx.x / p.n_chunks;
  const int64_t chunk = blockIdx.x % p.n_chunks;
  const int64_t t_begin = chunk * p.rows_per_block;
  const int64_t t_end = t_begin + p.rows_per_block < p.seq_len ? t_begin + p.rows_per_block
                                                               : p.seq_len;
  const bool has_run = p.run_sum != nullptr;

  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    w_s[k] = p.weights[seq * K + k];
    sum_s[k] = 0.0f;
  }
  __syncthreads();

  int buffer = 0;
  int64_t newest = -1, n_steered = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const bool first = t == t_begin;
    const bool steered = p.mask == nullptr || p.mask[seq * p.seq_len + t];
    T* row = reinterpret_cast<T*>(p.hidden) + seq * p.stride_b + t * p.stride_t;
    // Each thread only ever touches its own columns of x_s and delta_s: no barrier needed
    // between staging and use.
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) x_s[d] = row[d];

    for (int64_t k0 = 0; k0 < K; k0 += kKTile) {
      const int n = K - k0 < kKTile ? int(K - k0) : kKTile;
      float acc[2 * kKTile];  // dots, then (first row only) squared norms
#pragma unroll
      for (int j = 0; j < 2 * kKTile; ++j) acc[j] = 0.0f;
      const float* v_tile = p.vectors + k0 * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const float x = to_float(x_s[d]);
        float delta = (first && k0 > 0) ? delta_s[d] : 0.0f;
#pragma unroll
        for (int j = 0; j < kKTile; ++j) {
          if (j < n) {
            const float v = __ldg(v_tile + j * D + d);
            acc[j] = fmaf(x, v, acc[j]);
            if (first) {
              acc[kKTile + j] = fmaf(v, v, acc[kKTile + j]);
              delta = fmaf(w_s[k0 + j], v, delta);
            }
          }
        }
        if (first) delta_s[d] = delta;
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
            if (first) inv_norm_s[k0 + j] = 1.0f / sqrtf(acc[kKTile + j]);
          }
        }
      }
    }

    if (steered) {
      float scale = 1.0f;
      if (p.norm_preserving) {
        float norms[2] = {0.0f, 0.0f};  // ||x||^2, ||y||^2
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
          const float x = to_float(x_s[d]);
          const float y = x + delta_s[d];
          norms[0] = fmaf(x, x, norms[0]);
          norms[1] = fmaf(y, y, norms[1]);
        }
        block_sum<2, 2>(norms, 2, 1, scalars + buffer * 2 * warps, warps);
        buffer ^= 1;
        scale = sqrtf(norms[0]) / fmaxf(sqrtf(norms[1]), kNormEps);
      }
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        row[d] = from_float<T>((to_float(x_s[d]) + delta_s[d]) * scale);
      }
      newest = t;
      ++n_steered;
    }
    __syncthreads();  // dots_s and inv_norm_s (written by thread 0) are visible below
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float proj = dots_s[k] * inv_norm_s[k];
      if (p.proj_out != nullptr) p.proj_out[(seq * p.seq_len + t) * K + k] = proj;
      if (has_run && steered) {
        sum_s[k] += proj;
        last_s[k] = proj;
      }
    }
    // dots_s is rewritten by the next row only after that row's first block_sum barrier.
  }

  if (!has_run) return;
  // Does this chunk hold the sequence's newest masked row? Only if no later row is masked.
  int later = 0;
  if (p.mask != nullptr) {
    for (int64_t t = t_end + threadIdx.x; t < p.seq_len && !later; t += blockDim.x) {
      later = p.mask[seq * p.seq_len + t];
    }
  } else {
    later = t_end < p.seq_len;  // every row is masked: only the last chunk holds the newest
  }
  const bool any_later = __syncthreads_or(later) != 0;  // every thread must reach it
  const bool holds_newest = newest >= 0 && !any_later;
  const bool atomic = p.n_chunks > 1;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float* sum = p.run_sum + seq * K + k;
    if (atomic) {
      if (n_steered > 0) atomicAdd(sum, sum_s[k]);
    } else {
      *sum += sum_s[k];
    }
    if (holds_newest) p.run_last[seq * K + k] = last_s[k];
  }
  if (threadIdx.x == 0 && n_steered > 0) {
    if (atomic) {
      // Two's complement: adding as unsigned is adding as signed.
      atomicAdd(reinterpret_cast<unsigned long long*>(p.run_count + seq),
                static_cast<unsigned long long>(n_steered));
    } else {
      p.run_count[seq] += n_steered;
    }
  }
}

int threads_for(int64_t dim) {
  // ~8 columns per thread, 64..512 threads.
  int threads = 64;
  while (threads < kMaxThreads && threads * 8 < dim) threads *= 2;
  return threads;
}

template <typename T>
cudaError_t launch_typed(const Params& params, int64_t batch, cudaStream_t stream) {
  const int threads = threads_for(params.dim);
  const size_t smem = smem_bytes(params.dim, params.n_vec, threads / 32, sizeof(T));
  if (smem > kDefaultSmem) {
    // Opt in to the larger shared memory of sm_70+; fails cleanly where the device has less.
    const cudaError_t err = cudaFuncSetAttribute(
        steer_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned int>(batch * params.n_chunks));
  // cudaLaunchKernel rather than <<<>>>: the same call in plain C++, so tests can also run
  // this file on the CPU under a small emulation of the runtime (tests/ops/test_cuda.py,
  // tests/ops/cuda_emulation/).
  Params args = params;
  void* arg_ptrs[] = {&args};
  const cudaError_t err = cudaLaunchKernel(steer_kernel<T>, grid, dim3(threads), arg_ptrs, smem,
                                           stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace

// Launch the fused steer kernel on `stream`. Pointers are device pointers; `hidden` is
// [batch, seq_len, dim] in `dtype` with element strides (stride_b, stride_t, 1); `mask`,
// `proj_out` and the running statistics may be null (the three running pointers together).
// Allocates nothing and never synchronises. Returns cudaErrorInvalidValue for sizes it
// cannot launch (shared memory above the device's opt-in limit, more than 2^31 - 1 blocks),
// else the launch status.
cudaError_t launch_steer(void* hidden, HiddenDtype dtype, int64_t batch, int64_t seq_len,
                         int64_t dim, int64_t stride_b, int64_t stride_t, const float* vectors,
                         int64_t n_vec, const float* weights, const bool* mask,
                         bool norm_preserving, float* proj_out, float* run_sum,
                         int64_t* run_count, float* run_last, cudaStream_t stream) {
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
  params.proj_out = proj_out;
  params.run_sum = run_sum;
  params.run_count = run_count;
  params.run_last = run_last;
  params.norm_preserving = norm_preserving;
  params.rows_per_block = seq_len >= kDotMinRows ? kChunkRows : 1;
  params.n_chunks = (seq_len + params.rows_per_block - 1) / params.rows_per_block;
  if (batch > ((int64_t(1) << 31) - 1) / params.n_chunks) return cudaErrorInvalidValue;
  switch (dtype) {
    case HiddenDtype::kFloat32: return launch_typed<float>(params, batch, stream);
    case HiddenDtype::kBFloat16: return launch_typed<__nv_bfloat16>(params, batch, stream);
    case HiddenDtype::kFloat16: return launch_typed<__half>(params, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace emokern
