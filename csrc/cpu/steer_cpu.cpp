// Fused CPU kernels of emokern::steer_ and emokern::steer_packed_: argument checks, data
// checks, dispatcher registration, the choice of instruction set, and the portable core. The
// arithmetic lives in steer_kernel.h and its layers (kernel/), one source for every
// instruction set on ATen's Vectorized types; semantics: docs/design.md, oracle:
// emokern.ops.reference. The metadata checks (../steer.h) and the tensor helpers (../binding.h)
// are shared with the CUDA binding.
//
// Like ATen's kernels, the core is compiled once per instruction set and chosen at run time:
//   * this file: the portable core (ATen's default Vectorized: NEON on aarch64, plain arrays
//     the compiler vectorises elsewhere), always available;
//   * steer_kernel_avx2.cpp, steer_kernel_avx512.cpp: the x86 cores, each a weak entry point
//     that stays null when the build did not compile it.
// The JIT build (emokern/ops/build.py) compiles every csrc/cpu/*.cpp with -march=native, so the
// sets the build machine has; the ahead-of-time build (setup.py) compiles each core with its
// own -m flags and this file for the baseline, linked first (see steer_kernel_avx2.cpp).
// $EMOKERN_CPU_CAPABILITY (default, avx2, avx512; else $ATEN_CPU_CAPABILITY) caps the choice,
// so every path the CPU supports can be run and compared; emokern_cpu_isa() names the one in
// use. All paths compute bit-identical results (steer_kernel.h).
//
// Projection levels and bounds: the per-row solve (csrc/levels.h) and the pushes' share of the
// projections are compiled here, once, and reach every core through Problem::level_row and
// level_push, so that their scalar arithmetic does not depend on the instruction set.
//
// Nothing is written before every check has passed: metadata (csrc/steer.h), then data
// (finite weights, nonzero finite vector norms, bounds that are numbers with lower <= upper, a
// finite gram, slot indices in range).

#define EMOKERN_ISA_DEFAULT
#include "steer_isa.h"  // before any ATen header: the portable Vectorized implementation

#include "../binding.h"
#include "../levels.h"
#include "../steer.h"
#include "steer_cpu.h"
#include "steer_kernel.h"

#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

namespace emokern {
namespace cpu {

// The other cores (steer_kernel_<set>.cpp); weak, so a core the build skipped is null.
#define EMOKERN_ISA_ENTRY(SET) \
  namespace SET { __attribute__((weak)) const KernelTable* isa_kernel_table(); }
EMOKERN_ISA_ENTRY(AVX2)
EMOKERN_ISA_ENTRY(AVX512)
#undef EMOKERN_ISA_ENTRY

namespace {

bool cpu_has(const char* feature) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // libgcc checks the OS saves the wide registers (XGETBV) before reporting AVX/AVX-512.
  if (std::strcmp(feature, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  (void)feature;
  return false;
}

// The most capable set allowed by $EMOKERN_CPU_CAPABILITY, else $ATEN_CPU_CAPABILITY:
// 0 default, 1 avx2, 2 avx512; no variable: any.
int capability_cap() {
  for (const char* name : {"EMOKERN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"}) {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') continue;
    std::string v(value);
    for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (v == "default" || v == "neon") return 0;
    if (v == "avx2") return 1;
    if (v == "avx512") return 2;
  }
  return 2;
}

const KernelTable& choose_kernels() {
  const int cap = capability_cap();
  const KernelTable* best = &DEFAULT::kernel_table();
  if (cap >= 1 && &AVX2::isa_kernel_table != nullptr && cpu_has("avx2"))
    best = AVX2::isa_kernel_table();
  if (cap >= 2 && &AVX512::isa_kernel_table != nullptr && cpu_has("avx512"))
    best = AVX512::isa_kernel_table();
  return *best;
}

const KernelTable& kernels() {
  static const KernelTable& chosen = choose_kernels();
  return chosen;
}

// The float32 contiguous vectors and their inverse norms (data check: every norm nonzero and
// finite).
void vector_norms(const at::Tensor& vec, int64_t n_vec, int64_t dim, const char* op,
                  c10::SmallVector<float, 64>& inv_norm) {
  inv_norm.resize(static_cast<size_t>(n_vec));
  const int64_t bad = kernels().inv_norms(vec.data_ptr<float>(), n_vec, dim, inv_norm.data());
  TORCH_CHECK_VALUE(bad < 0, op, "vectors[", bad, "] has zero or non-finite norm; an emotion "
                    "vector needs a direction");
}

// Data checks of bounds and gram, the messages of emokern.ops.checks.check_bounds: every bound
// a number (+-inf allowed) with lower <= upper, gram finite.
void check_bound_values(const at::Tensor& bounds, const at::Tensor& gram, const char* op) {
  const float* b = bounds.data_ptr<float>();
  const int64_t rows = bounds.size(0), n_vec = bounds.size(2);
  // lower <= upper fails for a NaN on either side too: one branch-free pass (vectorised) for
  // the common case, the loops below only to name the first bad bound.
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    const float* lo = b + 2 * r * n_vec;
    const float* hi = lo + n_vec;
    for (int64_t k = 0; k < n_vec; ++k) ok &= lo[k] <= hi[k];
  }
  for (int64_t i = 0; i < bounds.numel() && !ok; ++i)
    TORCH_CHECK_VALUE(!std::isnan(b[i]), op, "bounds must not be NaN (use -inf / +inf for an "
                      "open side)");
  for (int64_t r = 0; r < rows && !ok; ++r)
    for (int64_t k = 0; k < n_vec; ++k) {
      const float lo = b[(2 * r) * n_vec + k], hi = b[(2 * r + 1) * n_vec + k];
      TORCH_CHECK_VALUE(lo <= hi, op, "bounds[", r, ", :, ", k, "]: lower ", lo,
                        " is above upper ", hi);
    }
  TORCH_CHECK_VALUE(kernels().all_finite(gram.data_ptr<float>(), gram.numel()), op,
                    "gram must be finite (emokern.ops.unit_gram(vectors))");
}

// Problem::level_push and level_row (steer_cpu.h), compiled once, here, for every instruction
// set's core: an inline copy in each core would be compiled with that core's flags, and the
// compiler may round a scalar expression differently (fuse a product into a multiply-add on one
// set and not on another). The solve itself is csrc/levels.h, shared with the CUDA kernel.
void level_push(const Problem& P, int64_t slot_begin, int64_t slot_end, float* q) {
  const int64_t K = P.n_vec;
  // For each k the terms in order j = 0, 1, ...; only where the slot bounds k (level_row reads
  // no other q[k]: an open direction's projection after the pushes counts as 0). Slots in one
  // call: their sums overlap.
  for (int64_t slot = slot_begin; slot < slot_end; ++slot, q += K) {
    const float* w = P.weights + slot * K;
    const float* lo = P.bounds + slot * 2 * K;
    const float* hi = lo + K;
    for (int64_t k = 0; k < K; ++k) {
      float s = 0.0f;
      if (lo[k] > -INFINITY || hi[k] < INFINITY)
        for (int64_t j = 0; j < K; ++j) s += (w[j] * P.norm[j]) * P.gram[j * K + k];
      q[k] = s;
    }
  }
}

int level_row(const Problem& P, int64_t slot, const float* p, float c, const float* q,
              float* coef, int32_t* idx, float* work) {
  const int64_t K = P.n_vec;
  const float* lo = P.bounds + slot * 2 * K;
  const float* hi = lo + K;
  // The directions outside their bounds after the pushes (idx[0 .. n), in index order), their
  // p', bounds and Gram block. A direction open on both sides is never out of bounds (its
  // projection may not even have been computed: the cores skip the projections no slot bounds
  // when readings are off).
  float* p_after = work;
  float* lo_a = p_after + K;
  float* hi_a = lo_a + K;
  int n = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (lo[k] == -INFINITY && hi[k] == INFINITY) continue;
    const float pk = c * (p[k] + q[k]);
    if (level_gap(pk, lo[k], hi[k]) == 0.0f) continue;
    p_after[n] = pk;
    lo_a[n] = lo[k];
    hi_a[n] = hi[k];
    idx[n++] = int32_t(k);
  }
  if (n == 0) return 0;
  // The solve on those n only: in level_coefficients' K-direction solve a direction inside its
  // bounds has an identity row and column and a zero gap, and every product it adds to an
  // active row's sums is +0 * 0, so the solve on the active block gives the same bits (every
  // direction active: the Gram matrix itself).
  float* block = hi_a + K;
  float* a = block + n * n;
  if (n < K) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) block[i * n + j] = P.gram[idx[i] * K + idx[j]];
  }
  const float* gram = n < K ? block : P.gram;
  if (level_coefficients(n, gram, p_after, lo_a, hi_a, a, a + n) == 0) return 0;
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (a[i] == 0.0f) continue;  // dependent: dropped
    coef[m] = a[i] * P.inv_norm[idx[i]];
    idx[m++] = idx[i];
  }
  return m;
}

// The Problem fields of levels and bounds; norm[k] = ||v_k|| from the kernel's inverse norms.
void fill_levels(Problem& P, const at::Tensor& bounds, const at::Tensor& gram,
                 const c10::SmallVector<float, 64>& inv_norm, c10::SmallVector<float, 64>& norm) {
  norm.resize(inv_norm.size());
  for (size_t k = 0; k < inv_norm.size(); ++k)
    norm[k] = static_cast<float>(1.0 / double(inv_norm[k]));
  P.bounds = bounds.data_ptr<float>();
  P.gram = gram.data_ptr<float>();
  P.norm = norm.data();
  P.level_push = &level_push;
  P.level_row = &level_row;
}

void fill_outputs(Problem& P, const OutputPointers& out) {
  P.proj_out = out.proj_out;
  P.run_sum = out.run_sum;
  P.run_count = out.run_count;
  P.run_last = out.run_last;
}

void steer_cpu(const at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
               const std::optional<at::Tensor>& mask, bool norm_preserving,
               const std::optional<at::Tensor>& proj_out,
               const std::optional<at::Tensor>& run_sum,
               const std::optional<at::Tensor>& run_count,
               const std::optional<at::Tensor>& run_last,
               const std::optional<at::Tensor>& bounds, const std::optional<at::Tensor>& gram) {
  const SteerSizes sz = check_steer_args(hidden, vectors, weights, mask, proj_out, run_sum,
                                         run_count, run_last);
  const bool leveled = check_bounds_args(bounds, gram, hidden, sz.batch, sz.n_vec, kSteerOp);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), kSteerOp, "the CPU kernel got hidden on ",
                    hidden.device());
  // Inputs in the layout the kernel reads; no copies when the wrapper already passes them so.
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = weights.contiguous();
  const std::optional<at::Tensor> m = contiguous_or_none(mask);

  TORCH_CHECK_VALUE(kernels().all_finite(w.data_ptr<float>(), w.numel()), kSteerOp,
                    "weights must be finite (found NaN or inf)");
  c10::SmallVector<float, 64> inv_norm;
  vector_norms(vec, sz.n_vec, sz.dim, kSteerOp, inv_norm);
  if (leveled) check_bound_values(*bounds, *gram, kSteerOp);
  if (sz.batch == 0 || sz.seq_len == 0) return;

  Problem P{};
  P.dtype = hidden_dtype_code<Dtype>(hidden);
  P.n_rows = sz.batch * sz.seq_len;
  P.dim = sz.dim;
  P.n_vec = sz.n_vec;
  P.hidden = hidden.data_ptr();
  P.seq_len = sz.seq_len;
  P.stride_b = hidden.stride(0);
  P.stride_t = hidden.stride(1);
  P.mask = m.has_value() ? m->data_ptr<bool>() : nullptr;
  P.n_slots = sz.batch;
  P.weights = w.data_ptr<float>();
  P.vectors = vec.data_ptr<float>();
  P.inv_norm = inv_norm.data();
  P.norm_preserving = norm_preserving;
  fill_outputs(P, output_pointers(proj_out, run_sum, run_count, run_last));
  c10::SmallVector<float, 64> norm;
  if (leveled) fill_levels(P, *bounds, *gram, inv_norm, norm);
  kernels().steer(P);
}

void steer_packed_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
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
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), kPackedOp, "the CPU kernel got hidden on ",
                    hidden.device());
  const at::Tensor vec = float_contiguous(vectors);
  const at::Tensor w = slot_weights.contiguous();
  const at::Tensor slots = token_slot.contiguous();

  TORCH_CHECK_VALUE(kernels().all_finite(w.data_ptr<float>(), w.numel()), kPackedOp,
                    "slot_weights must be finite (found NaN or inf)");
  c10::SmallVector<float, 64> inv_norm;
  vector_norms(vec, sz.n_vec, sz.dim, kPackedOp, inv_norm);
  if (leveled) check_bound_values(*bounds, *gram, kPackedOp);
  const int32_t* slot = slots.data_ptr<int32_t>();
  for (int64_t i = 0; i < sz.n_tokens; ++i)
    TORCH_CHECK_VALUE(slot[i] >= -1 && slot[i] < sz.n_slots, kPackedOp,
                      "token_slot values must be in [-1, ", sz.n_slots,
                      ") (S = slot_weights.shape[0]); -1 leaves a token untouched");
  if (sz.n_tokens == 0) return;

  Problem P{};
  P.dtype = hidden_dtype_code<Dtype>(hidden);
  P.n_rows = sz.n_tokens;
  P.dim = sz.dim;
  P.n_vec = sz.n_vec;
  P.hidden = hidden.data_ptr();
  P.seq_len = 1;
  P.stride_b = hidden.stride(0);
  P.stride_t = 0;
  if (residual.has_value()) {
    P.residual = residual->data_ptr();
    P.res_stride_b = residual->stride(0);
  }
  P.token_slot = slot;
  P.n_slots = sz.n_slots;
  P.weights = w.data_ptr<float>();
  P.vectors = vec.data_ptr<float>();
  P.inv_norm = inv_norm.data();
  P.norm_preserving = norm_preserving;
  fill_outputs(P, output_pointers(proj_out, run_sum, run_count, run_last));
  c10::SmallVector<float, 64> norm;
  if (leveled) fill_levels(P, *bounds, *gram, inv_norm, norm);
  kernels().steer(P);
}

}  // namespace
}  // namespace cpu
}  // namespace emokern

// The instruction set the kernels run on ("avx512", "avx2", "sve256", "neon", "default"), for
// benchmark records and `emokern info` (read through ctypes; not an op).
extern "C" const char* emokern_cpu_isa() { return emokern::cpu::kernels().isa; }

TORCH_LIBRARY_IMPL(emokern, CPU, m) {
  m.impl("steer_", &emokern::cpu::steer_cpu);
  m.impl("steer_packed_", &emokern::cpu::steer_packed_cpu);
}

#ifdef EMOKERN_AOT_MODULE
// Ahead-of-time builds (setup.py) make this file the Python extension module emokern._C:
// importing it runs the registration above; isa() names the instruction set in use.
#include <Python.h>
static PyObject* emokern_c_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(emokern_cpu_isa());
}
static PyMethodDef emokern_c_methods[] = {
    {"isa", emokern_c_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef emokern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                              emokern_c_methods, nullptr, nullptr, nullptr,
                                              nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&emokern_c_module); }
#endif
