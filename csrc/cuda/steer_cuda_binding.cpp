// Torch side of the CUDA kernel of emokern::steer_ and emokern::steer_packed_: argument checks,
// device guard, current stream, dispatcher registration. The kernel itself (steer_cuda.cu) has
// no torch headers.
//
// Checks here are the metadata ones shared with the CPU backend (csrc/steer.h: the messages and
// exception types of the Python wrappers): they read no device memory, so the ops stay free of
// host syncs and CUDA-graph capturable. The data checks (finite weights, nonzero vector norms,
// slots in [-1, S)) need a sync on CUDA; the public Python wrappers make them before calling
// this backend, except during graph capture — where the kernel treats a slot outside [-1, S)
// as -1 rather than access memory out of bounds.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../steer.h"

namespace emokern {
namespace cuda {

// Defined in steer_cuda.cu (same declarations).
enum class HiddenDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
cudaError_t launch_steer(void* hidden, HiddenDtype dtype, int64_t batch, int64_t seq_len,
                         int64_t dim, int64_t stride_b, int64_t stride_t, const float* vectors,
                         int64_t n_vec, const float* weights, const bool* mask,
                         bool norm_preserving, float* proj_out, float* run_sum,
                         int64_t* run_count, float* run_last, cudaStream_t stream);
cudaError_t launch_steer_packed(void* hidden, const void* residual, HiddenDtype dtype,
                                int64_t n_tokens, int64_t dim, int64_t stride_n,
                                int64_t res_stride_n, const float* vectors, int64_t n_vec,
                                const float* slot_weights, int64_t n_slots,
                                const int32_t* token_slot, bool norm_preserving,
                                float* proj_out, float* run_sum, int64_t* run_count,
                                float* run_last, cudaStream_t stream);

}  // namespace cuda

namespace {

float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

cuda::HiddenDtype hidden_dtype(const at::Tensor& hidden) {
  switch (hidden.scalar_type()) {
    case at::kFloat: return cuda::HiddenDtype::kFloat32;
    case at::kBFloat16: return cuda::HiddenDtype::kBFloat16;
    case at::kHalf: return cuda::HiddenDtype::kFloat16;
    default: TORCH_CHECK(false, "unreachable: the checks accept float dtypes only");
  }
}

// float32 and contiguous, the layout the kernel reads. The Python wrappers already pass
// vectors so (no copies on the decode path); direct callers of torch.ops may pass others.
at::Tensor float_contiguous(const at::Tensor& t) {
  return (t.scalar_type() == at::kFloat && t.is_contiguous()) ? t
                                                               : t.to(at::kFloat).contiguous();
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& hidden, int64_t n_vec,
                  bool residual) {
  TORCH_CHECK(err == cudaSuccess, "emokern.", op, ": CUDA kernel launch failed for hidden ",
              hidden.sizes(), " and ", n_vec, " vectors: ", cudaGetErrorString(err),
              err != cudaErrorInvalidValue ? ""
              : residual ? " (a row, its residual and the steering vector must fit in the GPU's "
                           "shared memory: D * (2 * element size + 4) bytes)"
                         : " (a row and the steering vector must fit in the GPU's shared "
                           "memory: D * (element size + 4) bytes)");
}

void steer_cuda(const at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
                const std::optional<at::Tensor>& mask, bool norm_preserving,
                const std::optional<at::Tensor>& proj_out,
                const std::optional<at::Tensor>& run_sum,
                const std::optional<at::Tensor>& run_count,
                const std::optional<at::Tensor>& run_last) {
  const SteerSizes sz = check_steer_args(hidden, vectors, weights, mask, proj_out, run_sum,
                                         run_count, run_last);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "emokern.steer_: the CUDA kernel got hidden on ",
                    hidden.device());
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = weights.contiguous();
  std::optional<at::Tensor> m;
  if (mask.has_value()) m = mask->contiguous();
  const cudaError_t err = cuda::launch_steer(
      hidden.data_ptr(), hidden_dtype(hidden), sz.batch, sz.seq_len, sz.dim, hidden.stride(0),
      hidden.stride(1), vec.data_ptr<float>(), sz.n_vec, w.data_ptr<float>(),
      m.has_value() ? m->data_ptr<bool>() : nullptr, norm_preserving, data_or_null(proj_out),
      data_or_null(run_sum), run_count.has_value() ? run_count->data_ptr<int64_t>() : nullptr,
      data_or_null(run_last), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "steer_", hidden, sz.n_vec, false);
}

void steer_packed_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                       const at::Tensor& vectors, const at::Tensor& slot_weights,
                       const at::Tensor& token_slot, bool norm_preserving,
                       const std::optional<at::Tensor>& proj_out,
                       const std::optional<at::Tensor>& run_sum,
                       const std::optional<at::Tensor>& run_count,
                       const std::optional<at::Tensor>& run_last) {
  const PackedSizes sz = check_steer_packed_args(hidden, residual, vectors, slot_weights,
                                                 token_slot, proj_out, run_sum, run_count,
                                                 run_last);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "emokern.steer_packed_: the CUDA kernel got hidden on ",
                    hidden.device());
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = slot_weights.contiguous();
  const at::Tensor slots = token_slot.contiguous();
  const cudaError_t err = cuda::launch_steer_packed(
      hidden.data_ptr(), residual.has_value() ? residual->data_ptr() : nullptr,
      hidden_dtype(hidden), sz.n_tokens, sz.dim, hidden.stride(0),
      residual.has_value() ? residual->stride(0) : 0, vec.data_ptr<float>(), sz.n_vec,
      w.data_ptr<float>(), sz.n_slots, slots.data_ptr<int32_t>(), norm_preserving,
      data_or_null(proj_out), data_or_null(run_sum),
      run_count.has_value() ? run_count->data_ptr<int64_t>() : nullptr, data_or_null(run_last),
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "steer_packed_", hidden, sz.n_vec, residual.has_value());
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CUDA, m) {
  m.impl("steer_", &emokern::steer_cuda);
  m.impl("steer_packed_", &emokern::steer_packed_cuda);
}
