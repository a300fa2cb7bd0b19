// What the torch bindings of the compiled kernels (csrc/cpu/steer_cpu.cpp,
// csrc/cuda/steer_cuda_binding.cpp) do with the tensors once csrc/steer.h has checked them:
// inputs in the layout the kernels read, the optional outputs as raw pointers, the hidden
// dtype as each kernel's code. The kernels themselves (csrc/cpu/kernel/, steer_cuda.cu) see
// pointers and sizes only, no tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace emokern {

// float32 and contiguous, the layout the kernels read `vectors` in. The Python wrappers already
// pass vectors so (no copy on the decode path); direct callers of torch.ops may pass others.
inline at::Tensor float_contiguous(const at::Tensor& t) {
  return (t.scalar_type() == at::kFloat && t.is_contiguous()) ? t
                                                               : t.to(at::kFloat).contiguous();
}

// The optional mask, contiguous (no copy when it already is).
inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  std::optional<at::Tensor> out;
  if (t.has_value()) out = t->contiguous();
  return out;
}

inline float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The optional outputs of both ops as the kernels take them: null where absent (the three
// running statistics are given together, csrc/steer.h checks).
struct OutputPointers {
  float* proj_out;
  float* run_sum;
  int64_t* run_count;
  float* run_last;
};

inline OutputPointers output_pointers(const std::optional<at::Tensor>& proj_out,
                                      const std::optional<at::Tensor>& run_sum,
                                      const std::optional<at::Tensor>& run_count,
                                      const std::optional<at::Tensor>& run_last) {
  return {data_or_null(proj_out), data_or_null(run_sum),
          run_count.has_value() ? run_count->data_ptr<int64_t>() : nullptr,
          data_or_null(run_last)};
}

// hidden's dtype as a kernel's enum (cpu::Dtype, cuda::HiddenDtype: the same enumerators).
template <typename Code>
inline Code hidden_dtype_code(const at::Tensor& hidden) {
  switch (hidden.scalar_type()) {
    case at::kFloat: return Code::kFloat32;
    case at::kBFloat16: return Code::kBFloat16;
    case at::kHalf: return Code::kFloat16;
    default: TORCH_CHECK(false, "unreachable: the checks accept float dtypes only");
  }
}

}  // namespace emokern
