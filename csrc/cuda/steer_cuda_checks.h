// The check the CUDA binding (steer_cuda_binding.cpp) adds to csrc/steer.h's for projection
// bounds: the kernel's size limit. Torch and the launchers' declarations only, no CUDA code, so
// tests/ops/cuda_emulation/checks.cpp can compile it against the CPU torch.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "steer_cuda_launch.h"

namespace emokern {

// With bounds, the CUDA kernel solves each row's levels in shared memory sized for K: at most
// cuda::kMaxLeveledVectors vectors (a ValueError beyond, before anything is written).
inline void check_cuda_bounds_size(bool leveled, int64_t n_vec, const char* op) {
  TORCH_CHECK_VALUE(!leveled || n_vec <= cuda::kMaxLeveledVectors, op,
                    "projection bounds on the CUDA kernel take at most ",
                    cuda::kMaxLeveledVectors, " vectors, got K = ", n_vec,
                    " (backend=\"reference\" takes any K)");
}

}  // namespace emokern
