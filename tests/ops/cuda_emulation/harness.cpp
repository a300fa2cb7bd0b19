// The CUDA kernel compiled for the CPU against the emulated runtime in include/ (see
// tests/ops/test_cuda.py): C entry points that run launch_steer and launch_steer_packed on host
// pointers.
#include "steer_cuda.cu"
// Definition of the kernel's `extern __shared__` array, in the unnamed namespace it was
// declared in.
namespace emokern { namespace cuda { namespace {
alignas(16) unsigned char smem[emu::kSharedBytes];
} } }
extern "C" int emokern_emulated_steer(void* hidden, int dtype, int64_t batch, int64_t seq_len,
                                      int64_t dim, int64_t stride_b, int64_t stride_t,
                                      const float* vectors, int64_t n_vec, const float* weights,
                                      const bool* mask, bool norm_preserving, float* proj_out,
                                      float* run_sum, int64_t* run_count, float* run_last,
                                      const float* bounds, const float* gram) {
  emu::shared_memory = emokern::cuda::smem;
  return int(emokern::cuda::launch_steer(
      hidden, static_cast<emokern::cuda::HiddenDtype>(dtype), batch, seq_len, dim, stride_b,
      stride_t, vectors, n_vec, weights, mask, norm_preserving, proj_out, run_sum, run_count,
      run_last, bounds, gram, nullptr));
}
extern "C" int emokern_emulated_steer_packed(void* hidden, const void* residual, int dtype,
                                             int64_t n_tokens, int64_t dim, int64_t stride_n,
                                             int64_t res_stride_n, const float* vectors,
                                             int64_t n_vec, const float* slot_weights,
                                             int64_t n_slots, const int32_t* token_slot,
                                             bool norm_preserving, float* proj_out,
                                             float* run_sum, int64_t* run_count,
                                             float* run_last, const float* bounds,
                                             const float* gram) {
  emu::shared_memory = emokern::cuda::smem;
  return int(emokern::cuda::launch_steer_packed(
      hidden, residual, static_cast<emokern::cuda::HiddenDtype>(dtype), n_tokens, dim, stride_n,
      res_stride_n, vectors, n_vec, slot_weights, n_slots, token_slot, norm_preserving,
      proj_out, run_sum, run_count, run_last, bounds, gram, nullptr));
}
