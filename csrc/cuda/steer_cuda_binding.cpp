// Torch side of the CUDA kernel of emokern::steer_: argument checks, device guard, current
// stream, dispatcher registration. The kernel itself (steer_cuda.cu) has no torch headers.
//
// Checks here are the metadata ones shared with the CPU backend (csrc/steer.h): they read no
// device memory, so the op stays free of host syncs and CUDA-graph capturable. The data checks
// (finite weights, nonzero vector norms) need a sync on CUDA; the public Python wrapper
// (emokern.steer_) makes them before calling this backend, except during graph capture.

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

// Defined in steer_cuda.cu (same declaration).
enum class HiddenDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
cudaError_t launch_steer(void* hidden, HiddenDtype dtype, int64_t batch, int64_t seq_len,
                         int64_t dim, int64_t stride_b, int64_t stride_t, const float* vectors,
                         int64_t n_vec, const float* weights, const bool* mask,
                         bool norm_preserving, float* proj_out, float* run_sum,
                         int64_t* run_count, float* run_last, cudaStream_t stream);

}  // namespace cuda

namespace {

float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
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
  // The layouts the kernel reads. The Python wrapper already passes them so (no copies on the
  // decode path); direct callers of torch.ops.emokern.steer_ may pass others.
  const at::Tensor vec = (vectors.scalar_type() == at::kFloat && vectors.is_contiguous())
                             ? vectors
                             : vectors.to(at::kFloat).contiguous();
  const at::Tensor w = weights.contiguous();
  std::optional<at::Tensor> m;
  if (mask.has_value()) m = mask->contiguous();

  cuda::HiddenDtype dtype = cuda::HiddenDtype::kFloat32;
  switch (hidden.scalar_type()) {
    case at::kFloat: dtype = cuda::HiddenDtype::kFloat32; break;
    case at::kBFloat16: dtype = cuda::HiddenDtype::kBFloat16; break;
    case at::kHalf: dtype = cuda::HiddenDtype::kFloat16; break;
    default: TORCH_CHECK(false, "unreachable: check_steer_args accepts float dtypes only");
  }
  const cudaError_t err = cuda::launch_steer(
      hidden.data_ptr(), dtype, sz.batch, sz.seq_len, sz.dim, hidden.stride(0),
      hidden.stride(1), vec.data_ptr<float>(), sz.n_vec, w.data_ptr<float>(),
      m.has_value() ? m->data_ptr<bool>() : nullptr, norm_preserving, data_or_null(proj_out),
      data_or_null(run_sum), run_count.has_value() ? run_count->data_ptr<int64_t>() : nullptr,
      data_or_null(run_last), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "emokern.steer_: CUDA kernel launch failed for hidden ",
              hidden.sizes(), " and ", sz.n_vec, " vectors: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue
                  ? " (a row and the steering vector must fit in the GPU's shared memory: "
                    "D * (element size + 4) bytes)"
                  : "");
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CUDA, m) { m.impl("steer_", &emokern::steer_cuda); }
