// CPU kernel of emokern::scale_neurons_ (schema in emokern/ops/scale_neurons.py): scale a set of
// neurons (last-dimension columns) of an activation tensor in place,
//
//     act[r, j] = float(act[r, j]) * scale      for every row r and every j in neuron_idx,
//
// computed in float32 and stored in act's dtype; every other entry is left untouched, and an
// empty neuron_idx changes nothing. The reference is emokern.ops.reference.ref_scale_neurons_.
//
// Every argument is checked before anything is written, without allocating: act's leading
// dimensions must collapse into one row stride with a contiguous last dimension (an MLP's
// intermediate activation always does), neuron_idx must be strictly increasing int64 in
// [0, F) (sorted and distinct, so a duplicate cannot scale a neuron twice; checked in one pass).
// Rows are split over threads; each row is touched at its M listed columns only.
//
// This file compiles on its own (torch headers only) into the same extension as the steering
// kernel: emokern/ops/build.py compiles every csrc/cpu/*.cpp into one library.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace emokern {
namespace {

struct RowLayout {
  int64_t rows;
  int64_t features;
  int64_t row_stride;
};

RowLayout check_scale_neurons_args(const at::Tensor& act, const at::Tensor& neuron_idx) {
  const auto dt = act.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "emokern.scale_neurons_: act must be float32, bfloat16 or float16, got ",
                   dt);
  TORCH_CHECK_VALUE(act.device().is_cpu(), "emokern.scale_neurons_: act must be a CPU tensor "
                    "for the CPU kernel, got ", act.device());
  TORCH_CHECK_VALUE(act.dim() >= 1, "emokern.scale_neurons_: act must have at least one "
                    "dimension [..., F], got a scalar");
  TORCH_CHECK_TYPE(neuron_idx.scalar_type() == at::kLong,
                   "emokern.scale_neurons_: neuron_idx must be int64, got ",
                   neuron_idx.scalar_type());
  TORCH_CHECK_VALUE(neuron_idx.dim() == 1, "emokern.scale_neurons_: neuron_idx must be [M], "
                    "got shape ", neuron_idx.sizes());
  TORCH_CHECK_VALUE(neuron_idx.device().is_cpu(), "emokern.scale_neurons_: neuron_idx is on ",
                    neuron_idx.device(), " but act is on ", act.device());

  const int64_t nd = act.dim();
  const int64_t features = act.size(nd - 1);
  TORCH_CHECK_VALUE(features <= 1 || act.stride(nd - 1) == 1,
                    "emokern.scale_neurons_: act must have a contiguous last dimension "
                    "(stride 1), got strides ", act.strides());
  // Collapse the leading dimensions into rows of one stride (size-1 dimensions are free).
  int64_t rows = act.numel() == 0 ? 0 : 1;
  int64_t row_stride = features;
  bool have_stride = false;
  for (int64_t d = nd - 2; d >= 0 && rows > 0; --d) {
    const int64_t size = act.size(d);
    if (size == 1) continue;
    if (!have_stride) {
      row_stride = act.stride(d);
      have_stride = true;
    } else {
      TORCH_CHECK_VALUE(act.stride(d) == row_stride * rows,
                        "emokern.scale_neurons_: act's leading dimensions must collapse into "
                        "rows of one stride, got shape ", act.sizes(), " and strides ",
                        act.strides(), "; pass act.contiguous() and copy back");
    }
    rows *= size;
  }
  TORCH_CHECK_VALUE(rows <= 1 || features == 0 || row_stride >= features,
                    "emokern.scale_neurons_: act's rows overlap in memory (strides ",
                    act.strides(), "); an in-place op needs distinct rows");

  const int64_t m = neuron_idx.size(0);
  const int64_t idx_stride = neuron_idx.stride(0);
  const int64_t* idx = neuron_idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = idx[i * idx_stride];
    TORCH_CHECK_VALUE(j >= 0 && j < features, "emokern.scale_neurons_: neuron_idx[", i, "] = ",
                      j, " is outside [0, ", features, ") (F = act.shape[-1])");
    TORCH_CHECK_VALUE(i == 0 || j > idx[(i - 1) * idx_stride],
                      "emokern.scale_neurons_: neuron_idx must be strictly increasing (sorted, "
                      "distinct), but neuron_idx[", i, "] = ", j, " follows ",
                      idx[(i - 1) * idx_stride]);
  }
  return {rows, features, row_stride};
}

template <typename T>
void run(const at::Tensor& act, const at::Tensor& neuron_idx, float scale, RowLayout L) {
  const int64_t m = neuron_idx.size(0);
  const int64_t idx_stride = neuron_idx.stride(0);
  const int64_t* idx = neuron_idx.data_ptr<int64_t>();
  T* base = act.data_ptr<T>();
  const int64_t row_stride = L.row_stride;
  // About 16k scaled entries per task: small calls (a decode step) stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(m, 1));
  at::parallel_for(0, L.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = base + r * row_stride;
      for (int64_t i = 0; i < m; ++i) {
        T& x = row[idx[i * idx_stride]];
        x = static_cast<T>(static_cast<float>(x) * scale);
      }
    }
  });
}

void scale_neurons_cpu(const at::Tensor& act, const at::Tensor& neuron_idx, double scale) {
  const RowLayout L = check_scale_neurons_args(act, neuron_idx);
  if (neuron_idx.size(0) == 0 || L.rows == 0) return;
  const float s = static_cast<float>(scale);
  switch (act.scalar_type()) {
    case at::kFloat: run<float>(act, neuron_idx, s, L); break;
    case at::kBFloat16: run<c10::BFloat16>(act, neuron_idx, s, L); break;
    case at::kHalf: run<c10::Half>(act, neuron_idx, s, L); break;
    default: TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CPU, m) { m.impl("scale_neurons_", &emokern::scale_neurons_cpu); }
