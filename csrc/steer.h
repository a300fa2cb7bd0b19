// Argument checks of emokern::steer_ and emokern::steer_packed_ shared by the C++ backends
// (CPU, CUDA bindings).
//
// These are the cheap metadata checks only (shapes, dtypes, devices, layouts): callers of
// torch.ops.emokern.steer_ bypass the Python wrapper's validation, so every compiled backend
// repeats them here. The data checks (finite weights, nonzero vector norms) read the tensors
// and belong to each backend's kernel, which runs them before it writes anything.
//
// Messages and exception types mirror emokern/ops/steer.py and steer_packed.py: TypeError for dtypes,
// ValueError for shapes and layouts, each naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

namespace emokern {

//: Lower bound of ||y|| in the norm-preserving rescale y * ||x|| / max(||y||, kNormEps).
constexpr float kNormEps = 1e-6f;

struct SteerSizes {
  int64_t batch;    // B
  int64_t seq_len;  // T
  int64_t dim;      // D
  int64_t n_vec;    // K
};

// dtype names as Python spells them (torch.float32), matching the Python wrapper's messages.
inline std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Message prefixes: the public name of each op.
constexpr const char* kSteerOp = "emokern.steer_: ";
constexpr const char* kPackedOp = "emokern.steer_packed_: ";

inline void check_same_device(const at::Tensor& t, const at::Tensor& hidden, const char* name,
                              const char* op = kSteerOp) {
  TORCH_CHECK_VALUE(t.device() == hidden.device(), op, name, " is on ", t.device(),
                    " but hidden is on ", hidden.device());
}

// dtype, then shape, then device: the order of the Python wrappers' checks.
inline void check_input(const at::Tensor& t, const at::Tensor& hidden, const char* name,
                        at::IntArrayRef shape, at::ScalarType dtype, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, name, " must be ", torch_dtype_name(dtype),
                   ", got ", torch_dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, name, " must have shape ", shape, ", got ",
                    t.sizes());
  check_same_device(t, hidden, name, op);
}

inline void check_output(const std::optional<at::Tensor>& t, const at::Tensor& hidden,
                         const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                         const char* op = kSteerOp) {
  if (!t.has_value()) return;
  check_input(*t, hidden, name, shape, dtype, op);
  TORCH_CHECK_VALUE(t->is_contiguous(), op, name, " must be contiguous");
}

// Rows of hidden must be distinct memory: an in-place op on overlapping rows is undefined.
// Sufficient condition used here: with dims 0 and 1 ordered by stride, the inner one steps at
// least a row (D elements) and the outer one steps past the whole inner extent.
inline bool rows_disjoint(const at::Tensor& hidden) {
  const int64_t dim = hidden.size(2);
  int64_t size_a = hidden.size(0), stride_a = hidden.stride(0);
  int64_t size_b = hidden.size(1), stride_b = hidden.stride(1);
  if (size_a <= 1) return size_b <= 1 || stride_b >= dim;
  if (size_b <= 1) return stride_a >= dim;
  if (stride_a > stride_b) {
    std::swap(size_a, size_b);
    std::swap(stride_a, stride_b);
  }
  return stride_a >= dim && stride_b >= stride_a * size_a;
}

// Metadata checks of every argument; returns the sizes. Inputs (vectors, weights, mask) may
// have any layout (the kernels make them contiguous); outputs must be contiguous.
inline SteerSizes check_steer_args(const at::Tensor& hidden, const at::Tensor& vectors,
                                   const at::Tensor& weights,
                                   const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& proj_out,
                                   const std::optional<at::Tensor>& run_sum,
                                   const std::optional<at::Tensor>& run_count,
                                   const std::optional<at::Tensor>& run_last) {
  const auto hdt = hidden.scalar_type();
  TORCH_CHECK_TYPE(hdt == at::kFloat || hdt == at::kBFloat16 || hdt == at::kHalf,
                   "emokern.steer_: hidden must be float32, bfloat16 or float16, got ",
                   torch_dtype_name(hdt));
  TORCH_CHECK_VALUE(hidden.dim() == 3, "emokern.steer_: hidden must be [B, T, D], got shape ",
                    hidden.sizes());
  SteerSizes s{hidden.size(0), hidden.size(1), hidden.size(2), 0};
  TORCH_CHECK_VALUE(hidden.stride(2) == 1 || s.dim <= 1,
                    "emokern.steer_: hidden must have a contiguous last dimension (stride 1), "
                    "got strides ", hidden.strides(), "; pass hidden.contiguous() and copy back");
  TORCH_CHECK_VALUE(rows_disjoint(hidden), "emokern.steer_: hidden rows overlap in memory "
                    "(strides ", hidden.strides(), "); an in-place op needs distinct rows");

  TORCH_CHECK_TYPE(at::isFloatingType(vectors.scalar_type()),
                   "emokern.steer_: vectors must be floating point, got ",
                   torch_dtype_name(vectors.scalar_type()));
  TORCH_CHECK_VALUE(vectors.dim() == 2 && vectors.size(1) == s.dim && vectors.size(0) >= 1,
                    "emokern.steer_: vectors must be [K, D] with K >= 1 and D = ", s.dim,
                    " (hidden's last dimension), got shape ", vectors.sizes());
  check_same_device(vectors, hidden, "vectors");
  s.n_vec = vectors.size(0);

  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat,
                   "emokern.steer_: weights must be torch.float32, got ",
                   torch_dtype_name(weights.scalar_type()));
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == s.batch &&
                    weights.size(1) == s.n_vec, "emokern.steer_: weights must have shape [",
                    s.batch, ", ", s.n_vec, "], got ", weights.sizes());
  check_same_device(weights, hidden, "weights");

  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool,
                     "emokern.steer_: mask must be torch.bool, got ",
                     torch_dtype_name(mask->scalar_type()));
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == s.batch &&
                      mask->size(1) == s.seq_len, "emokern.steer_: mask must have shape [",
                      s.batch, ", ", s.seq_len, "], got ", mask->sizes());
    check_same_device(*mask, hidden, "mask");
  }
  check_output(proj_out, hidden, "proj_out", {s.batch, s.seq_len, s.n_vec}, at::kFloat);

  const int given = int(run_sum.has_value()) + int(run_count.has_value()) +
                    int(run_last.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3, "emokern.steer_: run_sum, run_count and "
                    "run_last go together (all three or none), got ", given, " of them");
  check_output(run_sum, hidden, "running.sum", {s.batch, s.n_vec}, at::kFloat);
  check_output(run_count, hidden, "running.count", {s.batch}, at::kLong);
  check_output(run_last, hidden, "running.last", {s.batch, s.n_vec}, at::kFloat);
  return s;
}

// Projection levels and bounds: bounds [rows, 2, K] float32 (rows = B, or S for the packed op)
// and gram [K, K] float32, given together; both contiguous (the kernels read them in place).
// Returns whether they are given.
inline bool check_bounds_args(const std::optional<at::Tensor>& bounds,
                              const std::optional<at::Tensor>& gram, const at::Tensor& hidden,
                              int64_t rows, int64_t n_vec, const char* op) {
  TORCH_CHECK_VALUE(bounds.has_value() == gram.has_value(), op, "bounds and gram go together "
                    "(gram = emokern.ops.unit_gram(vectors)), got ",
                    bounds.has_value() ? "bounds without gram" : "gram without bounds");
  if (!bounds.has_value()) return false;
  check_output(bounds, hidden, "bounds", {rows, 2, n_vec}, at::kFloat, op);
  check_output(gram, hidden, "gram", {n_vec, n_vec}, at::kFloat, op);
  return true;
}

struct PackedSizes {
  int64_t n_tokens;  // N
  int64_t dim;       // D
  int64_t n_vec;     // K
  int64_t n_slots;   // S
};

// Metadata checks of emokern::steer_packed_, in the order and with the messages of
// validate_steer_packed_args (emokern/ops/steer_packed.py). Stricter in one place: a single token's
// row (N = 1) must have a contiguous last dimension too, since the kernel reads it so.
inline PackedSizes check_steer_packed_args(const at::Tensor& hidden,
                                           const std::optional<at::Tensor>& residual,
                                           const at::Tensor& vectors,
                                           const at::Tensor& slot_weights,
                                           const at::Tensor& token_slot,
                                           const std::optional<at::Tensor>& proj_out,
                                           const std::optional<at::Tensor>& run_sum,
                                           const std::optional<at::Tensor>& run_count,
                                           const std::optional<at::Tensor>& run_last) {
  const char* op = kPackedOp;
  const auto hdt = hidden.scalar_type();
  TORCH_CHECK_TYPE(hdt == at::kFloat || hdt == at::kBFloat16 || hdt == at::kHalf, op,
                   "hidden must be float32, bfloat16 or float16, got ", torch_dtype_name(hdt));
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, "hidden must be [N, D], got shape ", hidden.sizes());
  PackedSizes s{hidden.size(0), hidden.size(1), 0, 0};
  TORCH_CHECK_VALUE((hidden.stride(1) == 1 || s.dim <= 1) &&
                        (s.n_tokens <= 1 || hidden.stride(0) >= s.dim),
                    op, "hidden must have distinct rows with a contiguous last dimension, got "
                    "strides ", hidden.strides());
  if (residual.has_value()) {
    check_input(*residual, hidden, "residual", {s.n_tokens, s.dim}, hdt, op);
    TORCH_CHECK_VALUE(residual->stride(1) == 1 || s.dim <= 1, op,
                      "residual must have a contiguous last dimension");
  }
  TORCH_CHECK_TYPE(at::isFloatingType(vectors.scalar_type()), op,
                   "vectors must be floating point, got ",
                   torch_dtype_name(vectors.scalar_type()));
  TORCH_CHECK_VALUE(vectors.dim() == 2 && vectors.size(1) == s.dim && vectors.size(0) >= 1, op,
                    "vectors must be [K, D] with K >= 1 and D = ", s.dim,
                    " (hidden's last dimension), got shape ", vectors.sizes());
  check_same_device(vectors, hidden, "vectors", op);
  s.n_vec = vectors.size(0);
  TORCH_CHECK_VALUE(slot_weights.dim() == 2 && slot_weights.size(0) >= 1, op,
                    "slot_weights must be [S, K] with S >= 1, got shape ", slot_weights.sizes());
  s.n_slots = slot_weights.size(0);
  check_input(slot_weights, hidden, "slot_weights", {s.n_slots, s.n_vec}, at::kFloat, op);
  TORCH_CHECK_VALUE(token_slot.dim() == 1 && token_slot.size(0) >= s.n_tokens, op,
                    "token_slot must be [N_max] with N_max >= N = ", s.n_tokens,
                    ", got shape ", token_slot.sizes());
  check_input(token_slot, hidden, "token_slot", token_slot.sizes(), at::kInt, op);
  if (proj_out.has_value()) {
    TORCH_CHECK_VALUE(proj_out->dim() == 2 && proj_out->size(0) >= s.n_tokens, op,
                      "proj_out must be [N_max, K] with N_max >= ", s.n_tokens,
                      ", got shape ", proj_out->sizes());
    check_output(proj_out, hidden, "proj_out", {proj_out->size(0), s.n_vec}, at::kFloat, op);
  }
  const int given = int(run_sum.has_value()) + int(run_count.has_value()) +
                    int(run_last.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3, op, "run_sum, run_count and run_last go together "
                    "(all three or none), got ", given, " of them");
  check_output(run_sum, hidden, "running.sum", {s.n_slots, s.n_vec}, at::kFloat, op);
  check_output(run_count, hidden, "running.count", {s.n_slots}, at::kLong, op);
  check_output(run_last, hidden, "running.last", {s.n_slots, s.n_vec}, at::kFloat, op);
  return s;
}

}  // namespace emokern
