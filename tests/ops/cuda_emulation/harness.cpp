// The CUDA kernel compiled for the CPU against the emulated runtime in include/ (see
// tests/ops/test_cuda.py): a C entry point that runs launch_steer on host pointers.
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
                                      float* run_sum, int64_t* run_count, float* run_last) {
  emu::shared_memory = emokern::cuda::smem;
  return int(emokern::cuda::launch_steer(
      hidden, static_cast<emokern::cuda::HiddenDtype>(dtype), batch, seq_len, dim, stride_b,
      stride_t, vectors, n_vec, weights, mask, norm_preserving, proj_out, run_sum, run_count,
      run_last, nullptr));
}
