// The argument checks the CUDA binding runs before launching the packed kernel
// (check_steer_packed_args of csrc/steer.h, which needs no CUDA headers) exposed as a CPU op, so
// tests/ops/test_cuda.py can compare them with the Python wrapper's on a machine without CUDA;
// and the binding's own check of projection bounds (csrc/cuda/steer_cuda_checks.h, whose
// launcher declarations take cuda_runtime_api.h from the emulated runtime in include/).
#include "steer.h"

#include <torch/library.h>

#include "cuda/steer_cuda_checks.h"

namespace {

void check_steer_packed(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                        const at::Tensor& vectors, const at::Tensor& slot_weights,
                        const at::Tensor& token_slot, const std::optional<at::Tensor>& proj_out,
                        const std::optional<at::Tensor>& run_sum,
                        const std::optional<at::Tensor>& run_count,
                        const std::optional<at::Tensor>& run_last) {
  emokern::check_steer_packed_args(hidden, residual, vectors, slot_weights, token_slot,
                                   proj_out, run_sum, run_count, run_last);
}

void check_cuda_bounds_size(bool leveled, int64_t n_vec) {
  emokern::check_cuda_bounds_size(leveled, n_vec, emokern::kPackedOp);
}

}  // namespace

TORCH_LIBRARY(emokern_cuda_checks, m) {
  m.def("check_steer_packed(Tensor hidden, Tensor? residual, Tensor vectors, "
        "Tensor slot_weights, Tensor token_slot, Tensor? proj_out, Tensor? run_sum, "
        "Tensor? run_count, Tensor? run_last) -> ()",
        &check_steer_packed);
  m.def("check_cuda_bounds_size(bool leveled, int n_vec) -> ()", &check_cuda_bounds_size);
}
