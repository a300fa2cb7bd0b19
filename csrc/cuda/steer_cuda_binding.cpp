// Torch side of the CUDA kernel of emokern::steer_ and emokern::steer_packed_: argument checks,
// device guard, current stream, dispatcher registration. The kernel itself (steer_cuda.cu) has
// no torch headers; its launchers are declared in steer_cuda_launch.h, the helpers this file
// shares with the CPU binding in csrc/binding.h.
//
// Checks here are the metadata ones shared with the CPU backend (csrc/steer.h: the messages and
// exception types of the Python wrappers): they read no device memory, so the ops stay free of
// host syncs and CUDA-graph capturable. The data checks (finite weights, nonzero vector norms,
// slots in [-1, S)) need a sync on CUDA; the public Python wrappers make them before calling
// this backend, except during graph capture — where the kernel treats a slot outside [-1, S)
// as -1 rather than access memory out of bounds. Projection bounds add one check of the
// kernel's own (steer_cuda_checks.h: K <= 128) and are passed through as raw pointers.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../binding.h"
#include "../steer.h"
#include "steer_cuda_checks.h"
#include "steer_cuda_launch.h"

namespace emokern {
namespace {

void check_launch(cudaError_t err, const char* op, const at::Tensor& hidden, int64_t n_vec,
                  bool residual, bool leveled) {
  TORCH_CHECK(err == cudaSuccess, "emokern.", op, ": CUDA kernel launch failed for hidden ",
              hidden.sizes(), " and ", n_vec, " vectors: ", cudaGetErrorString(err),
              err != cudaErrorInvalidValue ? ""
              : residual ? " (a row, its residual and the steering vector must fit in the GPU's "
                           "shared memory: D * (2 * element size + 4) bytes"
                         : " (a row and the steering vector must fit in the GPU's shared "
                           "memory: D * (element size + 4) bytes",
              err != cudaErrorInvalidValue ? ""
              : leveled ? ", plus (K * K + 7 * K + 1) * 4 bytes for the bounds' solve)"
                        : ")");
}

void steer_cuda(const at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
                const std::optional<at::Tensor>& mask, bool norm_preserving,
                const std::optional<at::Tensor>& proj_out,
                const std::optional<at::Tensor>& run_sum,
                const std::optional<at::Tensor>& run_count,
                const std::optional<at::Tensor>& run_last,
                const std::optional<at::Tensor>& bounds, const std::optional<at::Tensor>& gram) {
  const SteerSizes sz = check_steer_args(hidden, vectors, weights, mask, proj_out, run_sum,
                                         run_count, run_last);
  const bool leveled = check_bounds_args(bounds, gram, hidden, sz.batch, sz.n_vec, kSteerOp);
  check_cuda_bounds_size(leveled, sz.n_vec, kSteerOp);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "emokern.steer_: the CUDA kernel got hidden on ",
                    hidden.device());
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = weights.contiguous();
  const std::optional<at::Tensor> m = contiguous_or_none(mask);
  const OutputPointers out = output_pointers(proj_out, run_sum, run_count, run_last);
  const cudaError_t err = cuda::launch_steer(
      hidden.data_ptr(), hidden_dtype_code<cuda::HiddenDtype>(hidden), sz.batch, sz.seq_len,
      sz.dim, hidden.stride(0), hidden.stride(1), vec.data_ptr<float>(), sz.n_vec,
      w.data_ptr<float>(), m.has_value() ? m->data_ptr<bool>() : nullptr, norm_preserving,
      out.proj_out, out.run_sum, out.run_count, out.run_last,
      leveled ? bounds->data_ptr<float>() : nullptr, leveled ? gram->data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "steer_", hidden, sz.n_vec, false, leveled);
}

void steer_packed_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                       const at::Tensor& vectors, const at::Tensor& slot_weights,
                       const at::Tensor& token_slot, bool norm_preserving,
                       const std::optional<at::Tensor>& proj_out,
                       const std::optional<at::Tensor>& run_sum,
                       const std::optional<at::Tensor>& run_count,
                       const std::optional<at::Tensor>& run_last,
                       const std::optional<at::Tensor>& bounds,
                       const std::optional<at::Tensor>& gram) {
  const PackedSizes sz = check_steer_packed_args(hidden, residual, vectors, slot_weights,
                                                 token_slot, proj_out, run_sum, run_count,
                                                 run_last);
  const bool leveled = check_bounds_args(bounds, gram, hidden, sz.n_slots, sz.n_vec, kPackedOp);
  check_cuda_bounds_size(leveled, sz.n_vec, kPackedOp);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "emokern.steer_packed_: the CUDA kernel got hidden on ",
                    hidden.device());
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = slot_weights.contiguous();
  const at::Tensor slots = token_slot.contiguous();
  const OutputPointers out = output_pointers(proj_out, run_sum, run_count, run_last);
  const cudaError_t err = cuda::launch_steer_packed(
      hidden.data_ptr(), residual.has_value() ? residual->data_ptr() : nullptr,
      hidden_dtype_code<cuda::HiddenDtype>(hidden), sz.n_tokens, sz.dim, hidden.stride(0),
      residual.has_value() ? residual->stride(0) : 0, vec.data_ptr<float>(), sz.n_vec,
      w.data_ptr<float>(), sz.n_slots, slots.data_ptr<int32_t>(), norm_preserving,
      out.proj_out, out.run_sum, out.run_count, out.run_last,
      leveled ? bounds->data_ptr<float>() : nullptr, leveled ? gram->data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "steer_packed_", hidden, sz.n_vec, residual.has_value(), leveled);
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CUDA, m) {
  m.impl("steer_", &emokern::steer_cuda);
  m.impl("steer_packed_", &emokern::steer_packed_cuda);
}
